// PatchNorm backward (arXiv 2512.22247), step 2: dx_q = 2 x_q * sum_{p : q in patch(p)} q_p,
// the transpose of the forward window (the PATCH positions starting at q for PATCH_NDIM 1; the
// mirrored PATCH x PATCH window for PATCH_NDIM 2). One threadgroup per position.
threadgroup float shared_grad[1];
uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint dims = uint(x_shape[1]);
size_t row = threadgroup_position_in_grid.x;
size_t base = row * dims;

if (lid == 0) {
  float window = 0.0f;
#if PATCH_NDIM == 1
  uint length = uint(grad_sum_sq_shape[grad_sum_sq_ndim - 1]);
  uint pos = row % length;
  for (uint j = 0; j < PATCH && pos + j < length; j++) {
    window += grad_sum_sq[row + j];
  }
#else
  int width = grad_sum_sq_shape[grad_sum_sq_ndim - 1];
  int height = grad_sum_sq_shape[grad_sum_sq_ndim - 2];
  int qi = int((row / width) % height);
  int qj = int(row % width);
  size_t image = row - size_t(qi * width + qj);
  for (int di = -(PATCH / 2); di <= (PATCH - 1) / 2; di++) {
    for (int dj = -(PATCH / 2); dj <= (PATCH - 1) / 2; dj++) {
      int i = qi + di;
      int j = qj + dj;
      if (i >= 0 && i < height && j >= 0 && j < width) {
        window += grad_sum_sq[image + size_t(i * width + j)];
      }
    }
  }
#endif
  shared_grad[0] = 2.0f * window;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float scale = shared_grad[0];
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    if (col < dims) {
      grad_x[base + col] = static_cast<T>(float(x[base + col]) * scale);
    }
  }
}
