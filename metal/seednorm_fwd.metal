// SeeDNorm forward (arXiv 2510.22777); with DYNAMIC 0 the same template is plain RMSNorm.
//   s_k = tanh(c * <x_k, beta_k>)   y_k = (gamma_k + alpha_k * s_k) * x_k / RMS(x)
// Each threadgroup normalizes a block of rows with the parameters held in registers, so the
// parameters are read once per block and x once per row. With RESIDUAL the input is h = x + r,
// written out as well. stats[row] gets the float32 inverse RMS of each head, then (DYNAMIC) each
// s_k, for the backward pass.
constexpr int NSTAT = DYNAMIC ? 2 * HEADS : HEADS;
threadgroup float partial[NSTAT * LN_SIMD_SIZE];
threadgroup float total[NSTAT];

uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint rows = uint(x_shape[0]);
uint dims = uint(x_shape[1]);
uint head_dim = dims / HEADS;
uint group_rows = (rows + threadgroups_per_grid.x - 1) / threadgroups_per_grid.x;
uint row_begin = threadgroup_position_in_grid.x * group_rows;
uint row_end = min(rows, row_begin + group_rows);
float eps = consts[0];
float dot_scale = consts[1];

float wv[ITERS][N_READS];
#if DYNAMIC
float av[ITERS][N_READS];
float bv[ITERS][N_READS];
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
  }
}

for (uint row = row_begin; row < row_end; row++) {
  size_t base = size_t(row) * dims;
  float xv[ITERS][N_READS];
  float acc[NSTAT];
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float v = 0.0f;
      if (col < dims) {
#if RESIDUAL
        // Normalize the rounded sum, exactly what the caller receives as h.
        T hv = static_cast<T>(float(x[base + col]) + float(residual[base + col]));
        h[base + col] = hv;
        v = float(hv);
#else
        v = float(x[base + col]);
#endif
        uint k = HEADS == 1 ? 0 : col / head_dim;
        acc[k] += v * v;
#if DYNAMIC
        acc[HEADS + k] += v * bv[it][i];
#endif
      }
      xv[it][i] = v;
    }
  }
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);

  float row_mean_sq = 0.0f;
  for (int k = 0; k < HEADS; k++) {
    row_mean_sq += acc[k];
  }
  row_mean_sq /= float(dims);
  float inv_rms[HEADS];
  float s[HEADS];
  for (int k = 0; k < HEADS; k++) {
    float mean_sq = HEAD_RMS ? acc[k] / float(head_dim) : row_mean_sq;
    inv_rms[k] = metal::precise::rsqrt(mean_sq + eps);
#if DYNAMIC
    s[k] = metal::precise::tanh(acc[HEADS + k] * dot_scale);
#else
    s[k] = 0.0f;
#endif
  }
  if (lid == 0) {
    for (int k = 0; k < HEADS; k++) {
      stats[size_t(row) * NSTAT + k] = inv_rms[k];
#if DYNAMIC
      stats[size_t(row) * NSTAT + HEADS + k] = s[k];
#endif
    }
  }

  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      if (col < dims) {
        uint k = HEADS == 1 ? 0 : col / head_dim;
#if DYNAMIC
        float gain = wv[it][i] + av[it][i] * s[k];
#else
        float gain = wv[it][i];
#endif
        y[base + col] = static_cast<T>(gain * (xv[it][i] * inv_rms[k]));
      }
    }
  }
}
