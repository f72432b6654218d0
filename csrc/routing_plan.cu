// On-device RoutingPlan build: HF expert rule, HF position ids, image-span ids, stable vision-first partition
// (perm / inv_perm), per-expert counts and offsets, seq_lens / cu_seqlens. Three launches, no host sync, no sort:
//
//   A  tile_aggregate  grid (tiles_per_row, B): per 2048-token tile, count vision tokens, position steps,
//                      image-span starts and kept tokens.
//   B  scan_tiles      one block: exclusive scans of those counts over all tiles (row-major). The vision count is
//                      scanned globally (it orders the routed rows); the others restart at each row. Writes
//                      expert_counts / expert_offsets / seq_lens / cu_seqlens.
//   C  tile_emit       grid (tiles_per_row, B): block scan inside the tile + the tile's carry-in from B, then
//                      writes every per-token output and scatters perm / routed_position_ids.
//
// Must equal vexpert_kernels/routing.py (expert_vision_mask, build_position_ids, _image_span_ids) exactly,
// including the HF quirks: the expert rule uses the raw token types (padding ignored); position ids treat masked
// positions as type -1 (they never advance the count, and they make a neighbouring vision token a boi/eoi).
#include "vexpert_common.cuh"

namespace {

constexpr int RP_THREADS = 256;
constexpr int RP_ITEMS = 8;
constexpr int RP_TILE = RP_THREADS * RP_ITEMS;  // 2048 tokens per tile

struct Agg {
  int v;  // tokens routed to the vision expert
  int s;  // position-id steps (position id = inclusive prefix of steps within the row)
  int i;  // image-span starts (span id = inclusive prefix within the row)
  int k;  // kept (non-padding) tokens
};
__host__ __device__ __forceinline__ Agg agg_add(Agg a, Agg b) { return {a.v + b.v, a.s + b.s, a.i + b.i, a.k + b.k}; }

// Token type with the anything-else-is-neither convention of the torch code: 0 language, 1 vision, 2 other.
__host__ __device__ __forceinline__ int raw_type(const int64_t* tt_row, int j) {
  const int64_t v = tt_row[j];
  return v == 0 ? 0 : (v == 1 ? 1 : 2);
}
__host__ __device__ __forceinline__ bool kept(const uint8_t* keep_row, int j) { return keep_row == nullptr || keep_row[j] != 0; }
// build_position_ids' `tmp`: masked positions become -1.
__host__ __device__ __forceinline__ int masked_type(const int64_t* tt_row, const uint8_t* keep_row, int j) {
  return kept(keep_row, j) ? raw_type(tt_row, j) : -1;
}
// `tmp` after `tmp[is_boi_eoi] = LANGUAGE`: a vision token whose left neighbour is language (or the row start) is a
// boi, one whose right neighbour is language (or the row end) is an eoi; both count as language.
__host__ __device__ __forceinline__ int relabelled_type(const int64_t* tt_row, const uint8_t* keep_row, int j, int L) {
  const int t = masked_type(tt_row, keep_row, j);
  if (t != 1) return t;
  const bool boi = (j == 0) || masked_type(tt_row, keep_row, j - 1) == 0;
  const bool eoi = (j == L - 1) || masked_type(tt_row, keep_row, j + 1) == 0;
  return (boi || eoi) ? 0 : 1;
}

struct Elem {
  bool vision;     // HF expert rule
  bool img;        // part of an image span (type 1 and kept)
  Agg a;           // this token's contribution to the scans
};

__host__ __device__ __forceinline__ Elem elem_info(const int64_t* tt_row, const uint8_t* keep_row, int j, int L) {
  Elem e;
  const int t = raw_type(tt_row, j);
  e.vision = (j < L - 1) && t == 1 && raw_type(tt_row, j + 1) == 1;
  int step = 0;
  if (j > 0) {
    const int r = relabelled_type(tt_row, keep_row, j, L);
    step = (r == 0) || (r == 1 && relabelled_type(tt_row, keep_row, j - 1, L) == 0);
  }
  const bool k = kept(keep_row, j);
  e.img = (t == 1) && k;
  const bool prev_img = j > 0 && raw_type(tt_row, j - 1) == 1 && kept(keep_row, j - 1);
  e.a = {e.vision ? 1 : 0, step, (e.img && !prev_img) ? 1 : 0, k ? 1 : 0};
  return e;
}

__device__ __forceinline__ Agg shfl_up(Agg a, int d) {
  return {__shfl_up_sync(0xffffffffu, a.v, d), __shfl_up_sync(0xffffffffu, a.s, d),
          __shfl_up_sync(0xffffffffu, a.i, d), __shfl_up_sync(0xffffffffu, a.k, d)};
}

// Exclusive scan of one Agg per thread over a block of RP_THREADS threads; also returns the block total.
// `smem` holds RP_THREADS/32 Aggs.
__device__ __forceinline__ Agg block_exclusive_scan(Agg x, Agg* smem, Agg& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Agg inc = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    Agg up = shfl_up(inc, d);
    if (lane >= d) inc = agg_add(inc, up);
  }
  __syncthreads();  // smem reuse across calls
  if (lane == 31) smem[warp] = inc;
  __syncthreads();
  Agg warp_prefix = {0, 0, 0, 0};
  total = {0, 0, 0, 0};
#pragma unroll
  for (int w = 0; w < RP_THREADS / 32; ++w) {
    if (w < warp) warp_prefix = agg_add(warp_prefix, smem[w]);
    total = agg_add(total, smem[w]);
  }
  Agg excl = agg_add(warp_prefix, inc);
  excl = {excl.v - x.v, excl.s - x.s, excl.i - x.i, excl.k - x.k};
  return excl;
}

