// cuda_host_shim.h -- run refattn's CUDA C kernels on the CPU (C++20).
//
// Enough of the CUDA execution model for the kernels to run unchanged:
//   * threadIdx / blockIdx are thread_local, blockDim / gridDim are globals;
//   * __global__, __device__, __host__ expand to nothing, __forceinline__ to
//     inline, __restrict__ to __restrict;
//   * __shared__ is static storage: blocks run one after another, so a static
//     is exactly one block's shared memory;
//   * __syncthreads() waits on the current block's std::barrier;
//   * atomicAdd is an atomic add through std::atomic_ref, returning the old
//     value;
//   * launch(kernel, grid, block, args...) runs the blocks in order, each with
//     one std::thread per thread (a barrier per block).
// Only <atomic>, <barrier>, <cstddef>, <functional>, <thread>, <vector> and
// the C math functions are included, so a kernel cannot lean on host-only
// names (DBL_MAX, std::max...) without the NVRTC compile test noticing.  Not modelled:
// warps (no
// __shfl_*, no warp-synchronous code), concurrency between blocks, the GPU
// memory model, launch limits, fast-math/FMA rounding.

#ifndef REFATTN_CUDA_HOST_SHIM_H
#define REFATTN_CUDA_HOST_SHIM_H

#include <math.h>

#include <atomic>
#include <barrier>
#include <cstddef>
#include <functional>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

namespace refattn_shim {
inline std::barrier<>* current_barrier = nullptr;
}

inline void __syncthreads() {
    refattn_shim::current_barrier->arrive_and_wait();
}

template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace refattn_shim {
// Run `body` (one kernel call with its arguments bound) for every thread of
// every block.  Not a template, so the thread machinery is compiled once.
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const unsigned nthreads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(static_cast<std::ptrdiff_t>(nthreads));
                current_barrier = &bar;
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                for (unsigned t = 0; t < nthreads; ++t) {
                    threads.emplace_back([&body, bx, by, bz, t, block] {
                        blockIdx = dim3(bx, by, bz);
                        threadIdx = dim3(t % block.x, (t / block.x) % block.y,
                                         t / (block.x * block.y));
                        body();
                    });
                }
                for (auto& th : threads) th.join();
                current_barrier = nullptr;
            }
}
}  // namespace refattn_shim

// kernel<<<grid, block>>>(args...)
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    refattn_shim::run_grid(grid, block, [=] { kernel(args...); });
}

#endif  // REFATTN_CUDA_HOST_SHIM_H
