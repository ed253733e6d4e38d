// gate.cu -- sigmoid-gated multiply out = x * sigmoid(z), with z broadcast
// over x (N, C, L) as a channel gate (N, C, 1, 1) or a spatial gate
// (N, 1, H, W).  The forward also writes s = sigmoid(z) (z's shape), which is
// what the backward needs:
//   dx = dout * s
//   dz = (sum of dout * x over the broadcast axes) * s * (1 - s)

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

// ---------------------------------------------------------------------------
// channel gate: z, s are (N*C,); one z per row of L positions

template <typename T>
__global__ void refattn_gate_mul_channel_fwd(const T* __restrict__ x,
                                             const T* __restrict__ z,
                                             T* __restrict__ out, T* __restrict__ s,
                                             long long N, long long C, long long L) {
    const long long total = N * C * L;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const long long row = i / L;
        const T g = refattn_sigmoid(z[row]);
        out[i] = x[i] * g;
        if (i - row * L == 0) s[row] = g;
    }
}

// one block per (n, c) row: dz[n, c] = s(1 - s) * sum_l dout * x
template <typename T>
__global__ void refattn_gate_mul_channel_bwd(const T* __restrict__ dout,
                                             const T* __restrict__ x,
                                             const T* __restrict__ s,
                                             T* __restrict__ dx, T* __restrict__ dz,
                                             long long N, long long C, long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    const long long rows = N * C;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T g = s[r];
        const long long base = r * L;
        refattn_acc sum = 0;
        for (long long l = threadIdx.x; l < L; l += blockDim.x) {
            const T d = dout[base + l];
            dx[base + l] = d * g;
            sum += (refattn_acc)d * (refattn_acc)x[base + l];
        }
        sum = refattn_block_sum(sum, buf);
        if (threadIdx.x == 0) dz[r] = (T)sum * g * (T(1) - g);
    }
}

// ---------------------------------------------------------------------------
// spatial gate: z, s are (N*L,); one z per (n, position), shared by channels

template <typename T>
__global__ void refattn_gate_mul_spatial_fwd(const T* __restrict__ x,
                                             const T* __restrict__ z,
                                             T* __restrict__ out, T* __restrict__ s,
                                             long long N, long long C, long long L) {
    const long long total = N * C * L;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const long long l = i % L;
        const long long nc = i / L;
        const long long n = nc / C;
        const long long zi = n * L + l;
        const T g = refattn_sigmoid(z[zi]);
        out[i] = x[i] * g;
        if (nc - n * C == 0) s[zi] = g;
    }
}

// one thread per (n, position), looping over channels (coalesced over l):
// dz[n, l] = s(1 - s) * sum_c dout * x
template <typename T>
__global__ void refattn_gate_mul_spatial_bwd(const T* __restrict__ dout,
                                             const T* __restrict__ x,
                                             const T* __restrict__ s,
                                             T* __restrict__ dx, T* __restrict__ dz,
                                             long long N, long long C, long long L) {
    const long long total = N * L;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const long long n = i / L;
        const long long l = i - n * L;
        const T g = s[i];
        refattn_acc sum = 0;
        for (long long c = 0; c < C; ++c) {
            const long long j = (n * C + c) * L + l;
            const T d = dout[j];
            dx[j] = d * g;
            sum += (refattn_acc)d * (refattn_acc)x[j];
        }
        dz[i] = (T)sum * g * (T(1) - g);
    }
}