__global__ void __launch_bounds__(RP_THREADS) tile_aggregate_kernel(const int64_t* __restrict__ tt,
                                                                    const uint8_t* __restrict__ keep, int L,
                                                                    int tiles_per_row, Agg* __restrict__ tile_agg) {
  __shared__ Agg smem[RP_THREADS / 32];
  const int b = blockIdx.y, tile = blockIdx.x;
  const int64_t* tt_row = tt + (int64_t)b * L;
  const uint8_t* keep_row = keep ? keep + (int64_t)b * L : nullptr;
  const int base = tile * RP_TILE + threadIdx.x * RP_ITEMS;
  Agg mine = {0, 0, 0, 0};
#pragma unroll
  for (int it = 0; it < RP_ITEMS; ++it) {
    const int j = base + it;
    if (j < L) mine = agg_add(mine, elem_info(tt_row, keep_row, j, L).a);
  }
  Agg total;
  block_exclusive_scan(mine, smem, total);
  if (threadIdx.x == 0) tile_agg[(int64_t)b * tiles_per_row + tile] = total;
}

// One block scans all tiles. carry[t] = (global vision prefix, row-local step prefix, row-local span prefix, -).
__global__ void __launch_bounds__(RP_THREADS) scan_tiles_kernel(const Agg* __restrict__ tile_agg, Agg* __restrict__ prefix,
                                                                Agg* __restrict__ carry, int B, int L, int tiles_per_row,
                                                                int64_t* __restrict__ expert_counts,
                                                                int32_t* __restrict__ expert_offsets,
                                                                int32_t* __restrict__ seq_lens,
                                                                int32_t* __restrict__ cu_seqlens) {
  __shared__ Agg smem[RP_THREADS / 32];
  const int n = B * tiles_per_row;
  Agg running = {0, 0, 0, 0};
  for (int start = 0; start < n; start += RP_THREADS) {
    const int t = start + threadIdx.x;
    Agg x = t < n ? tile_agg[t] : Agg{0, 0, 0, 0};
    Agg total;
    Agg excl = block_exclusive_scan(x, smem, total);
    if (t < n) prefix[t] = agg_add(running, excl);
    running = agg_add(running, total);
  }
  __syncthreads();  // prefix[] (global memory, this block's writes) is visible to the whole block after this
  for (int t = threadIdx.x; t < n; t += RP_THREADS) {
    const Agg p = prefix[t], row0 = prefix[(t / tiles_per_row) * tiles_per_row];
    carry[t] = {p.v, p.s - row0.s, p.i - row0.i, 0};
  }
  for (int b = threadIdx.x; b < B; b += RP_THREADS) {
    const int first = prefix[b * tiles_per_row].k;
    const int next = (b + 1 < B) ? prefix[(b + 1) * tiles_per_row].k : running.k;
    seq_lens[b] = next - first;
    cu_seqlens[b] = first;
  }
  if (threadIdx.x == 0) {
    const int T = B * L;
    cu_seqlens[B] = running.k;
    expert_counts[0] = running.v;
    expert_counts[1] = (int64_t)T - running.v;
    expert_offsets[0] = 0;
    expert_offsets[1] = running.v;
    expert_offsets[2] = T;
  }
}

