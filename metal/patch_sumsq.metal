// PatchNorm (arXiv 2512.22247), step 1: the float32 sum of squares over the channels of each
// position, sum_c x_c^2, one threadgroup per position. The patch is a window of these sums.
threadgroup float partial[LN_SIMD_SIZE];
threadgroup float total[1];
uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint dims = uint(x_shape[1]);
size_t row = threadgroup_position_in_grid.x;
size_t base = row * dims;

float acc[1] = {0.0f};
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    if (col < dims) {
      float v = float(x[base + col]);
      acc[0] += v * v;
    }
  }
}
threadgroup_sums<1>(acc, partial, total, thread_index_in_simdgroup,
                    simdgroup_index_in_threadgroup);
if (lid == 0) {
  sum_sq[row] = acc[0];
}
