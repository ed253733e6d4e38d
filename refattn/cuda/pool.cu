// pool.cu -- channel pool (max and mean over C) and global pools over the
// positions (avg, max, lp with p = 2, lse), forward and backward.
//
// Layouts: x is C-contiguous.  The channel pool sees x as (N, C, L); the
// global pools see it as R = N*C rows of L positions.  Arg-max indices are
// int64 (`long long`): a channel index for the channel pool, a position
// index for the global max pool.

#ifndef REFATTN_COMMON_H
#include "refattn_common.h"
#endif

// ---------------------------------------------------------------------------
// channel pool: mx[n, l] = max_c x[n, c, l] (first arg-max in arg),
//               mean[n, l] = (1/C) sum_c x[n, c, l]
// mx and mean are written at out[n * out_n_stride + l], so they may be two
// (N, L) arrays (stride L) or the two planes of one (N, 2, L) array (stride 2L).

template <typename T>
__global__ void refattn_channel_pool_fwd(const T* __restrict__ x, T* __restrict__ mx,
                                         long long* __restrict__ arg,
                                         T* __restrict__ mean, long long N, long long C,
                                         long long L, long long out_n_stride) {
    const long long total = N * L;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) {
        const long long n = i / L;
        const long long l = i - n * L;
        const T* xi = x + n * C * L + l;
        T best = xi[0];
        long long besti = 0;
        refattn_acc sum = 0;
        for (long long c = 0; c < C; ++c) {
            const T v = xi[c * L];
            if (refattn_takes(v, c, best, besti)) {
                best = v;
                besti = c;
            }
            sum += (refattn_acc)v;
        }
        const long long o = n * out_n_stride + l;
        mx[o] = best;
        mean[o] = (T)(sum / (refattn_acc)C);
        arg[i] = besti;
    }
}

// dx[n, c, l] = (c == arg[n, l]) * dmx[n, l] + dmean[n, l] / C
// dmx and dmean are read at [n * in_n_stride + l] (see the forward).
template <typename T>
__global__ void refattn_channel_pool_bwd(const T* __restrict__ dmx,
                                         const long long* __restrict__ arg,
                                         const T* __restrict__ dmean,
                                         T* __restrict__ dx, long long N, long long C,
                                         long long L, long long in_n_stride) {
    refattn_grid_ncl(N, C, L, [&](long long i, refattn_ncl e) {
        const long long o = e.n * in_n_stride + e.l;
        T g = dmean[o] / (T)C;
        if (arg[e.n * L + e.l] == e.c) g += dmx[o];
        dx[i] = g;
    });
}

// ---------------------------------------------------------------------------
// global average pool: out[r] = (1/L) sum_l x[r, l];  dx[r, l] = dout[r] / L

template <typename T>
__global__ void refattn_global_avg_pool_fwd(const T* __restrict__ x,
                                            T* __restrict__ out, long long R,
                                            long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const T* xr = x + r * L;
        const refattn_acc sum = refattn_block_sum_of(
            L, buf, [&](long long l) { return (refattn_acc)xr[l]; });
        if (threadIdx.x == 0) out[r] = (T)(sum / (refattn_acc)L);
    }
}

template <typename T>
__global__ void refattn_global_avg_pool_bwd(
    const T* __restrict__ dout, T* __restrict__ dx, long long R, long long L) {
    refattn_grid_rows(R, L, [&](long long i, long long r) { dx[i] = dout[r] / (T)L; });
}

// ---------------------------------------------------------------------------
// global max pool: out[r] = max_l x[r, l], arg[r] = first arg-max;
// dx[r, l] = (l == arg[r]) * dout[r]

template <typename T>
__global__ void refattn_global_max_pool_fwd(const T* __restrict__ x,
                                            T* __restrict__ out,
                                            long long* __restrict__ arg, long long R,
                                            long long L) {
    __shared__ T vbuf[REFATTN_MAX_THREADS];
    __shared__ long long ibuf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const T* xr = x + r * L;
        T best = xr[0];
        long long besti = -1;
        for (long long l = threadIdx.x; l < L; l += blockDim.x) {
            if (refattn_takes(xr[l], l, best, besti)) {
                best = xr[l];
                besti = l;
            }
        }
        refattn_block_argmax(&best, &besti, vbuf, ibuf);
        if (threadIdx.x == 0) {
            out[r] = best;
            arg[r] = besti;
        }
    }
}

template <typename T>
__global__ void refattn_global_max_pool_bwd(
    const T* __restrict__ dout, const long long* __restrict__ arg, T* __restrict__ dx,
    long long R, long long L) {
    refattn_grid_rows(R, L, [&](long long i, long long r) {
        dx[i] = (i - r * L == arg[r]) ? dout[r] : T(0);
    });
}

// ---------------------------------------------------------------------------
// global lp pool, p = 2: out[r] = sqrt(sum_l x^2)  (a sum, not a mean);
// dx = dout * x / out, and 0 where out == 0

template <typename T>
__global__ void refattn_global_lp_pool_fwd(const T* __restrict__ x, T* __restrict__ out,
                                           long long R, long long L) {
    __shared__ refattn_acc buf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const T* xr = x + r * L;
        const refattn_acc sum = refattn_block_sum_of(L, buf, [&](long long l) {
            const refattn_acc v = (refattn_acc)xr[l];
            return v * v;
        });
        if (threadIdx.x == 0) out[r] = (T)sqrt(sum);
    }
}

template <typename T>
__global__ void refattn_global_lp_pool_bwd(
    const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ out,
    T* __restrict__ dx, long long R, long long L) {
    refattn_grid_rows(R, L, [&](long long i, long long r) {
        const T norm = out[r];
        dx[i] = norm == T(0) ? T(0) : dout[r] * (x[i] / norm);
    });
}

// ---------------------------------------------------------------------------
// global log-sum-exp pool: m = max_l x, out[r] = m + log sum_l exp(x - m);
// dx = dout * softmax_l(x) = dout * exp(x - out)

template <typename T>
__global__ void refattn_global_lse_pool_fwd(const T* __restrict__ x,
                                            T* __restrict__ out, long long R,
                                            long long L) {
    __shared__ T mbuf[REFATTN_MAX_THREADS];
    __shared__ refattn_acc sbuf[REFATTN_MAX_THREADS];
    for (long long r = blockIdx.x; r < R; r += gridDim.x) {
        const refattn_max_sumexp<T> ms =
            refattn_block_max_sumexp(x + r * L, L, mbuf, sbuf);
        if (threadIdx.x == 0) out[r] = (T)((refattn_acc)ms.max + log(ms.sumexp));
    }
}

template <typename T>
__global__ void refattn_global_lse_pool_bwd(
    const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ out,
    T* __restrict__ dx, long long R, long long L) {
    refattn_grid_rows(R, L, [&](long long i, long long r) {
        dx[i] = dout[r] * refattn_exp(x[i] - out[r]);
    });
}
