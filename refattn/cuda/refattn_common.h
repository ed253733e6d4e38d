// refattn_common.h -- helpers shared by every refattn kernel file.
//
// Compiled by NVRTC (through cupy.RawModule) and, in the tests, by a C++20
// host compiler through tests/cuda/shim/cuda_host_shim.h.  It must therefore
// lean on nothing but the CUDA built-ins that NVRTC provides without any
// include: no <cfloat>, no <cmath>, no std::, no CuPy headers.
//
// Conventions of all kernels:
//   * every index and size is a 64-bit `long long`, and products with
//     blockIdx/blockDim are formed in 64 bits, so tensors with more than
//     2^31 elements work;
//   * element-wise kernels use grid-stride loops, row kernels put one block
//     on a row and stride over rows by gridDim.x, so any grid size is correct;
//   * sums are accumulated in double (refattn_acc) for float and double data;
//   * a max routes to the FIRST arg-max in scan order; NaN counts as larger
//     than every number (as numpy.argmax does);
//   * row reductions need blockDim.x <= REFATTN_MAX_THREADS (any value, not
//     only powers of two).

#ifndef REFATTN_COMMON_H
#define REFATTN_COMMON_H

#define REFATTN_MAX_THREADS 256
#define REFATTN_CGNL_MAX_ORDER 8

typedef double refattn_acc;

// exp in the precision of the data (softmax, lse, sigmoid); log and sqrt
// are only taken of refattn_acc sums, so the double libm functions serve
__device__ __forceinline__ float refattn_exp(float v) {
    return expf(v);
}
__device__ __forceinline__ double refattn_exp(double v) {
    return exp(v);
}

