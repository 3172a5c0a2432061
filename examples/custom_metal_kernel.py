"""Write a custom Metal kernel and run it on any machine with `ln.emulate.metal_kernel`.

    python examples/custom_metal_kernel.py

`ln.emulate.metal_kernel` takes the same arguments and call as `mx.fast.metal_kernel`, and runs
the Metal source on the CPU: threadgroups, simdgroups (`simd_max`, `simd_sum`), barriers and
threadgroup memory as on the GPU, with bounds and race checks and a count of the device-memory
bytes moved. On a Mac the script also runs the same source on the GPU with
`mx.fast.metal_kernel`.
"""

import mlx_localnorm as ln  # first: it picks a fast CPU BLAS before mlx.core loads
import mlx.core as mx

# A row softmax: one threadgroup of 32 threads (one simdgroup) per row, each thread striding
# over the row; the row's max and sum come from simdgroup reductions.
SOFTMAX_SOURCE = """
  uint row = threadgroup_position_in_grid.x;
  uint lane = thread_position_in_threadgroup.x;
  int n = x_shape[x_ndim - 1];
  const device T* xr = x + size_t(row) * n;
  device T* yr = out + size_t(row) * n;

  float m = -INFINITY;
  for (int i = lane; i < n; i += 32) {
    m = metal::max(m, float(xr[i]));
  }
  m = simd_max(m);
  float s = 0;
  for (int i = lane; i < n; i += 32) {
    s += metal::exp(float(xr[i]) - m);
  }
  s = simd_sum(s);
  for (int i = lane; i < n; i += 32) {
    yr[i] = static_cast<T>(metal::exp(float(xr[i]) - m) / s);
  }
"""


def softmax(kernel, x: mx.array) -> mx.array:
    rows = x.size // x.shape[-1]
    (y,) = kernel(inputs=[x], template=[("T", x.dtype)], grid=(rows * 32, 1, 1),
                  threadgroup=(32, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])
    return y


def main() -> None:
    arguments = {"name": "row_softmax", "input_names": ["x"], "output_names": ["out"],
                 "source": SOFTMAX_SOURCE}
    kernel = ln.emulate.metal_kernel(**arguments)
    x = 4 * mx.random.normal((6, 100), key=mx.random.key(0))
    y = softmax(kernel, x)
    error = mx.abs(y - mx.softmax(x, axis=-1)).max().item()
    print(f"CPU emulator: max |kernel - mx.softmax| = {error:.2e}")
    stats = kernel.last_stats
    print(f"read {stats['x'].bytes_read} bytes of x ({stats['x'].nbytes} bytes, three passes), "
          f"wrote {stats['out'].bytes_written} bytes of out")
    if mx.metal.is_available():  # the same source on the GPU
        y_gpu = softmax(mx.fast.metal_kernel(**arguments), x)
        print(f"Metal GPU: max |GPU - emulator| = {mx.abs(y_gpu - y).max().item():.2e}")


if __name__ == "__main__":
    main()
