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

// acc[k] += a and, with two statistics per head (NSTAT = 2 HEADS), acc[HEADS + k] += b, for a head
// k known only at run time, without indexing acc at run time (which would move the per-thread
// array out of registers into slow thread memory): one predicated add per head, unrolled.
template <int HEADS, int NSTAT>
inline void add_to_head(thread float* acc, uint k, float a, float b) {
  for (int h = 0; h < HEADS; h++) {
    if (uint(h) == k) {
      acc[h] += a;
      if (NSTAT > HEADS) {
        acc[HEADS + h] += b;
      }
    }
  }
}

// Head of register-tile element (it, i): it depends on the column only, so the kernels compute it
// once, before their row loop. Columns past the row end get the last head (they are masked).
template <int HEADS>
inline ushort tile_head(uint it, uint i, uint lid, uint nthreads, uint n_reads, uint dims) {
  uint col = min(tile_col(it, i, lid, nthreads, n_reads), dims - 1);
  return HEADS == 1 ? 0 : ushort(col / (dims / HEADS));
}