// first index of a grid-stride loop, and its stride, in 64 bits
__device__ __forceinline__ long long refattn_gid() {
    return (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
}

__device__ __forceinline__ long long refattn_gstride() {
    return (long long)blockDim.x * (long long)gridDim.x;
}

// stable logistic sigmoid: exp(-|z|) never overflows
template <typename T>
__device__ __forceinline__ T refattn_sigmoid(T z) {
    const T e = refattn_exp(z >= T(0) ? -z : z);
    return z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// Should candidate (bv, bi) replace the current best (av, ai) of an arg-max?
// An index < 0 marks "no element yet".  NaN beats numbers; among equal
// values (or among NaNs) the smaller index wins.
template <typename T>
__device__ __forceinline__ bool refattn_takes(T bv, long long bi, T av, long long ai) {
    if (bi < 0) return false;
    if (ai < 0) return true;
    const bool bnan = bv != bv;
    const bool anan = av != av;
    if (bnan || anan) return bnan && (!anan || bi < ai);
    return bv > av || (bv == av && bi < ai);
}

// The coordinates of the flat index i of a C-contiguous (N, C, L) array,
// i = (n * C + c) * L + l.
struct refattn_ncl {
    long long n, c, l;
};

__device__ __forceinline__ refattn_ncl refattn_unravel(long long i, long long C,
                                                       long long L) {
    const long long nc = i / L;
    const long long n = nc / C;
    return {n, nc - n * C, i - nc * L};
}

// f(i, e) for every element of a C-contiguous (N, C, L) array: its flat
// index i and coordinates e, the elements spread over the whole grid
template <typename F>
__device__ __forceinline__ void refattn_grid_ncl(long long N, long long C, long long L,
                                                 F f) {
    const long long total = N * C * L;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride())
        f(i, refattn_unravel(i, C, L));
}

// f(i, r) for every element of R rows of L values: its flat index
// i = r * L + l and its row r, the elements spread over the whole grid
template <typename F>
__device__ __forceinline__ void refattn_grid_rows(long long R, long long L, F f) {
    const long long total = R * L;
    for (long long i = refattn_gid(); i < total; i += refattn_gstride()) f(i, i / L);
}

// NaN-propagating max of two values
template <typename T>
__device__ __forceinline__ T refattn_max2(T a, T b) {
    return (b > a || b != b) ? b : a;
}

// smallest power of two >= n (n >= 1)
__device__ __forceinline__ unsigned refattn_pow2_ceil(unsigned n) {
    unsigned p = 1;
    while (p < n) p <<= 1;
    return p;
}

// Tree reduction of `v` over the threads of the block with the binary `op`.
// `buf` is a __shared__ array of at least blockDim.x entries; every thread of
// the block must call this; every thread gets the result.
template <typename T, typename Op>
__device__ T refattn_block_reduce(T v, T* buf, Op op) {
    const unsigned tid = threadIdx.x;
    const unsigned n = blockDim.x;
    buf[tid] = v;
    __syncthreads();
    for (unsigned s = refattn_pow2_ceil(n) / 2; s > 0; s >>= 1) {
        if (tid < s && tid + s < n) buf[tid] = op(buf[tid], buf[tid + s]);
        __syncthreads();
    }
    const T total = buf[0];
    __syncthreads();  // buf may be reused right after
    return total;
}

struct refattn_plus {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};

struct refattn_nanmax {
    template <typename T>
    __device__ T operator()(T a, T b) const { return refattn_max2(a, b); }
};

// Sum of `v` over the threads of the block (see block_reduce).
template <typename A>
__device__ A refattn_block_sum(A v, A* buf) {
    return refattn_block_reduce(v, buf, refattn_plus());
}

// NaN-propagating max of `v` over the threads of the block (see block_reduce).
template <typename T>
__device__ T refattn_block_max(T v, T* buf) {
    return refattn_block_reduce(v, buf, refattn_nanmax());
}

// Sum over l = 0..L-1 of term(l), a refattn_acc: each thread adds the terms
// of l = threadIdx.x, + blockDim.x, ... in that order, then the block sums
// the partial sums (see block_reduce; every thread gets the total).
template <typename F>
__device__ refattn_acc refattn_block_sum_of(long long L, refattn_acc* buf, F term) {
    refattn_acc sum = 0;
    for (long long l = threadIdx.x; l < L; l += blockDim.x) sum += term(l);
    return refattn_block_sum(sum, buf);
}

// The max m of the row xr[0..L) (NaN-propagating) and sum_l exp(xr[l] - m),
// the two reductions of a max-shifted softmax, over the block.
template <typename T>
struct refattn_max_sumexp {
    T max;
    refattn_acc sumexp;
};

template <typename T>
__device__ refattn_max_sumexp<T> refattn_block_max_sumexp(const T* xr, long long L,
                                                          T* mbuf, refattn_acc* sbuf) {
    T m = xr[0];
    for (long long l = threadIdx.x; l < L; l += blockDim.x) m = refattn_max2(m, xr[l]);
    m = refattn_block_max(m, mbuf);
    const refattn_acc sum = refattn_block_sum_of(
        L, sbuf, [&](long long l) { return (refattn_acc)refattn_exp(xr[l] - m); });
    return {m, sum};
}

// First arg-max over the threads of the block: each thread brings its own
// best (v, i) (i < 0 when it saw no element); on return *v, *i hold the
// block's best in every thread.
template <typename T>
__device__ void refattn_block_argmax(T* v, long long* i, T* vbuf, long long* ibuf) {
    const unsigned tid = threadIdx.x;
    const unsigned n = blockDim.x;
    vbuf[tid] = *v;
    ibuf[tid] = *i;
    __syncthreads();
    for (unsigned s = refattn_pow2_ceil(n) / 2; s > 0; s >>= 1) {
        if (tid < s && tid + s < n &&
            refattn_takes(vbuf[tid + s], ibuf[tid + s], vbuf[tid], ibuf[tid])) {
            vbuf[tid] = vbuf[tid + s];
            ibuf[tid] = ibuf[tid + s];
        }
        __syncthreads();
    }
    *v = vbuf[0];
    *i = ibuf[0];
    __syncthreads();
}

#endif  // REFATTN_COMMON_H
