// PatchNorm backward (arXiv 2512.22247), step 1, for y_p = u_p / d_p:
//   du_p = g_p / d_p   and   q_p = dL/dS_p = -(sum_c g_pc u_pc) / (2 n d_p^3),
// n = count in mode rms (d_p^2 = S_p / n + eps), 1 in mode affine (d_p^2 = S_p + 1); the caller
// passes 1 / (2 n) in consts[2]. One threadgroup per position, reading the forward's 1/d_p.
threadgroup float partial[LN_SIMD_SIZE];
threadgroup float total[1];
uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint dims = uint(u_shape[1]);
size_t row = threadgroup_position_in_grid.x;
size_t base = row * dims;
float inv = inv_d[row];

float acc[1] = {0.0f};
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    if (col < dims) {
      float gi = float(cotangent[base + col]);
      acc[0] += gi * float(u[base + col]);
      grad_u[base + col] = static_cast<T>(gi * inv);
    }
  }
}
threadgroup_sums<1>(acc, partial, total, thread_index_in_simdgroup,
                    simdgroup_index_in_threadgroup);
if (lid == 0) {
  grad_sum_sq[row] = -acc[0] * inv * inv * inv * consts[2];
}
