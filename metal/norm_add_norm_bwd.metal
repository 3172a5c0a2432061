// Peri-LN norm-add-norm backward (arXiv 2502.02732), one pass over each row. With r = RMS,
// xh = x / r, w = gamma + alpha * s, g the cotangent of a norm's output (as in seednorm_bwd):
//   dN(x, g) = (w g - xh * mean(w g xh)) / r + (1 - s^2) * c * sum(g alpha xh) * beta
//   dx = grad_h + dN_in(h, grad_y)      (the cotangent of h, and of y1 = N_out(b))
//   db = dN_out(b, dx)
//   dgamma = sum_rows g xh,  dalpha = sum_rows g xh s,  dbeta = sum_rows (1 - s^2) c C x
// for each norm at its own input and cotangent. The forward's float32 statistics are read,
// never recomputed. PARAM_GRADS 1 writes one float32 partial row per block for the parameters
// of N_out then N_in (finished by column_sum.metal); PARAM_GRADS 0 is the frozen path.
constexpr int NSTAT = DYNAMIC ? 2 : 1;
constexpr int NPARAM = DYNAMIC ? 3 : 1;
threadgroup float partial[NSTAT * LN_SIMD_SIZE];
threadgroup float total[NSTAT];
threadgroup float row_stats[2 * NSTAT];

uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint rows = uint(branch_shape[0]);
uint dims = uint(branch_shape[1]);
uint group_rows = (rows + threadgroups_per_grid.x - 1) / threadgroups_per_grid.x;
uint row_begin = threadgroup_position_in_grid.x * group_rows;
uint row_end = min(rows, row_begin + group_rows);
float dot_scale = consts[2];

float w1[ITERS][N_READS];
float w2[ITERS][N_READS];
#if DYNAMIC
float a1[ITERS][N_READS];
float b1[ITERS][N_READS];
float a2[ITERS][N_READS];
float b2[ITERS][N_READS];
#endif
#if PARAM_GRADS
float pg[2 * NPARAM][ITERS][N_READS];
#endif
for (uint it = 0; it < ITERS; it++) {
  for (uint i = 0; i < N_READS; i++) {
    uint col = tile_col(it, i, lid, nthreads, N_READS);
    bool in_row = col < dims;
    w1[it][i] = in_row ? float(out_weight[col]) : 0.0f;
    w2[it][i] = in_row ? float(in_weight[col]) : 0.0f;
#if DYNAMIC
    a1[it][i] = in_row ? float(out_alpha[col]) : 0.0f;
    b1[it][i] = in_row ? float(out_beta[col]) : 0.0f;
    a2[it][i] = in_row ? float(in_alpha[col]) : 0.0f;
    b2[it][i] = in_row ? float(in_beta[col]) : 0.0f;
#endif
#if PARAM_GRADS
    for (int p = 0; p < 2 * NPARAM; p++) {
      pg[p][it][i] = 0.0f;
    }
#endif
  }
}

for (uint row = row_begin; row < row_end; row++) {
  size_t base = size_t(row) * dims;
  // One thread per statistic fetches the row's statistics for the whole threadgroup.
  if (lid < 2 * NSTAT) {
    row_stats[lid] = stats[size_t(row) * 2 * NSTAT + lid];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float inv1 = row_stats[0];
  float s1 = DYNAMIC ? row_stats[NSTAT - 1] : 0.0f;
  float inv2 = row_stats[NSTAT];
  float s2 = DYNAMIC ? row_stats[2 * NSTAT - 1] : 0.0f;

  // The input norm's reductions at h with grad_y.
  float v[ITERS][N_READS];
  float g[ITERS][N_READS];
  float acc[NSTAT];
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float hi = 0.0f;
      float gi = 0.0f;
      if (col < dims) {
        hi = float(h[base + col]);
        gi = float(grad_y[base + col]);
      }
      float hh = hi * inv2;
#if DYNAMIC
      acc[0] += gi * (w2[it][i] + a2[it][i] * s2) * hh;
      acc[1] += gi * a2[it][i] * hh;
#else
      acc[0] += gi * w2[it][i] * hh;
#endif
      v[it][i] = hi;
      g[it][i] = gi;
    }
  }
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);
  float mean2 = acc[0] / float(dims);
  float ds2 = DYNAMIC ? (1.0f - s2 * s2) * dot_scale * acc[NSTAT - 1] : 0.0f;

  // dx = grad_h + dN_in, written out and kept as the cotangent of N_out; b replaces h.
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float bi = 0.0f;
      float dx = 0.0f;
      if (col < dims) {
        float hi = v[it][i];
        float gi = g[it][i];
        float hh = hi * inv2;
#if DYNAMIC
        dx = ((w2[it][i] + a2[it][i] * s2) * gi - hh * mean2) * inv2 + ds2 * b2[it][i];
#else
        dx = (w2[it][i] * gi - hh * mean2) * inv2;
#endif
        dx += float(grad_h[base + col]);
        grad_stream[base + col] = static_cast<T>(dx);
#if PARAM_GRADS
        pg[NPARAM][it][i] += gi * hh;
#if DYNAMIC
        pg[NPARAM + 1][it][i] += gi * hh * s2;
        pg[NPARAM + 2][it][i] += ds2 * hi;
#endif
#endif
        bi = float(branch[base + col]);
      }
      float bh = bi * inv1;
#if DYNAMIC
      acc[0] += dx * (w1[it][i] + a1[it][i] * s1) * bh;
      acc[1] += dx * a1[it][i] * bh;
#else
      acc[0] += dx * w1[it][i] * bh;
#endif
      v[it][i] = bi;
      g[it][i] = dx;
    }
  }
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);
  float mean1 = acc[0] / float(dims);
  float ds1 = DYNAMIC ? (1.0f - s1 * s1) * dot_scale * acc[NSTAT - 1] : 0.0f;

  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      if (col < dims) {
        float bi = v[it][i];
        float gi = g[it][i];
        float bh = bi * inv1;
#if DYNAMIC
        float db = ((w1[it][i] + a1[it][i] * s1) * gi - bh * mean1) * inv1 + ds1 * b1[it][i];
#else
        float db = (w1[it][i] * gi - bh * mean1) * inv1;
#endif
        grad_branch[base + col] = static_cast<T>(db);
#if PARAM_GRADS
        pg[0][it][i] += gi * bh;
#if DYNAMIC
        pg[1][it][i] += gi * bh * s1;
        pg[2][it][i] += ds1 * bi;
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
      for (int p = 0; p < 2 * NPARAM; p++) {
        param_partials[(block * 2 * NPARAM + p) * dims + col] = pg[p][it][i];
      }
    }
  }
}
#endif
