// Fused RMSNorm (+ permute into routed order), forward and backward, HF casting:
//   y = (w * (x32 * rsqrt(mean(x32^2) + eps))).to(x.dtype)       (fp32 math, one rounding at the end)
// Forward reads row s in sequence order and writes routed row dst_index[s] (dst_index = plan.inv_perm; null =
// identity, i.e. plain RMSNorm); rstd is saved per source row (fp32). Backward reads dY at dst_index[s] and writes dX
// in sequence order; dW is summed per block into fp32 partials and reduced by a second kernel in a fixed order, so
// it is deterministic (no atomics).
//
// Layout: one block per row (forward); each thread owns VPT vectors of VEC contiguous columns, strided by the
// block (vector v = threadIdx.x + k * blockDim.x), so a warp's loads are contiguous 16-byte accesses. The whole row
// lives in registers (D <= 1024 * VPT * VEC), so x is read from DRAM exactly once.
#include "vexpert_common.cuh"

namespace {

template <typename TX, typename TW, int VEC, int VPT, bool VEC16>
__global__ void rmsnorm_fwd_kernel(const TX* __restrict__ x, const TW* __restrict__ w, TX* __restrict__ y,
                                   float* __restrict__ rstd, const int64_t* __restrict__ dst_index, int64_t rows,
                                   int D, float eps) {
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const TX* xr = x + row * D;
    float xv[VPT][VEC];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < D) {
        vx_load<TX, VEC, VEC16>(xr + c, xv[k]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += xv[k][j] * xv[k][j];
      }
    }
    const float r = rsqrtf(vx_block_sum(ss, red) / (float)D + eps);
    const int64_t out_row = dst_index ? dst_index[row] : row;
    TX* yr = y + out_row * D;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < D) {
        float wv[VEC];
        vx_load<TW, VEC, VEC16>(w + c, wv);
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = wv[j] * (xv[k][j] * r);  // HF: weight * (x32 * rstd), then cast
        vx_store<TX, VEC, VEC16>(yr + c, o);
      }
    }
    if (threadIdx.x == 0) rstd[row] = r;
  }
}

// dX = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd. Block b owns rows [b*rpb, (b+1)*rpb).
template <typename TX, typename TW, int VEC, int VPT, bool VEC16>
__global__ void rmsnorm_bwd_kernel(const TX* __restrict__ dy, const TX* __restrict__ x, const TW* __restrict__ w,
                                   const float* __restrict__ rstd, const int64_t* __restrict__ dst_index,
                                   TX* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows, int D,
                                   int64_t rows_per_block) {
  __shared__ float red[33];
  float wv[VPT][VEC], acc[VPT][VEC];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[k][j] = 0.f, wv[k][j] = 0.f;
    if (c < D) vx_load<TW, VEC, VEC16>(w + c, wv[k]);
  }
  const int64_t r0 = blockIdx.x * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  for (int64_t row = r0; row < r1; ++row) {
    const float r = rstd[row];
    const TX* xr = x + row * D;
    const TX* dyr = dy + (dst_index ? dst_index[row] : row) * D;
    float xh[VPT][VEC], g[VPT][VEC];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < D) {
        float dv[VEC];
        vx_load<TX, VEC, VEC16>(xr + c, xh[k]);
        vx_load<TX, VEC, VEC16>(dyr + c, dv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xh[k][j] *= r;
          g[k][j] = dv[j] * wv[k][j];
          acc[k][j] += dv[j] * xh[k][j];
          dot += g[k][j] * xh[k][j];
        }
      }
    }
    const float c_mean = vx_block_sum(dot, red) / (float)D;
    TX* dxr = dx + row * D;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < D) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = r * (g[k][j] - xh[k][j] * c_mean);
        vx_store<TX, VEC, VEC16>(dxr + c, o);
      }
    }
  }
  float* pr = dw_partial + (int64_t)blockIdx.x * D;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < D) vx_store<float, VEC, VEC16>(pr + c, acc[k]);
  }
}

// dW[c] = sum over blocks, in block order (deterministic). Coalesced: consecutive threads, consecutive columns.
template <typename TW>
__global__ void dw_reduce_kernel(const float* __restrict__ dw_partial, TW* __restrict__ dw, int nblocks, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  float s = 0.f;
  for (int b = 0; b < nblocks; ++b) s += dw_partial[(int64_t)b * D + c];
  dw[c] = VxConv<TW>::from_f(s);
}

