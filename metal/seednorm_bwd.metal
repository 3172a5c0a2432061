// SeeDNorm backward (arXiv 2510.22777); DYNAMIC 0 is the RMSNorm backward. With r = RMS over the
// row (or head), xh = x / r, w = gamma + alpha * s_k, g = dL/dy and C_k = sum_{i in k} g alpha xh:
//   dx     = (w g - xh * mean_G(w g xh)) / r + (1 - s_k^2) * c * C_k * beta
//   dgamma = sum_rows g xh,  dalpha = sum_rows g xh s_k,  dbeta = sum_rows (1 - s_k^2) c C_k x
// Rows come in blocks; the float32 statistics of the forward are read, never recomputed from x.
// PARAM_GRADS 1 writes one float32 partial sum per block for each parameter (finished by
// column_sum.metal): no atomics and no (rows, D) temporary. PARAM_GRADS 0 is the frozen path.
// With RESIDUAL, x is h = x + r and the cotangent of h (grad_h) is added to dx. With several
// heads, per-head values are looked up in threadgroup memory (row_stats, head_coef): a
// per-thread array indexed at run time would live in slow thread memory.
constexpr int NSTAT = DYNAMIC ? 2 * HEADS : HEADS;
constexpr int NPARAM = DYNAMIC ? 3 : 1;
threadgroup float partial[NSTAT * LN_SIMD_SIZE];
threadgroup float total[NSTAT];
threadgroup float row_stats[NSTAT];
// Per head for the dx pass: inverse RMS, mean of w g xh, s_k, (1 - s_k^2) c C_k.
threadgroup float head_coef[4 * HEADS];

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
ushort hk[ITERS][N_READS];
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
    hk[it][i] = tile_head<HEADS>(it, i, lid, nthreads, N_READS, dims);
  }
}

for (uint row = row_begin; row < row_end; row++) {
  size_t base = size_t(row) * dims;
  // One thread per statistic fetches the row's statistics for the whole threadgroup.
  if (lid < NSTAT) {
    row_stats[lid] = stats[size_t(row) * NSTAT + lid];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float inv_rms = row_stats[0];
  float s = DYNAMIC ? row_stats[NSTAT - 1] : 0.0f;  // a single head: s follows 1/RMS

  float xv[ITERS][N_READS];
  float gv[ITERS][N_READS];
  float acc[NSTAT];
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  // Running sums of the current head, added to acc when the head changes along the tile.
  float run_w = 0.0f;
  float run_a = 0.0f;
  uint run_head = hk[0][0];
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float xi = 0.0f;
      float gi = 0.0f;
      if (col < dims) {
        xi = float(x[base + col]);
        gi = float(cotangent[base + col]);
        uint k = hk[it][i];
        if (HEADS > 1 && k != run_head) {
          add_to_head<HEADS, NSTAT>(acc, run_head, run_w, run_a);
          run_w = 0.0f;
          run_a = 0.0f;
          run_head = k;
        }
        float xh = xi * (HEADS == 1 ? inv_rms : row_stats[k]);
#if DYNAMIC
        float sk = HEADS == 1 ? s : row_stats[HEADS + k];
        run_w += gi * (wv[it][i] + av[it][i] * sk) * xh;
        run_a += gi * av[it][i] * xh;
#else
        run_w += gi * wv[it][i] * xh;
#endif
      }
      xv[it][i] = xi;
      gv[it][i] = gi;
    }
  }
  add_to_head<HEADS, NSTAT>(acc, run_head, run_w, run_a);
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);

  // Head k's coefficients, by thread k (a single head: by every thread, kept in registers).
  float row_mean = 0.0f;
  for (int k = 0; k < HEADS; k++) {
    row_mean += acc[k];
  }
  row_mean /= float(dims);
  uint k = HEADS == 1 ? 0 : lid;
  float mean = 0.0f;
  float ds = 0.0f;
  if (k < HEADS) {
    mean = HEAD_RMS ? total[k] / float(head_dim) : row_mean;
#if DYNAMIC
    float sk = HEADS == 1 ? s : row_stats[HEADS + k];
    ds = (1.0f - sk * sk) * dot_scale * total[HEADS + k];
#endif
    if (HEADS > 1) {
      head_coef[k] = row_stats[k];
      head_coef[HEADS + k] = mean;
#if DYNAMIC
      head_coef[2 * HEADS + k] = sk;
      head_coef[3 * HEADS + k] = ds;
#endif
    }
  }
  if (HEADS > 1) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      if (col < dims) {
        uint hi = hk[it][i];
        float inv = HEADS == 1 ? inv_rms : head_coef[hi];
        float mean_k = HEADS == 1 ? mean : head_coef[HEADS + hi];
        float xi = xv[it][i];
        float gi = gv[it][i];
        float xh = xi * inv;
#if DYNAMIC
        float sk = HEADS == 1 ? s : head_coef[2 * HEADS + hi];
        float ds_k = HEADS == 1 ? ds : head_coef[3 * HEADS + hi];
        float w = wv[it][i] + av[it][i] * sk;
        float dx = (w * gi - xh * mean_k) * inv + ds_k * bv[it][i];
#else
        float dx = (wv[it][i] * gi - xh * mean_k) * inv;
#endif
#if RESIDUAL
        dx += float(grad_h[base + col]);
#endif
        grad_x[base + col] = static_cast<T>(dx);
#if PARAM_GRADS
        pg[0][it][i] += gi * xh;
#if DYNAMIC
        pg[1][it][i] += gi * xh * sk;
        pg[2][it][i] += ds_k * xi;
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
