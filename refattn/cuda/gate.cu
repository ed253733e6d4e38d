// gate.cu -- sigmoid-gated multiply out = x * sigmoid(z), with z broadcast
// over x (N, C, L) as a channel gate (N, C, 1, 1) or a spatial gate
// (N, 1, H, W).  The forward also writes s = sigmoid(z) (z's shape), which is
// what the backward needs:
//   dx = dout * s
//   dz = (sum of dout * x over the broadcast axes) * s * (1 - s)

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

// The three steps both gates share.  Forward, at element i of x with gate zi:
// out[i] = x[i] * sigmoid(z[zi]), and the first element of the gate's
// broadcast (first) also writes s[zi].
template <typename T>
__device__ __forceinline__ void refattn_gate_fwd_at(const T* x, const T* z, T* out,
                                                    T* s, long long i, long long zi,
                                                    bool first) {
    const T g = refattn_sigmoid(z[zi]);
    out[i] = x[i] * g;
    if (first) s[zi] = g;
}

// Backward at element j of x, under the gate value g = s: dx[j] = dout[j] g;
// returns the term dout[j] x[j] of dz's sum.
template <typename T>
__device__ __forceinline__ refattn_acc refattn_gate_bwd_at(const T* dout, const T* x,
                                                           T* dx, long long j, T g) {
    const T d = dout[j];
    dx[j] = d * g;
    return (refattn_acc)d * (refattn_acc)x[j];
}

// dz = (sum of dout * x over the broadcast) * s * (1 - s)
template <typename T>
__device__ __forceinline__ T refattn_gate_dz(refattn_acc sum, T g) {
    return (T)sum * g * (T(1) - g);
}

// ---------------------------------------------------------------------------
// channel gate: z, s are (R,), R = N*C; one z per row of L positions

template <typename T>
__global__ void refattn_gate_mul_channel_fwd(const T* __restrict__ x,
                                             const T* __restrict__ z,
                                             T* __restrict__ out, T* __restrict__ s,
                                             long long R, long long L) {
    refattn_grid_rows(R, L, [&](long long i, long long row) {
        refattn_gate_fwd_at(x, z, out, s, i, row, i - row * L == 0);
    });
}

// one block per row r = (n, c): dz[r] = s(1 - s) * sum_l dout * x
template <typename T>
__global__ void refattn_gate_mul_channel_bwd(const T* __restrict__ dout,
                                             const T* __restrict__ x,
                                             const T* __restrict__ s,
                                             T* __restrict__ dx, T* __restrict__ dz,
                                             long long R, long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const T g = s[r];
        const refattn_acc sum = refattn_block_sum_of(L, buf, [&](long long l) {
            return refattn_gate_bwd_at(dout, x, dx, r * L + l, g);
        });
        if (threadIdx.x == 0) dz[r] = refattn_gate_dz(sum, g);
    }
}

// ---------------------------------------------------------------------------
// spatial gate: z, s are (N*L,); one z per (n, position), shared by channels

template <typename T>
__global__ void refattn_gate_mul_spatial_fwd(const T* __restrict__ x,
                                             const T* __restrict__ z,
                                             T* __restrict__ out, T* __restrict__ s,
                                             long long N, long long C, long long L) {
    refattn_grid_ncl(N, C, L, [&](long long i, refattn_ncl e) {
        refattn_gate_fwd_at(x, z, out, s, i, e.n * L + e.l, e.c == 0);
    });
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
        for (long long c = 0; c < C; ++c)
            sum += refattn_gate_bwd_at(dout, x, dx, (n * C + c) * L + l, g);
        dz[i] = refattn_gate_dz(sum, g);
    }
}
