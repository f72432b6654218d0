// Shared helpers for the vexpert_kernels CUDA sources.
//
// Everything here is plain CUDA C++ (no ATen / c10 headers), so each .cu compiles with a bare `nvcc` and the
// resulting shared library is loaded from Python with ctypes. Launchers are `extern "C"`, take raw pointers, sizes
// and a `void*` stream (torch.cuda.current_stream().cuda_stream), and return an int: 0 = success, > 0 = a
// cudaError_t from the launch, < 0 = one of the VX_ERR_* argument errors below (checked before any launch).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define VX_API extern "C" __attribute__((visibility("default")))

enum VxDType : int { VX_F32 = 0, VX_F16 = 1, VX_BF16 = 2 };

enum VxErr : int {
  VX_OK = 0,
  VX_ERR_BAD_SIZE = -1,      // a size is <= 0 or too large for the kernel
  VX_ERR_NULL_POINTER = -2,  // a required pointer is null
  VX_ERR_BAD_DTYPE = -3,     // unsupported dtype combination
  VX_ERR_WORKSPACE = -4,     // workspace too small
  VX_ERR_TOO_WIDE = -5,      // row width exceeds what one block holds in registers
};

static inline int vx_launch_status() {
  // cudaPeekAtLastError: report a failed launch without clearing sticky state or synchronising.
  cudaError_t e = cudaPeekAtLastError();
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

// ---------------------------------------------------------------------------------------------- dtype conversion
template <typename T> struct VxConv;
template <> struct VxConv<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct VxConv<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct VxConv<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// ---------------------------------------------------------------------------------------------- vector access
// Load / store N consecutive elements as fp32. With VEC16 the N elements start on a 16-byte boundary and span a
// multiple of 16 bytes, so they move as uint4 (LDG.128 / STG.128); otherwise element by element.
template <typename T, int N, bool VEC16>
__device__ __forceinline__ void vx_load(const T* __restrict__ p, float (&out)[N]) {
  if constexpr (VEC16 && (N * sizeof(T)) % 16 == 0) {
    constexpr int CHUNKS = (N * sizeof(T)) / 16;
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < PER; ++j) out[c * PER + j] = VxConv<T>::to_f(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = VxConv<T>::to_f(p[j]);
  }
}

template <typename T, int N, bool VEC16>
__device__ __forceinline__ void vx_store(T* __restrict__ p, const float (&in)[N]) {
  if constexpr (VEC16 && (N * sizeof(T)) % 16 == 0) {
    constexpr int CHUNKS = (N * sizeof(T)) / 16;
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < PER; ++j) e[j] = VxConv<T>::from_f(in[c * PER + j]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = VxConv<T>::from_f(in[j]);
  }
}

// ---------------------------------------------------------------------------------------------- block reduction
// Sum over a block whose size is a multiple of 32 (<= 1024); every thread gets the result. `smem` holds 33 floats.
__device__ __forceinline__ float vx_block_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? smem[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) smem[32] = t;
  }
  __syncthreads();
  return smem[32];
}
