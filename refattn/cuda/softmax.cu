// softmax.cu -- softmax over the last axis of a C-contiguous (R, K) matrix,
// one block per row, max-shifted for stability:
//   forward  y = exp(x - max x) / sum exp(x - max x)
//   backward dx = y * (dy - sum(dy * y))

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

template <typename T>
__global__ void refattn_softmax_fwd(const T* __restrict__ x, T* __restrict__ y,
                                    long long R, long long K) {
    __shared__ T mbuf[REFATTN_MAX_THREADS];
    __shared__ refattn_acc sbuf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const T* xr = x + r * K;
        T* yr = y + r * K;
        const refattn_max_sumexp<T> ms = refattn_block_max_sumexp(xr, K, mbuf, sbuf);
        const refattn_acc inv = 1.0 / ms.sumexp;
        for (long long k = threadIdx.x; k < K; k += blockDim.x) {
            yr[k] = (T)((refattn_acc)refattn_exp(xr[k] - ms.max) * inv);
        }
    }
}

template <typename T>
__global__ void refattn_softmax_bwd(const T* __restrict__ dy, const T* __restrict__ y,
                                    T* __restrict__ dx, long long R, long long K) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const long long base = r * K;
        const T d = (T)refattn_block_sum_of(K, buf, [&](long long k) {
            return (refattn_acc)dy[base + k] * (refattn_acc)y[base + k];
        });  // sum_k dy * y
        for (long long k = threadIdx.x; k < K; k += blockDim.x) {
            dx[base + k] = y[base + k] * (dy[base + k] - d);
        }
    }
}
