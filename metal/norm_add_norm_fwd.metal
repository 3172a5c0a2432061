// Peri-LN norm-add-norm forward (arXiv 2502.02732): the output norm of one sub-layer, the
// residual add and the input norm of the next, in one pass. DYNAMIC 1: both norms are SeeDNorm
// (arXiv 2510.22777, one head), DYNAMIC 0: both are RMSNorm.
//   y1 = (w1 + a1 s1) b / RMS(b),  s1 = tanh(c <b, beta1>)
//   h  = x + y1                     (y1 rounded to T first, as the unfused modules return it)
//   y  = (w2 + a2 s2) h / RMS(h),  s2 = tanh(c <h, beta2>)
// Reads branch and stream once, writes h and y once. Each threadgroup takes a block of rows with
// both norms' parameters in registers. stats[row] gets 1/RMS(b), [s1], 1/RMS(h), [s2] in float32.
constexpr int NSTAT = DYNAMIC ? 2 : 1;
threadgroup float partial[NSTAT * LN_SIMD_SIZE];
threadgroup float total[NSTAT];

uint lid = thread_position_in_threadgroup.x;
uint nthreads = threads_per_threadgroup.x;
uint rows = uint(branch_shape[0]);
uint dims = uint(branch_shape[1]);
uint group_rows = (rows + threadgroups_per_grid.x - 1) / threadgroups_per_grid.x;
uint row_begin = threadgroup_position_in_grid.x * group_rows;
uint row_end = min(rows, row_begin + group_rows);
float eps_out = consts[0];
float eps_in = consts[1];
float dot_scale = consts[2];

float w1[ITERS][N_READS];
float w2[ITERS][N_READS];
#if DYNAMIC
float a1[ITERS][N_READS];
float b1[ITERS][N_READS];
float a2[ITERS][N_READS];
float b2[ITERS][N_READS];
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
  }
}

for (uint row = row_begin; row < row_end; row++) {
  size_t base = size_t(row) * dims;
  float v[ITERS][N_READS];
  float acc[NSTAT];
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float bi = col < dims ? float(branch[base + col]) : 0.0f;
      acc[0] += bi * bi;
#if DYNAMIC
      acc[1] += bi * b1[it][i];
#endif
      v[it][i] = bi;
    }
  }
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);
  float inv1 = metal::precise::rsqrt(acc[0] / float(dims) + eps_out);
  float s1 = DYNAMIC ? metal::precise::tanh(acc[NSTAT - 1] * dot_scale) : 0.0f;

  // h = x + N_out(b), kept in the tile for the input norm.
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      float hf = 0.0f;
      if (col < dims) {
#if DYNAMIC
        float gain = w1[it][i] + a1[it][i] * s1;
#else
        float gain = w1[it][i];
#endif
        T y1 = static_cast<T>(gain * (v[it][i] * inv1));
        T hv = static_cast<T>(float(stream[base + col]) + float(y1));
        h[base + col] = hv;
        hf = float(hv);
      }
      acc[0] += hf * hf;
#if DYNAMIC
      acc[1] += hf * b2[it][i];
#endif
      v[it][i] = hf;
    }
  }
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);
  float inv2 = metal::precise::rsqrt(acc[0] / float(dims) + eps_in);
  float s2 = DYNAMIC ? metal::precise::tanh(acc[NSTAT - 1] * dot_scale) : 0.0f;
  if (lid == 0) {
    stats[size_t(row) * 2 * NSTAT] = inv1;
    stats[size_t(row) * 2 * NSTAT + NSTAT] = inv2;
#if DYNAMIC
    stats[size_t(row) * 2 * NSTAT + 1] = s1;
    stats[size_t(row) * 2 * NSTAT + NSTAT + 1] = s2;
#endif
  }

  for (uint it = 0; it < ITERS; it++) {
    for (uint i = 0; i < N_READS; i++) {
      uint col = tile_col(it, i, lid, nthreads, N_READS);
      if (col < dims) {
#if DYNAMIC
        float gain = w2[it][i] + a2[it][i] * s2;
#else
        float gain = w2[it][i];
#endif
        y[base + col] = static_cast<T>(gain * (v[it][i] * inv2));
      }
    }
  }
}
