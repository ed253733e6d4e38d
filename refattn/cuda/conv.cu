// conv.cu -- direct small-channel k x k convolution (CBAM's spatial gate:
// C_in = 2, C_out = 1, k = 3 or 7), odd k, stride 1, zero padding
// p = (k - 1)/2 so the output keeps H x W.  Direct loops, no im2col.
//   y[n, o, h, w]  = bias[o] + sum_{c, i, j} w[o, c, i, j] x[n, c, h+i-p, w+j-p]
//   dx[n, c, h, w] = sum_{o, i, j} w[o, c, i, j] dy[n, o, h-i+p, w-j+p]
//   dw[o, c, i, j] = sum_{n, h, w} dy[n, o, h, w] x[n, c, h+i-p, w+j-p]
// Out-of-range x / dy positions are the zero padding.  bias is always read
// (pass zeros for a convolution without bias); dbias = sum dy is left to the
// caller.

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

// acc + sum_{j < J, a, b < k} wt_j[a, b] src_j[h + D (a - p), w + D (b - p)]
// for the position q = h * W + w of an H x W plane, with src_j = src + j H W,
// wt_j = wt + j * wstride and out-of-range positions as the zero padding.
// D = +1 gives y (the rows j are x's channels), D = -1 its transpose dx (the
// rows j are dy's channels).  Terms are added in (j, a, b) order.
template <int D, typename T>
__device__ refattn_acc refattn_conv_gather(refattn_acc acc, const T* src, long long J,
                                           const T* wt, long long wstride, long long H,
                                           long long W, long long k, long long q) {
    const long long pad = (k - 1) / 2;
    const long long h = q / W;
    const long long w = q - h * W;
    for (long long j = 0; j < J; ++j) {
        const T* sj = src + j * H * W;
        const T* wj = wt + j * wstride;
        for (long long a = 0; a < k; ++a) {
            const long long hs = h + D * (a - pad);
            if (hs < 0 || hs >= H) continue;
            for (long long b = 0; b < k; ++b) {
                const long long ws = w + D * (b - pad);
                if (ws < 0 || ws >= W) continue;
                acc += (refattn_acc)wj[a * k + b] * (refattn_acc)sj[hs * W + ws];
            }
        }
    }
    return acc;
}

// one thread per output element (n, o, q): bias[o] plus the gather over x[n]
template <typename T>
__global__ void refattn_small_conv_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                       const T* __restrict__ bias, T* __restrict__ y,
                                       long long N, long long Cin, long long Cout,
                                       long long H, long long W, long long k) {
    const long long HW = H * W;
    refattn_grid_ncl(N, Cout, HW, [&](long long i, refattn_ncl e) {
        const T* w_o = w + e.c * Cin * k * k;  // w[o, c] at c * k * k
        y[i] = (T)refattn_conv_gather<1>((refattn_acc)bias[e.c], x + e.n * Cin * HW,
                                         Cin, w_o, k * k, H, W, k, e.l);
    });
}

// the transposed convolution, as a gather (no atomics): one thread per input
// element (n, c, q), summing over dy[n] with the flipped window
template <typename T>
__global__ void refattn_small_conv_dx_bwd(const T* __restrict__ dy,
                                          const T* __restrict__ w, T* __restrict__ dx,
                                          long long N, long long Cin, long long Cout,
                                          long long H, long long W, long long k) {
    const long long HW = H * W;
    refattn_grid_ncl(N, Cin, HW, [&](long long i, refattn_ncl e) {
        const T* w_c = w + e.c * k * k;  // w[o, c] at o * Cin * k * k
        dx[i] = (T)refattn_conv_gather<-1>(0.0, dy + e.n * Cout * HW, Cout, w_c,
                                           Cin * k * k, H, W, k, e.l);
    });
}

// one block per weight element (o, c, a, b), reducing over (n, h, w)
template <typename T>
__global__ void refattn_small_conv_dw_bwd(const T* __restrict__ dy,
                                          const T* __restrict__ x, T* __restrict__ dw,
                                          long long N, long long Cin, long long Cout,
                                          long long H, long long W, long long k) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    const long long pad = (k - 1) / 2;
    const long long HW = H * W;
    const long long nweights = Cout * Cin * k * k;
    for (long long e = blockIdx.x; e < nweights; e += gridDim.x) {
        const long long b = e % k;
        const long long a = (e / k) % k;
        const long long c = (e / (k * k)) % Cin;
        const long long o = e / (k * k * Cin);
        refattn_acc acc = 0;
        for (long long n = 0; n < N; ++n) {
            const T* dyo = dy + (n * Cout + o) * HW;
            const T* xc = x + (n * Cin + c) * HW;
            for (long long q = threadIdx.x; q < HW; q += blockDim.x) {
                const long long h = q / W;
                const long long hi = h + a - pad;
                const long long wi = q - h * W + b - pad;
                if (hi < 0 || hi >= H || wi < 0 || wi >= W) continue;
                acc += (refattn_acc)dyo[q] * (refattn_acc)xc[hi * W + wi];
            }
        }
        acc = refattn_block_sum(acc, buf);
        if (threadIdx.x == 0) dw[e] = (T)acc;
    }
}
