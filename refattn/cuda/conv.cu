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

template <typename T>
__global__ void refattn_small_conv_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                       const T* __restrict__ bias, T* __restrict__ y,
                                       long long N, long long Cin, long long Cout,
                                       long long H, long long W, long long k) {
    const long long pad = (k - 1) / 2;
    const long long HW = H * W;
    const long long total = N * Cout * HW;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const long long q = i % HW;
        const long long no = i / HW;
        const long long o = no % Cout;
        const long long n = no / Cout;
        const long long h = q / W;
        const long long ww = q - h * W;
        refattn_acc acc = (refattn_acc)bias[o];
        for (long long c = 0; c < Cin; ++c) {
            const T* xc = x + (n * Cin + c) * HW;
            const T* wc = w + (o * Cin + c) * k * k;
            for (long long a = 0; a < k; ++a) {
                const long long hi = h + a - pad;
                if (hi < 0 || hi >= H) continue;
                for (long long b = 0; b < k; ++b) {
                    const long long wi = ww + b - pad;
                    if (wi < 0 || wi >= W) continue;
                    acc += (refattn_acc)wc[a * k + b] * (refattn_acc)xc[hi * W + wi];
                }
            }
        }
        y[i] = (T)acc;
    }
}

// the transposed convolution, as a gather (no atomics)
template <typename T>
__global__ void refattn_small_conv_dx_bwd(const T* __restrict__ dy,
                                          const T* __restrict__ w, T* __restrict__ dx,
                                          long long N, long long Cin, long long Cout,
                                          long long H, long long W, long long k) {
    const long long pad = (k - 1) / 2;
    const long long HW = H * W;
    const long long total = N * Cin * HW;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const long long q = i % HW;
        const long long nc = i / HW;
        const long long c = nc % Cin;
        const long long n = nc / Cin;
        const long long h = q / W;
        const long long ww = q - h * W;
        refattn_acc acc = 0;
        for (long long o = 0; o < Cout; ++o) {
            const T* dyo = dy + (n * Cout + o) * HW;
            const T* wc = w + (o * Cin + c) * k * k;
            for (long long a = 0; a < k; ++a) {
                const long long ho = h - a + pad;
                if (ho < 0 || ho >= H) continue;
                for (long long b = 0; b < k; ++b) {
                    const long long wo = ww - b + pad;
                    if (wo < 0 || wo >= W) continue;
                    acc += (refattn_acc)wc[a * k + b] * (refattn_acc)dyo[ho * W + wo];
                }
            }
        }
        dx[i] = (T)acc;
    }
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