__global__ void __launch_bounds__(RP_THREADS) tile_emit_kernel(
    const int64_t* __restrict__ tt, const uint8_t* __restrict__ keep, int L, int tiles_per_row,
    const Agg* __restrict__ carry, const int64_t* __restrict__ expert_counts, uint8_t* __restrict__ vision_mask,
    int64_t* __restrict__ position_ids, int64_t* __restrict__ perm, int64_t* __restrict__ inv_perm,
    int64_t* __restrict__ routed_position_ids, int32_t* __restrict__ image_span_ids) {
  __shared__ Agg smem[RP_THREADS / 32];
  const int b = blockIdx.y, tile = blockIdx.x;
  const int64_t* tt_row = tt + (int64_t)b * L;
  const uint8_t* keep_row = keep ? keep + (int64_t)b * L : nullptr;
  const int base = tile * RP_TILE + threadIdx.x * RP_ITEMS;
  Elem e[RP_ITEMS];
  Agg mine = {0, 0, 0, 0};
#pragma unroll
  for (int it = 0; it < RP_ITEMS; ++it) {
    const int j = base + it;
    if (j < L) {
      e[it] = elem_info(tt_row, keep_row, j, L);
    } else {
      e[it].vision = false;
      e[it].img = false;
      e[it].a = {0, 0, 0, 0};
    }
    mine = agg_add(mine, e[it].a);
  }
  Agg total;
  Agg run = agg_add(carry[(int64_t)b * tiles_per_row + tile], block_exclusive_scan(mine, smem, total));
  const int64_t n_vision = expert_counts[0];
#pragma unroll
  for (int it = 0; it < RP_ITEMS; ++it) {
    const int j = base + it;
    if (j >= L) break;
    run = agg_add(run, e[it].a);  // now inclusive of this token
    const int64_t s = (int64_t)b * L + j;
    const int64_t vision_before = run.v - e[it].a.v;  // vision tokens strictly before s (all rows)
    const int64_t dst = e[it].vision ? vision_before : n_vision + (s - vision_before);
    vision_mask[s] = e[it].vision ? 1 : 0;
    position_ids[s] = run.s;
    image_span_ids[s] = e[it].img ? run.i : 0;
    perm[dst] = s;
    inv_perm[s] = dst;
    routed_position_ids[dst] = run.s;
  }
}

inline int tiles_per_row_for(int64_t L) { return (int)((L + RP_TILE - 1) / RP_TILE); }

}  // namespace

// Bytes of device workspace vx_routing_plan needs (3 Agg per tile).
VX_API int64_t vx_routing_plan_workspace_bytes(int64_t B, int64_t L) {
  if (B <= 0 || L <= 0) return 0;
  return (int64_t)3 * B * tiles_per_row_for(L) * (int64_t)sizeof(Agg);
}

