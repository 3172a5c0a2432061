// PatchNorm (arXiv 2512.22247), step 2: y_p = u_p / d_p with the patch divisor
//   d_p = sqrt(S_p / count + eps) (rms)   or   d_p = sqrt(S_p + 1) (AFFINE),
// S_p the sum of sum_sq over the patch of p: the PATCH positions ending at p in its sequence
// (PATCH_NDIM 1, causal) or the PATCH x PATCH window centred on p in its image (PATCH_NDIM 2,
// the extra row/column of an even window below/right), zero padded. One threadgroup per position;
// 1/d_p is kept in float32 for the backward.
threadgroup float shared_inv[1];
uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint dims = uint(u_shape[1]);
size_t row = threadgroup_position_in_grid.x;
size_t base = row * dims;

if (lid == 0) {
  float window = 0.0f;
#if PATCH_NDIM == 1
  uint length = uint(sum_sq_shape[sum_sq_ndim - 1]);
  uint pos = row % length;
  for (uint j = 0; j < PATCH && j <= pos; j++) {
    window += sum_sq[row - j];
  }
#else
  int width = sum_sq_shape[sum_sq_ndim - 1];
  int height = sum_sq_shape[sum_sq_ndim - 2];
  int pi = int((row / width) % height);
  int pj = int(row % width);
  size_t image = row - size_t(pi * width + pj);
  for (int di = -(PATCH - 1) / 2; di <= PATCH / 2; di++) {
    for (int dj = -(PATCH - 1) / 2; dj <= PATCH / 2; dj++) {
      int i = pi + di;
      int j = pj + dj;
      if (i >= 0 && i < height && j >= 0 && j < width) {
        window += sum_sq[image + size_t(i * width + j)];
      }
    }
  }
#endif
  float d_sq = AFFINE ? window + 1.0f : window / consts[1] + consts[0];
  float inv = metal::precise::rsqrt(d_sq);
  shared_inv[0] = inv;
  inv_d[row] = inv;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float inv = shared_inv[0];
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    if (col < dims) {
      y[base + col] = static_cast<T>(float(u[base + col]) * inv);
    }
  }
}
