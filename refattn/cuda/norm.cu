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

// The block's share of both statistics: the `rows` rows of L values at
// x + j * stride (j < rows) hold the M = rows * L values,
//   mean = (1/M) sum x,  var = (1/M) sum (x - mean)^2   (two passes);
// thread 0 writes them.
template <typename T>
__device__ void refattn_block_mean_var(const T* x, long long rows, long long stride,
                                       long long L, refattn_acc* buf, T* mean,
                                       T* var) {
    const refattn_acc M = (refattn_acc)(rows * L);
    refattn_acc sum = 0;
    for (long long j = 0; j < rows; ++j) {
        for (long long l = threadIdx.x; l < L; l += blockDim.x)
            sum += (refattn_acc)x[j * stride + l];
    }
    const refattn_acc mu = refattn_block_sum(sum, buf) / M;
    refattn_acc sq = 0;
    for (long long j = 0; j < rows; ++j) {
        for (long long l = threadIdx.x; l < L; l += blockDim.x) {
            const refattn_acc d = (refattn_acc)x[j * stride + l] - mu;
            sq += d * d;
        }
    }
    sq = refattn_block_sum(sq, buf);
    if (threadIdx.x == 0) {
        *mean = (T)mu;
        *var = (T)(sq / M);
    }
}

// The block's share of the backward sums over `rows` rows of L values at
// offset j * stride, row j scaled by gamma_j = gamma[j] (1 for gamma null):
//   s_dy = sum gamma_j dy,  s_dy_xhat = sum gamma_j dy xhat;
// thread 0 writes them.
template <typename T>
__device__ void refattn_block_dy_sums(const T* dy, const T* xhat, const T* gamma,
                                      long long rows, long long stride, long long L,
                                      refattn_acc* buf, T* s_dy, T* s_dy_xhat) {
    refattn_acc s1 = 0, s2 = 0;
    for (long long j = 0; j < rows; ++j) {
        const refattn_acc gj = gamma ? (refattn_acc)gamma[j] : 1.0;
        for (long long l = threadIdx.x; l < L; l += blockDim.x) {
            const refattn_acc d = gj * (refattn_acc)dy[j * stride + l];
            s1 += d;
            s2 += d * (refattn_acc)xhat[j * stride + l];
        }
    }
    s1 = refattn_block_sum(s1, buf);
    s2 = refattn_block_sum(s2, buf);
    if (threadIdx.x == 0) {
        *s_dy = (T)s1;
        *s_dy_xhat = (T)s2;
    }
}

// one block per channel c: its N rows of L values, (n * C + c) * L onwards
template <typename T>
__global__ void refattn_batch_norm_stats_fwd(const T* __restrict__ x,
                                             T* __restrict__ mean, T* __restrict__ var,
                                             long long N, long long C, long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long c = blockIdx.x; c < C; c += gridDim.x)
        refattn_block_mean_var(x + c * L, N, C * L, L, buf, mean + c, var + c);
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
        refattn_block_dy_sums(dy + c * L, xhat + c * L, (const T*)nullptr, N, C * L, L,
                              buf, sum_dy + c, sum_dy_xhat + c);
    }
}

// one block per (n, g): rows of K contiguous values
template <typename T>
__global__ void refattn_group_norm_stats_fwd(const T* __restrict__ x,
                                             T* __restrict__ mean, T* __restrict__ var,
                                             long long R, long long K) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x)
        refattn_block_mean_var(x + r * K, 1, K, K, buf, mean + r, var + r);
}

// one block per (n, g): its C/G channel rows of L values, weighted by gamma
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
        const long long base = r * cpg * L;
        refattn_block_dy_sums(dy + base, xhat + base, gamma + (r % G) * cpg, cpg, L, L,
                              buf, sum_gdy + r, sum_gdy_xhat + r);
    }
}