// Threads per row and vectors per thread: aim for ~128 threads with up to 8 vectors each (16-byte vectors on the
// aligned path), so a 4096-wide bf16 row is 128 threads x 4 x LDG.128.
struct RowLayout {
  int threads, vpt;
};
// The backward holds 4 row-sized register arrays (x-hat, g, w, dW accumulators), so it aims for 256 threads to stay
// under the register budget at D = 4096..8192.
inline bool pick_layout(int nvec, int target_threads, RowLayout& out) {
  for (int vpt : {1, 2, 4, 8}) {
    const int t = (nvec + vpt - 1) / vpt;
    if (t <= target_threads || vpt == 8) {
      const int threads = ((t + 31) / 32) * 32;
      if (threads > 1024) return false;
      out = {threads < 32 ? 32 : threads, vpt};
      return true;
    }
  }
  return false;
}

template <typename TX, typename TW, int VEC, bool VEC16>
int launch_fwd_vec(const void* x, const void* w, void* y, float* rstd, const int64_t* dst, int64_t rows, int D,
                   float eps, cudaStream_t s) {
  RowLayout lay;
  if (!pick_layout((D + VEC - 1) / VEC, 128, lay)) return VX_ERR_TOO_WIDE;
  const unsigned grid = (unsigned)(rows < (int64_t)INT32_MAX ? rows : (int64_t)INT32_MAX);
  auto X = static_cast<const TX*>(x);
  auto W = static_cast<const TW*>(w);
  auto Y = static_cast<TX*>(y);
  switch (lay.vpt) {
    case 1: rmsnorm_fwd_kernel<TX, TW, VEC, 1, VEC16><<<grid, lay.threads, 0, s>>>(X, W, Y, rstd, dst, rows, D, eps); break;
    case 2: rmsnorm_fwd_kernel<TX, TW, VEC, 2, VEC16><<<grid, lay.threads, 0, s>>>(X, W, Y, rstd, dst, rows, D, eps); break;
    case 4: rmsnorm_fwd_kernel<TX, TW, VEC, 4, VEC16><<<grid, lay.threads, 0, s>>>(X, W, Y, rstd, dst, rows, D, eps); break;
    default: rmsnorm_fwd_kernel<TX, TW, VEC, 8, VEC16><<<grid, lay.threads, 0, s>>>(X, W, Y, rstd, dst, rows, D, eps); break;
  }
  return vx_launch_status();
}

