// max_pool.cu -- max pooling with arg-max over 1-, 2- and 3-D windows
// (kernel kd x kh x kw, stride sd x sh x sw, floor mode, no padding) of x
// seen as P = N*C planes of D x H x W (2-D: D = kd = sd = 1; 1-D: also H = 1).
//   forward  y = max over the window, arg = the position of the FIRST
//            arg-max in row-major window order, as a flat index d*H*W + h*W + w
//            into the input plane (int64)
//   backward dx[plane, arg] += dy   (atomicAdd: windows may overlap; the
//            caller passes a zeroed dx)

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

template <typename T>
__global__ void refattn_max_pool_fwd(const T* __restrict__ x, T* __restrict__ y,
                                     long long* __restrict__ arg, long long P,
                                     long long D, long long H, long long W,
                                     long long kd, long long kh, long long kw,
                                     long long sd, long long sh, long long sw,
                                     long long Do, long long Ho, long long Wo) {
    const long long total = P * Do * Ho * Wo;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        long long t = i;
        const long long ow = t % Wo;
        t /= Wo;
        const long long oh = t % Ho;
        t /= Ho;
        const long long od = t % Do;
        const long long p = t / Do;
        const T* plane = x + p * D * H * W;
        const long long d0 = od * sd, h0 = oh * sh, w0 = ow * sw;
        T best = plane[(d0 * H + h0) * W + w0];
        long long besti = -1;
        // flat plane indices grow in row-major window order, so the index
        // tie-break of refattn_takes keeps the first arg-max of the scan
        for (long long a = 0; a < kd; ++a) {
            for (long long b = 0; b < kh; ++b) {
                const long long rowi = ((d0 + a) * H + (h0 + b)) * W + w0;
                for (long long c = 0; c < kw; ++c) {
                    const T v = plane[rowi + c];
                    if (refattn_takes(v, rowi + c, best, besti)) {
                        best = v;
                        besti = rowi + c;
                    }
                }
            }
        }
        y[i] = best;
        arg[i] = besti;
    }
}

template <typename T>
__global__ void refattn_max_pool_bwd(const T* __restrict__ dy,
                                     const long long* __restrict__ arg,
                                     T* __restrict__ dx, long long P,
                                     long long plane_in, long long plane_out) {
    refattn_grid_rows(P, plane_out, [&](long long i, long long p) {
        atomicAdd(dx + p * plane_in + arg[i], dy[i]);
    });
}
