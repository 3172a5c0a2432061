// SeeDNorm forward (arXiv 2510.22777); with DYNAMIC 0 the same template is plain RMSNorm.
//   s_k = tanh(c * <x_k, beta_k>)   y_k = (gamma_k + alpha_k * s_k) * x_k / RMS(x)
// Each threadgroup normalizes a block of rows with the parameters held in registers, so the
// parameters are read once per block and x once per row. With RESIDUAL the input is h = x + r,
// written out as well. stats[row] gets the float32 inverse RMS of each head, then (DYNAMIC) each
// s_k, for the backward pass. With several heads, the per-head values a tile element needs are
// looked up in threadgroup memory (head_stats): a per-thread array indexed at run time would
// live in slow thread memory.
constexpr int NSTAT = DYNAMIC ? 2 * HEADS : HEADS;
threadgroup float partial[NSTAT * LN_SIMD_SIZE];
threadgroup float total[NSTAT];
threadgroup float head_stats[NSTAT];

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
    hk[it][i] = tile_head<HEADS>(it, i, lid, nthreads, N_READS, dims);
  }
}

for (uint row = row_begin; row < row_end; row++) {
  size_t base = size_t(row) * dims;
  float xv[ITERS][N_READS];
  float acc[NSTAT];
  for (int j = 0; j < NSTAT; j++) {
    acc[j] = 0.0f;
  }
  // Running sums of the current head, added to acc when the head changes along the tile.
  float run_sq = 0.0f;
  float run_dot = 0.0f;
  uint run_head = hk[0][0];
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
        if (HEADS > 1 && hk[it][i] != run_head) {
          add_to_head<HEADS, NSTAT>(acc, run_head, run_sq, run_dot);
          run_sq = 0.0f;
          run_dot = 0.0f;
          run_head = hk[it][i];
        }
        run_sq += v * v;
#if DYNAMIC
        run_dot += v * bv[it][i];
#endif
      }
      xv[it][i] = v;
    }
  }
  add_to_head<HEADS, NSTAT>(acc, run_head, run_sq, run_dot);
  threadgroup_sums<NSTAT>(acc, partial, total, thread_index_in_simdgroup,
                          simdgroup_index_in_threadgroup);

  // Head k's statistics, by thread k (a single head: by every thread, kept in registers).
  float row_mean_sq = 0.0f;
  for (int k = 0; k < HEADS; k++) {
    row_mean_sq += acc[k];
  }
  row_mean_sq /= float(dims);
  uint k = HEADS == 1 ? 0 : lid;
  float inv_rms = 0.0f;
  float s = 0.0f;
  if (k < HEADS) {
    float mean_sq = HEAD_RMS ? total[k] / float(head_dim) : row_mean_sq;
    inv_rms = metal::precise::rsqrt(mean_sq + eps);
#if DYNAMIC
    s = metal::precise::tanh(total[HEADS + k] * dot_scale);
#endif
    if (HEADS > 1) {
      head_stats[k] = inv_rms;
#if DYNAMIC
      head_stats[HEADS + k] = s;
#endif
    }
    if (lid == k) {
      stats[size_t(row) * NSTAT + k] = inv_rms;
#if DYNAMIC
      stats[size_t(row) * NSTAT + HEADS + k] = s;
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
        float inv = HEADS == 1 ? inv_rms : head_stats[hk[it][i]];
#if DYNAMIC
        float sk = HEADS == 1 ? s : head_stats[HEADS + hk[it][i]];
        float gain = wv[it][i] + av[it][i] * sk;
#else
        float gain = wv[it][i];
#endif
        y[base + col] = static_cast<T>(gain * (xv[it][i] * inv));
      }
    }
  }
}
