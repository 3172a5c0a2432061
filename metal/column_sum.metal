// Finishes a parameter gradient: out[j] = sum_b partials[b, j] over the per-block float32 partial
// sums, one thread per column (adjacent threads read adjacent columns), cast to the parameter dtype.
uint col = thread_position_in_grid.x;
uint blocks = uint(partials_shape[0]);
uint width = uint(partials_shape[1]);
if (col < width) {
  float acc = 0.0f;
  for (uint b = 0; b < blocks; b++) {
    acc += partials[size_t(b) * width + col];
  }
  out[col] = static_cast<TW>(acc);
}