template <typename TX, typename TW, int VEC, bool VEC16>
int launch_bwd_vec(const void* dy, const void* x, const void* w, const float* rstd, const int64_t* dst, void* dx,
                   void* dw, float* partial, int64_t rows, int D, int nblocks, cudaStream_t s) {
  RowLayout lay;
  if (!pick_layout((D + VEC - 1) / VEC, 256, lay)) return VX_ERR_TOO_WIDE;
  const int64_t rpb = (rows + nblocks - 1) / nblocks;
  auto DY = static_cast<const TX*>(dy);
  auto X = static_cast<const TX*>(x);
  auto W = static_cast<const TW*>(w);
  auto DX = static_cast<TX*>(dx);
  switch (lay.vpt) {
    case 1: rmsnorm_bwd_kernel<TX, TW, VEC, 1, VEC16><<<nblocks, lay.threads, 0, s>>>(DY, X, W, rstd, dst, DX, partial, rows, D, rpb); break;
    case 2: rmsnorm_bwd_kernel<TX, TW, VEC, 2, VEC16><<<nblocks, lay.threads, 0, s>>>(DY, X, W, rstd, dst, DX, partial, rows, D, rpb); break;
    case 4: rmsnorm_bwd_kernel<TX, TW, VEC, 4, VEC16><<<nblocks, lay.threads, 0, s>>>(DY, X, W, rstd, dst, DX, partial, rows, D, rpb); break;
    default: rmsnorm_bwd_kernel<TX, TW, VEC, 8, VEC16><<<nblocks, lay.threads, 0, s>>>(DY, X, W, rstd, dst, DX, partial, rows, D, rpb); break;
  }
  int rc = vx_launch_status();
  if (rc) return rc;
  dw_reduce_kernel<TW><<<(D + 255) / 256, 256, 0, s>>>(partial, static_cast<TW*>(dw), nblocks, D);
  return vx_launch_status();
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-byte path when every row starts on a 16-byte boundary (D * sizeof(TX) % 16 == 0, and likewise for the fp32
// weight / partials), else a scalar path (odd D such as 72 x fp32 still vectorises; 100 x bf16 does not).
template <typename TX, typename TW>
int fwd_typed(const void* x, const void* w, void* y, float* rstd, const int64_t* dst, int64_t rows, int D, float eps,
              cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(TX);
  if (D % VEC == 0 && aligned16(x) && aligned16(w) && aligned16(y))
    return launch_fwd_vec<TX, TW, VEC, true>(x, w, y, rstd, dst, rows, D, eps, s);
  return launch_fwd_vec<TX, TW, 1, false>(x, w, y, rstd, dst, rows, D, eps, s);
}

template <typename TX, typename TW>
int bwd_typed(const void* dy, const void* x, const void* w, const float* rstd, const int64_t* dst, void* dx, void* dw,
              float* partial, int64_t rows, int D, int nblocks, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(TX);
  if (D % VEC == 0 && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(dx) && aligned16(partial))
    return launch_bwd_vec<TX, TW, VEC, true>(dy, x, w, rstd, dst, dx, dw, partial, rows, D, nblocks, s);
  return launch_bwd_vec<TX, TW, 1, false>(dy, x, w, rstd, dst, dx, dw, partial, rows, D, nblocks, s);
}

}  // namespace

// Largest row width the kernels take for an x dtype (aligned path; the scalar path takes 8192).
VX_API int vx_rmsnorm_max_dim(int x_dtype, int aligned) {
  const int elt = x_dtype == VX_F32 ? 4 : 2;
  return 1024 * 8 * (aligned ? 16 / elt : 1);
}

// x [rows, D] (sequence order), w [D] (x's dtype or fp32), y [rows, D] (row dst_index[s] <- row s; dst_index null =
// identity), rstd fp32 [rows]. dtype codes: 0 fp32, 1 fp16, 2 bf16.
VX_API int vx_rmsnorm_fwd(const void* x, const void* w, void* y, float* rstd, const int64_t* dst_index, int64_t rows,
                          int64_t D, double eps, int x_dtype, int w_dtype, void* stream) {
  if (rows <= 0 || D <= 0 || D > (1 << 20)) return VX_ERR_BAD_SIZE;
  if (!x || !w || !y || !rstd) return VX_ERR_NULL_POINTER;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int d = (int)D;
  const float e = (float)eps;
  if (x_dtype == VX_F32 && w_dtype == VX_F32) return fwd_typed<float, float>(x, w, y, rstd, dst_index, rows, d, e, s);
  if (x_dtype == VX_F16 && w_dtype == VX_F16) return fwd_typed<__half, __half>(x, w, y, rstd, dst_index, rows, d, e, s);
  if (x_dtype == VX_F16 && w_dtype == VX_F32) return fwd_typed<__half, float>(x, w, y, rstd, dst_index, rows, d, e, s);
  if (x_dtype == VX_BF16 && w_dtype == VX_BF16)
    return fwd_typed<__nv_bfloat16, __nv_bfloat16>(x, w, y, rstd, dst_index, rows, d, e, s);
  if (x_dtype == VX_BF16 && w_dtype == VX_F32) return fwd_typed<__nv_bfloat16, float>(x, w, y, rstd, dst_index, rows, d, e, s);
  return VX_ERR_BAD_DTYPE;
}

// dy [rows, D] in output order (row dst_index[s] holds the gradient of source row s), x / rstd as saved by the
// forward, dx [rows, D] in source order, dw [D] in w's dtype. workspace: fp32 [nblocks, D] (16-byte aligned).
VX_API int vx_rmsnorm_bwd(const void* dy, const void* x, const void* w, const float* rstd, const int64_t* dst_index,
                          void* dx, void* dw, float* workspace, int64_t workspace_bytes, int64_t rows, int64_t D,
                          int nblocks, int x_dtype, int w_dtype, void* stream) {
  if (rows <= 0 || D <= 0 || D > (1 << 20) || nblocks <= 0 || nblocks > rows) return VX_ERR_BAD_SIZE;
  if (!dy || !x || !w || !rstd || !dx || !dw || !workspace) return VX_ERR_NULL_POINTER;
  if (workspace_bytes < (int64_t)nblocks * D * (int64_t)sizeof(float)) return VX_ERR_WORKSPACE;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int d = (int)D;
  if (x_dtype == VX_F32 && w_dtype == VX_F32)
    return bwd_typed<float, float>(dy, x, w, rstd, dst_index, dx, dw, workspace, rows, d, nblocks, s);
  if (x_dtype == VX_F16 && w_dtype == VX_F16)
    return bwd_typed<__half, __half>(dy, x, w, rstd, dst_index, dx, dw, workspace, rows, d, nblocks, s);
  if (x_dtype == VX_F16 && w_dtype == VX_F32)
    return bwd_typed<__half, float>(dy, x, w, rstd, dst_index, dx, dw, workspace, rows, d, nblocks, s);
  if (x_dtype == VX_BF16 && w_dtype == VX_BF16)
    return bwd_typed<__nv_bfloat16, __nv_bfloat16>(dy, x, w, rstd, dst_index, dx, dw, workspace, rows, d, nblocks, s);
  if (x_dtype == VX_BF16 && w_dtype == VX_F32)
    return bwd_typed<__nv_bfloat16, float>(dy, x, w, rstd, dst_index, dx, dw, workspace, rows, d, nblocks, s);
  return VX_ERR_BAD_DTYPE;
}
