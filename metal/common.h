// Shared helpers for the mlx_localnorm kernel bodies (passed to mx.fast.metal_kernel as header=).
//
// Every row kernel keeps a register tile of ITERS x N_READS elements per thread: element i of
// iteration it sits at column (it * threads + lid) * N_READS + i, so each iteration reads a
// contiguous, coalesced span of the row. ITERS = 1 is MLX's single-row kernel; ITERS > 1 is the
// looped kernel for wide rows, still reading the row once because the tile stays in registers.

#define LN_SIMD_SIZE 32

// Column of register-tile element (it, i) for thread lid of a threadgroup with nthreads threads.
inline uint tile_col(uint it, uint i, uint lid, uint nthreads, uint n_reads) {
  return (it * nthreads + lid) * n_reads + i;
}

// Sums NSTAT per-thread values over the threadgroup in one two-level reduction: simd_sum within
// each simdgroup, one partial per simdgroup in threadgroup memory, simdgroup 0 sums the partials.
// `partial` holds NSTAT * 32 floats and `total` NSTAT floats; every thread gets the totals back.
template <int NSTAT>
inline void threadgroup_sums(
    thread float* values,
    threadgroup float* partial,
    threadgroup float* total,
    uint simd_lane,
    uint simd_group) {
  for (int j = 0; j < NSTAT; j++) {
    values[j] = simd_sum(values[j]);
  }
  // A threadgroup may have fewer than 32 simdgroups: clear every partial slot first.
  if (simd_group == 0) {
    for (int j = 0; j < NSTAT; j++) {
      partial[j * LN_SIMD_SIZE + simd_lane] = 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_lane == 0) {
    for (int j = 0; j < NSTAT; j++) {
      partial[j * LN_SIMD_SIZE + simd_group] = values[j];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_group == 0) {
    for (int j = 0; j < NSTAT; j++) {
      float t = simd_sum(partial[j * LN_SIMD_SIZE + simd_lane]);
      if (simd_lane == 0) {
        total[j] = t;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int j = 0; j < NSTAT; j++) {
    values[j] = total[j];
  }
}
