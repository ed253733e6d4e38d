// norm.cu -- the reductions of batch norm and group norm over x (N, C, L).
//
// batch norm, per channel c over the M = N*L values x[:, c, :]:
//   stats    mean[c] = (1/M) sum x,  var[c] = (1/M) sum (x - mean)^2 (biased,
//            two passes, as numpy.var)
//   backward sum_dy[c] = sum dy,  sum_dy_xhat[c] = sum dy * xhat
//            (these are also dbias and dweight of group norm)
// group norm, per (n, g) over the K = (C/G)*L contiguous values of the group:
//   stats    mean[n, g], var[n, g] as above
//   backward sum_gdy[n, g] = sum gamma_c dy,  sum_gdy_xhat[n, g] =
//            sum gamma_c dy xhat  (pass gamma = ones when there is no weight)
// The element-wise parts (normalise, affine, dx from these sums) are left to
// array expressions.

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

// one block per channel
template <typename T>
__global__ void refattn_batch_norm_stats_fwd(const T* __restrict__ x,
                                             T* __restrict__ mean, T* __restrict__ var,
                                             long long N, long long C, long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    const refattn_acc M = (refattn_acc)(N * L);
    for (long long c = blockIdx.x; c < C; c += gridDim.x) {
        refattn_acc sum = 0;
        for (long long n = 0; n < N; ++n) {
            const T* xr = x + (n * C + c) * L;
            for (long long l = threadIdx.x; l < L; l += blockDim.x)
                sum += (refattn_acc)xr[l];
        }
        const refattn_acc mu = refattn_block_sum(sum, buf) / M;
        refattn_acc sq = 0;
        for (long long n = 0; n < N; ++n) {
            const T* xr = x + (n * C + c) * L;
            for (long long l = threadIdx.x; l < L; l += blockDim.x) {
                const refattn_acc d = (refattn_acc)xr[l] - mu;
                sq += d * d;
            }
        }
        sq = refattn_block_sum(sq, buf);
        if (threadIdx.x == 0) {
            mean[c] = (T)mu;
            var[c] = (T)(sq / M);
        }
    }
}

// one block per channel
template <typename T>
__global__ void refattn_batch_norm_reduce_bwd(const T* __restrict__ dy,
                                              const T* __restrict__ xhat,
                                              T* __restrict__ sum_dy,
                                              T* __restrict__ sum_dy_xhat, long long N,
                                              long long C, long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long c = blockIdx.x; c < C; c += gridDim.x) {
        refattn_acc s1 = 0, s2 = 0;
        for (long long n = 0; n < N; ++n) {
            const long long base = (n * C + c) * L;
            for (long long l = threadIdx.x; l < L; l += blockDim.x) {
                const refattn_acc d = (refattn_acc)dy[base + l];
                s1 += d;
                s2 += d * (refattn_acc)xhat[base + l];
            }
        }
        s1 = refattn_block_sum(s1, buf);
        s2 = refattn_block_sum(s2, buf);
        if (threadIdx.x == 0) {
            sum_dy[c] = (T)s1;
            sum_dy_xhat[c] = (T)s2;
        }
    }
}

// one block per (n, g): rows of K contiguous values
template <typename T>
__global__ void refattn_group_norm_stats_fwd(const T* __restrict__ x,
                                             T* __restrict__ mean, T* __restrict__ var,
                                             long long R, long long K) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const T* xr = x + r * K;
        refattn_acc sum = 0;
        for (long long k = threadIdx.x; k < K; k += blockDim.x)
            sum += (refattn_acc)xr[k];
        const refattn_acc mu = refattn_block_sum(sum, buf) / (refattn_acc)K;
        refattn_acc sq = 0;
        for (long long k = threadIdx.x; k < K; k += blockDim.x) {
            const refattn_acc d = (refattn_acc)xr[k] - mu;
            sq += d * d;
        }
        sq = refattn_block_sum(sq, buf);
        if (threadIdx.x == 0) {
            mean[r] = (T)mu;
            var[r] = (T)(sq / (refattn_acc)K);
        }
    }
}

// one block per (n, g)
template <typename T>
__global__ void refattn_group_norm_reduce_bwd(const T* __restrict__ dy,
                                              const T* __restrict__ xhat,
                                              const T* __restrict__ gamma,
                                              T* __restrict__ sum_gdy,
                                              T* __restrict__ sum_gdy_xhat, long long N,
                                              long long C, long long L, long long G) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    const long long cpg = C / G;
    for (long long r = blockIdx.x; r < N * G; r += gridDim.x) {
        const long long g = r % G;
        refattn_acc s1 = 0, s2 = 0;
        for (long long cc = 0; cc < cpg; ++cc) {
            const long long c = g * cpg + cc;
            const refattn_acc gc = (refattn_acc)gamma[c];
            const long long base = (r * cpg + cc) * L;
            for (long long l = threadIdx.x; l < L; l += blockDim.x) {
                const refattn_acc d = gc * (refattn_acc)dy[base + l];
                s1 += d;
                s2 += d * (refattn_acc)xhat[base + l];
            }
        }
        s1 = refattn_block_sum(s1, buf);
        s2 = refattn_block_sum(s2, buf);
        if (threadIdx.x == 0) {
            sum_gdy[r] = (T)s1;
            sum_gdy_xhat[r] = (T)s2;
        }
    }
}
