// emu.h - run kernels/*.hip on the CPU, one std::thread per GPU thread (for tests, no GPU needed).
//
// Blocks run one after another; the threads of a block run concurrently, so __syncthreads is a
// std::barrier over the block and each warp shuffle is an exchange through memory between two
// barriers of that warp. __shared__ becomes `static`: one copy, used by the one running block.
// Slow and small-scale by design: it checks indexing and synchronisation logic, not speed.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local int emu_tid;  // linear thread id in the block

inline std::barrier<>* emu_block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bars;
inline float emu_xf[1024];
inline int emu_xi[1024];

#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
using std::min;
using std::max;
#include <math.h>

// Exact IEEE half <-> float (round to nearest even), as the hardware does.
inline float rf_h2f(unsigned short h) {
    const unsigned s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    unsigned b;
    if (e == 0) {
        if (m == 0) b = s;
        else {  // subnormal
            float f = std::ldexp((float)m, -24);
            return s ? -f : f;
        }
    } else if (e == 31) b = s | 0x7f800000u | (m << 13);
    else b = s | ((e + 112) << 23) | (m << 13);
    return __uint_as_float(b);
}
inline unsigned short rf_f2h(float f) {
    const unsigned b = __float_as_uint(f);
    const unsigned s = (b >> 16) & 0x8000u;
    const unsigned a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) return (unsigned short)(s | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
    if (a >= 0x477ff000u) return (unsigned short)(s | 0x7c00u);  // rounds to inf
    if (a < 0x38800000u) {  // subnormal half (or zero)
        const float af = __uint_as_float(a);
        const float q = std::nearbyint(af * 16777216.0f);  // units of 2^-24, ties to even
        return (unsigned short)(s | (unsigned)q);
    }
    unsigned e = ((a >> 23) - 112) << 10, m = a & 0x7fffffu;
    unsigned hm = m >> 13, rest = m & 0x1fffu;
    unsigned r = e | hm;
    if (rest > 0x1000u || (rest == 0x1000u && (hm & 1))) r += 1;
    return (unsigned short)(s | r);
}

template <class T>
inline T emu_exchange(T v, int src_lane, T* buf);

inline int emu_warp_index() { return emu_tid / WARP_SIZE; }

inline float rf_shfl(float v, int src) {
    const int w = emu_warp_index();
    emu_xf[emu_tid] = v;
    emu_warp_bars[w]->arrive_and_wait();
    const float r = emu_xf[w * WARP_SIZE + (src & (WARP_SIZE - 1))];
    emu_warp_bars[w]->arrive_and_wait();
    return r;
}
inline int rf_shfl_int(int v, int src) {
    const int w = emu_warp_index();
    emu_xi[emu_tid] = v;
    emu_warp_bars[w]->arrive_and_wait();
    const int r = emu_xi[w * WARP_SIZE + (src & (WARP_SIZE - 1))];
    emu_warp_bars[w]->arrive_and_wait();
    return r;
}
// __syncwarp: a barrier of this thread's warp
inline void emu_syncwarp() { emu_warp_bars[emu_warp_index()]->arrive_and_wait(); }
inline float rf_shfl_xor(float v, int m) { return rf_shfl(v, (emu_tid % WARP_SIZE) ^ m); }
inline int rf_shfl_xor_int(int v, int m) { return rf_shfl_int(v, (emu_tid % WARP_SIZE) ^ m); }

// Run `body` over the grid: every block with blockDim threads.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const int nt = (int)(block.x * block.y * block.z);
    const int nwarps = (nt + WARP_SIZE - 1) / WARP_SIZE;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bb(nt);
                emu_block_bar = &bb;
                emu_warp_bars.clear();
                for (int w = 0; w < nwarps; ++w)
                    emu_warp_bars.emplace_back(new std::barrier<>(std::min(WARP_SIZE, nt - w * WARP_SIZE)));
                std::vector<std::thread> th;
                th.reserve(nt);
                for (int t = 0; t < nt; ++t) {
                    th.emplace_back([&, t, bx, by, bz] {
                        emu_tid = t;
                        threadIdx.x = t % block.x;
                        threadIdx.y = (t / block.x) % block.y;
                        threadIdx.z = t / (block.x * block.y);
                        blockIdx.x = bx;
                        blockIdx.y = by;
                        blockIdx.z = bz;
                        body();
                        emu_warp_bars[t / WARP_SIZE]->arrive_and_drop();
                        emu_block_bar->arrive_and_drop();
                    });
                }
                for (auto& x : th) x.join();
            }
}
