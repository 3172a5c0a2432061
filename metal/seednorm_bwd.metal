// SeeDNorm backward (arXiv 2510.22777); DYNAMIC 0 is the RMSNorm backward. With r = RMS over the
// row (or head), xh = x / r, w = gamma + alpha * s_k, g = dL/dy and C_k = sum_{i in k} g alpha xh:
//   dx     = (w g - xh * mean_G(w g xh)) / r + (1 - s_k^2) * c * C_k * beta
//   dgamma = sum_rows g xh,  dalpha = sum_rows g xh s_k,  dbeta = sum_rows (1 - s_k^2) c C_k x
// Rows come in blocks; the float32 statistics of the forward are read, never recomputed from x.
// PARAM_GRADS 1 writes one float32 partial sum per block for each parameter (finished by
// column_sum.metal): no atomics and no (rows, D) temporary. PARAM_GRADS 0 is the frozen path.
// With RESIDUAL, x is h = x + r and the cotangent of h (grad_h) is added to dx.
constexpr int NSTAT = DYNAMIC ? 2 * HEADS : HEADS;
constexpr int NPARAM = DYNAMIC ? 3 : 1;
threadgroup float partial[NSTAT * LN_SIMD_SIZE];
threadgroup float total[NSTAT];
threadgroup float row_stats[NSTAT];

uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint rows = uint(x_shape[0]);
uint dims = uint(x_shape[1]);
uint head_dim = dims / HEADS;
uint group_rows = (rows + threadgroups_per_grid.x - 1) / threadgroups_per_grid.x;
uint row_begin = threadgroup_position_in_grid.x * group_rows;
uint row_end = min(rows, row_begin + group_rows);
float dot_scale = consts[1];

float wv[ITERS][N_READS];
#if DYNAMIC
float av[ITERS][N_READS];
float bv[ITERS][N_READS];
#endif
#if PARAM_GRADS
float pg[NPARAM][ITERS][N_READS];
#endif
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    bool in_row = col < dims;
    wv[it][i] = in_row ? float(weight[col]) : 0.0f;
#if DYNAMIC
    av[it][i] = in_row ? float(alpha[col]) : 0.0f;
    bv[it][i] = in_row ? float(beta[col]) : 0.0f;
#endif
#if PARAM_GRADS
    for (int p = 0; p < NPARAM; p++) {
      pg[p][it][i] = 0.0f;
    }
#endif
  }
}

for (uint row = row_begin; row < row_end; row++) {
  size_t base = size_t(row) * dims;
  // One thread fetches the row's statistics for the whole threadgroup.
  if (lid < NSTAT) {
    row_stats[lid] = stats[size_t(row) * NSTAT + lid];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float inv_rms[HEADS];
  float s[HEADS];
  for (int k = 0; k < HEADS; k++) {
    inv_rms[k] = row_stats[k];
#if DYNAMIC
    s[k] = row_stats[HEADS + k];
#else
    s[k] = 0.0f;
#endif
  }

  float xv[ITERS][N_READS];
  float gv[ITERS][N_READS];
  float acc[NSTAT];
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float xi = 0.0f;
      float gi = 0.0f;
      if (col < dims) {
        xi = float(x[base + col]);
        gi = float(cotangent[base + col]);
        uint k = HEADS == 1 ? 0 : col / head_dim;
        float xh = xi * inv_rms[k];
#if DYNAMIC
        acc[k] += gi * (wv[it][i] + av[it][i] * s[k]) * xh;
        acc[HEADS + k] += gi * av[it][i] * xh;
#else
        acc[k] += gi * wv[it][i] * xh;
#endif
      }
      xv[it][i] = xi;
      gv[it][i] = gi;
    }
  }
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);
  float row_mean = 0.0f;
  for (int k = 0; k < HEADS; k++) {
    row_mean += acc[k];
  }
  row_mean /= float(dims);

  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      if (col < dims) {
        uint k = HEADS == 1 ? 0 : col / head_dim;
        float xi = xv[it][i];
        float gi = gv[it][i];
        float xh = xi * inv_rms[k];
        float mean = HEAD_RMS ? acc[k] / float(head_dim) : row_mean;
#if DYNAMIC
        float w = wv[it][i] + av[it][i] * s[k];
        float ds = (1.0f - s[k] * s[k]) * dot_scale * acc[HEADS + k];
        float dx = (w * gi - xh * mean) * inv_rms[k] + ds * bv[it][i];
#else
        float dx = (wv[it][i] * gi - xh * mean) * inv_rms[k];
#endif
#if RESIDUAL
        dx += float(grad_h[base + col]);
#endif
        grad_x[base + col] = static_cast<T>(dx);
#if PARAM_GRADS
        pg[0][it][i] += gi * xh;
#if DYNAMIC
        pg[1][it][i] += gi * xh * s[k];
        pg[2][it][i] += ds * xi;
#endif
#endif
      }
    }
  }
}

#if PARAM_GRADS
size_t block = threadgroup_position_in_grid.x;
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    if (col < dims) {
      for (int p = 0; p < NPARAM; p++) {
        param_partials[(block * NPARAM + p) * dims + col] = pg[p][it][i];
      }
    }
  }
}
#endif
