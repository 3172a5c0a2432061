"""Kernels written in MLX's own style, run by the emulator's tests, benchmark and docs.

`RMS_NORM_SOURCE` follows `mlx/backend/metal/kernels/rms_norm.metal` (ml-explore/mlx): N_READS
values per thread, `simd_sum` -> one partial per simdgroup in threadgroup memory (zeroed by
simdgroup 0, a threadgroup may have fewer than 32 simdgroups) -> barrier -> simdgroup 0 sums
the partials -> barrier -> scale: `y = w * x / sqrt(mean(x^2) + eps)` (arXiv 1910.07467).
"""

from __future__ import annotations

RMS_NORM_INPUTS = ("x", "w", "eps")
RMS_NORM_OUTPUTS = ("out",)
RMS_NORM_SOURCE = """
  constexpr int N_READS = 4;
  constexpr int SIMD_SIZE = 32;
  uint gid = threadgroup_position_in_grid.x;
  uint lid = thread_position_in_threadgroup.x;
  uint simd_lane_id = thread_index_in_simdgroup;
  uint simd_group_id = simdgroup_index_in_threadgroup;
  uint lsize = threads_per_threadgroup.x;
  int axis_size = x_shape[x_ndim - 1];
  threadgroup float local_inv_mean[1];
  threadgroup float local_sums[SIMD_SIZE];

  // Indexed from the buffer itself, not through a `device T*` variable: MLX binds an input of
  // fewer than 8 elements in the constant address space, where such a pointer does not compile.
  size_t row = gid * size_t(axis_size);
  float acc = 0;
  for (int r = 0; r < axis_size; r += lsize * N_READS) {
    if (r + int(lid * N_READS) + N_READS <= axis_size) {
      for (int i = 0; i < N_READS; i++) {
        float xi = x[row + r + lid * N_READS + i];
        acc += xi * xi;
      }
    } else {
      for (int i = 0; i < N_READS; i++) {
        if (r + int(lid * N_READS) + i < axis_size) {
          float xi = x[row + r + lid * N_READS + i];
          acc += xi * xi;
        }
      }
    }
  }
  acc = simd_sum(acc);
  if (simd_group_id == 0) {
    local_sums[simd_lane_id] = 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_lane_id == 0) {
    local_sums[simd_group_id] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_group_id == 0) {
    acc = simd_sum(local_sums[simd_lane_id]);
    if (simd_lane_id == 0) {
      local_inv_mean[0] = metal::precise::rsqrt(acc / axis_size + eps);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int r = 0; r < axis_size; r += lsize * N_READS) {
    for (int i = 0; i < N_READS; i++) {
      int c = r + lid * N_READS + i;
      if (c < axis_size) {
        out[row + c] = static_cast<T>(w[c] * static_cast<T>(x[row + c] * local_inv_mean[0]));
      }
    }
  }
"""

# y = x, four floats per thread: the emulator's count must be exactly one read and one write.
COPY_FLOAT4_SOURCE = """
  uint i = thread_position_in_grid.x;
  const device float4* src = (const device float4*)(x);
  device float4* dst = reinterpret_cast<device float4*>(out);
  dst[i] = src[i];
"""


def rms_norm_geometry(rows: int, dims: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) as MLX launches its RMSNorm: one threadgroup of
    32 * ceil(ceil(dims / 4) / 32) threads (at most 1024) per row."""
    groups_of_four = -(-dims // 4)
    threads = min(1024, 32 * -(-groups_of_four // 32))
    return (rows * threads, 1, 1), (threads, 1, 1)
