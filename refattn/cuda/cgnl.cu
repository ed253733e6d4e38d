// cgnl.cu -- the per-group reductions of CGNL's Taylor-expanded kernel.
// p, g are (R, M) with R = N*G rows (one per sample and group) of M = cg*H*W
// values.  For q = 0..Q (Q <= REFATTN_CGNL_MAX_ORDER):
//   forward  s[r, q] = sum_m p^q g            (p^0 = 1, so s[r, 0] = sum g)
//   backward dp = g * sum_q ds[r, q] q p^(q-1),   dg = sum_q ds[r, q] p^q
// Scaling (1/sqrt(M)) and the Taylor weights alpha_q are applied by the
// caller to s and ds.

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

// one block per row; s is (R, Q + 1)
template <typename T>
__global__ void refattn_cgnl_moments_fwd(const T* __restrict__ p,
                                         const T* __restrict__ g, T* __restrict__ s,
                                         long long R, long long M, long long Q) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    if (Q > REFATTN_CGNL_MAX_ORDER) Q = REFATTN_CGNL_MAX_ORDER;  // the caller checks
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        refattn_acc acc[REFATTN_CGNL_MAX_ORDER + 1];
        for (long long q = 0; q <= Q; ++q) acc[q] = 0;
        for (long long m = threadIdx.x; m < M; m += blockDim.x) {
            const refattn_acc pv = (refattn_acc)p[r * M + m];
            refattn_acc term = (refattn_acc)g[r * M + m];  // p^q g, from q = 0
            for (long long q = 0; q <= Q; ++q) {
                acc[q] += term;
                term *= pv;
            }
        }
        for (long long q = 0; q <= Q; ++q) {
            const refattn_acc total = refattn_block_sum(acc[q], buf);
            if (threadIdx.x == 0) s[r * (Q + 1) + q] = (T)total;
        }
    }
}

template <typename T>
__global__ void refattn_cgnl_moments_bwd(const T* __restrict__ ds,
                                         const T* __restrict__ p,
                                         const T* __restrict__ g, T* __restrict__ dp,
                                         T* __restrict__ dg, long long R, long long M,
                                         long long Q) {
    if (Q > REFATTN_CGNL_MAX_ORDER) Q = REFATTN_CGNL_MAX_ORDER;  // the caller checks
    const long long total = R * M;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const T* dsr = ds + (i / M) * (Q + 1);
        const refattn_acc pv = (refattn_acc)p[i];
        refattn_acc pw = 1;  // p^(q-1) inside the loop, p^q after it
        refattn_acc sp = 0;
        refattn_acc sg = (refattn_acc)dsr[0];
        for (long long q = 1; q <= Q; ++q) {
            sp += (refattn_acc)dsr[q] * (refattn_acc)q * pw;
            pw *= pv;
            sg += (refattn_acc)dsr[q] * pw;
        }
        dp[i] = (T)(sp * (refattn_acc)g[i]);
        dg[i] = (T)sg;
    }
}