// token_type_ids int64 [B, L] contiguous; keep uint8/bool [B, L] or null (no padding).
// Outputs (all contiguous, on the same device): vision_mask bool [B, L], position_ids int64 [B, L], perm int64 [T],
// inv_perm int64 [T], expert_counts int64 [2], expert_offsets int32 [3], routed_position_ids int64 [T],
// image_span_ids int32 [B, L], seq_lens int32 [B], cu_seqlens int32 [B + 1]. T = B * L < 2^31.
VX_API int vx_routing_plan(const int64_t* token_type_ids, const uint8_t* keep, int64_t B, int64_t L,
                           uint8_t* vision_mask, int64_t* position_ids, int64_t* perm, int64_t* inv_perm,
                           int64_t* expert_counts, int32_t* expert_offsets, int64_t* routed_position_ids,
                           int32_t* image_span_ids, int32_t* seq_lens, int32_t* cu_seqlens, void* workspace,
                           int64_t workspace_bytes, void* stream) {
  if (B <= 0 || L <= 0 || B * L >= ((int64_t)1 << 31) || B > 65535) return VX_ERR_BAD_SIZE;
  if (!token_type_ids || !vision_mask || !position_ids || !perm || !inv_perm || !expert_counts || !expert_offsets ||
      !routed_position_ids || !image_span_ids || !seq_lens || !cu_seqlens || !workspace)
    return VX_ERR_NULL_POINTER;
  if (workspace_bytes < vx_routing_plan_workspace_bytes(B, L)) return VX_ERR_WORKSPACE;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int tpr = tiles_per_row_for(L);
  const int64_t n = B * tpr;
  Agg* tile_agg = reinterpret_cast<Agg*>(workspace);
  Agg* prefix = tile_agg + n;
  Agg* carry = prefix + n;
  const dim3 grid(tpr, (unsigned)B);
  tile_aggregate_kernel<<<grid, RP_THREADS, 0, s>>>(token_type_ids, keep, (int)L, tpr, tile_agg);
  scan_tiles_kernel<<<1, RP_THREADS, 0, s>>>(tile_agg, prefix, carry, (int)B, (int)L, tpr, expert_counts,
                                             expert_offsets, seq_lens, cu_seqlens);
  tile_emit_kernel<<<grid, RP_THREADS, 0, s>>>(token_type_ids, keep, (int)L, tpr, carry, expert_counts, vision_mask,
                                               position_ids, perm, inv_perm, routed_position_ids, image_span_ids);
  return vx_launch_status();
}

// Host-side twin of the per-token logic, for CPU tests of the HF rules (no GPU needed): fills the per-token outputs
// with the same element function and a sequential scan. Arrays as in vx_routing_plan, host memory.
VX_API int vx_routing_plan_host(const int64_t* token_type_ids, const uint8_t* keep, int64_t B, int64_t L,
                                uint8_t* vision_mask, int64_t* position_ids, int64_t* perm, int64_t* inv_perm,
                                int32_t* image_span_ids) {
  if (B <= 0 || L <= 0) return VX_ERR_BAD_SIZE;
  int64_t n_vision = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int j = 0; j < L; ++j)
      n_vision += elem_info(token_type_ids + b * L, keep ? keep + b * L : nullptr, j, (int)L).vision;
  int64_t vis_before = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* tt_row = token_type_ids + b * L;
    const uint8_t* keep_row = keep ? keep + b * L : nullptr;
    int64_t pos = 0, span = 0;
    for (int j = 0; j < L; ++j) {
      const Elem e = elem_info(tt_row, keep_row, j, (int)L);
      const int64_t s = b * L + j;
      pos += e.a.s;
      span += e.a.i;
      const int64_t dst = e.vision ? vis_before : n_vision + (s - vis_before);
      vis_before += e.a.v;
      vision_mask[s] = e.vision;
      position_ids[s] = pos;
      image_span_ids[s] = e.img ? (int32_t)span : 0;
      perm[dst] = s;
      inv_perm[s] = dst;
    }
  }
  return 0;
}

VX_API const char* vx_error_string(int code) {
  switch (code) {
    case VX_OK: return "ok";
    case VX_ERR_BAD_SIZE: return "bad size (<= 0 or too large)";
    case VX_ERR_NULL_POINTER: return "null pointer for a required argument";
    case VX_ERR_BAD_DTYPE: return "unsupported dtype combination";
    case VX_ERR_WORKSPACE: return "workspace too small";
    case VX_ERR_TOO_WIDE: return "row too wide for one block";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}
