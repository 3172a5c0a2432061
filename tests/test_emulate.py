"""The CPU Metal emulator on small kernels with known answers (references in float64 NumPy)."""

import os  # noqa: I001  (mlx_localnorm must load before mlx.core)
import re
import tempfile

import mlx_localnorm  # noqa: F401  (first: it swaps MLX's CPU BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
import pytest

from mlx_localnorm.emulate import EmulatorError, KernelCompileError, metal_kernel
from mlx_localnorm.emulate.examples import (
    COPY_FLOAT4_SOURCE,
    RMS_NORM_INPUTS,
    RMS_NORM_OUTPUTS,
    RMS_NORM_SOURCE,
    rms_norm_geometry,
)


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def run(kernel, inputs, shapes, dtypes, grid, threadgroup, **kw):
    return kernel(
        inputs=inputs,
        output_shapes=shapes,
        output_dtypes=dtypes,
        grid=grid,
        threadgroup=threadgroup,
        **kw,
    )


def test_elementwise_matches_mlx_op():
    kernel = metal_kernel(
        "emu_exp",
        ["inp"],
        ["out"],
        "uint elem = thread_position_in_grid.x;\nT tmp = inp[elem];\nout[elem] = metal::exp(tmp);",
    )
    x = mx.random.normal((4, 16), key=mx.random.key(0))
    (out,) = run(
        kernel,
        [x],
        [x.shape],
        [mx.float32],
        (x.size, 1, 1),
        (32, 1, 1),
        template=[("T", mx.float32)],
    )
    assert out.shape == x.shape and out.dtype == mx.float32
    np.testing.assert_allclose(f64(out), np.exp(f64(x)), rtol=1e-6)


def test_threadgroup_tree_reduction_with_barriers():
    source = """
    threadgroup float partial[256];
    uint lid = thread_position_in_threadgroup.x;
    uint row = threadgroup_position_in_grid.x;
    partial[lid] = x[row * 256 + lid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint stride = 128; stride > 0; stride /= 2) {
      if (lid < stride) partial[lid] += partial[lid + stride];
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (lid == 0) out[row] = partial[0];
    """
    kernel = metal_kernel("emu_tree_sum", ["x"], ["out"], source)
    x = mx.random.uniform(shape=(5, 256), key=mx.random.key(1))
    (out,) = run(kernel, [x], [(5,)], [mx.float32], (5 * 256, 1, 1), (256, 1, 1))
    np.testing.assert_allclose(f64(out), f64(x).sum(axis=1), rtol=1e-5)


NEIGHBOUR_SOURCE = """
    threadgroup float shared[64];
    uint lid = thread_position_in_threadgroup.x;
    shared[lid] = x[lid];
    BARRIER;
    out[lid] = shared[(lid + NEIGHBOUR) % 64];
    """


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle", "mixed"])
@pytest.mark.parametrize("barrier, neighbour", [
    ("", 1),  # no barrier at all
    ("threadgroup_barrier(mem_flags::mem_device)", 1),  # orders device memory only
    ("simdgroup_barrier(mem_flags::mem_threadgroup)", 32),  # orders one simdgroup only
], ids=["none", "mem_device", "other_simdgroup"])
def test_threadgroup_memory_race_is_an_error(barrier, neighbour, order, monkeypatch):
    """Reading a slot another thread wrote is an error, under every thread order, unless a
    barrier with mem_flags::mem_threadgroup separates them."""
    monkeypatch.setenv("MLX_LOCALNORM_EMULATE_ORDER", order)
    source = NEIGHBOUR_SOURCE.replace("BARRIER", barrier or "(void)0")
    kernel = metal_kernel("emu_race", ["x"], ["out"], source.replace("NEIGHBOUR", str(neighbour)))
    x = mx.arange(64, dtype=mx.float32)
    with pytest.raises(EmulatorError, match=r"threadgroup memory race on 'shared'\[\d+\]: "
                                            r"accessed by .* after thread_index_in_threadgroup"):
        run(kernel, [x], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))


@pytest.mark.parametrize("barrier, neighbour", [
    ("threadgroup_barrier(mem_flags::mem_threadgroup)", 1),
    ("threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)", 33),
    ("simdgroup_barrier(mem_flags::mem_threadgroup)", 0),
], ids=["threadgroup", "both_flags", "own_slot"])
def test_threadgroup_memory_ordered_by_a_barrier_passes(barrier, neighbour):
    source = NEIGHBOUR_SOURCE.replace("BARRIER", barrier).replace("NEIGHBOUR", str(neighbour))
    kernel = metal_kernel("emu_no_race", ["x"], ["out"], source)
    x = mx.arange(64, dtype=mx.float32)
    (out,) = run(kernel, [x], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    np.testing.assert_array_equal(np.array(out), (np.arange(64) + neighbour) % 64)


def test_simdgroup_barrier_orders_lanes_of_one_simdgroup():
    source = """
    threadgroup float shared[64];
    uint lid = thread_position_in_threadgroup.x;
    shared[lid] = x[lid];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[lid] = shared[(lid / 32) * 32 + (lid + 1) % 32];
    """
    kernel = metal_kernel("emu_simd_order", ["x"], ["out"], source)
    (out,) = run(kernel, [mx.arange(64, dtype=mx.float32)], [(64,)], [mx.float32], (64, 1, 1),
                 (64, 1, 1))
    lid = np.arange(64)
    np.testing.assert_array_equal(np.array(out), (lid // 32) * 32 + (lid + 1) % 32)


def test_unwritten_threadgroup_memory_reads_as_nan():
    source = """
    threadgroup float shared[64];
    uint lid = thread_position_in_threadgroup.x;
    if (lid % 2 == 0) shared[lid] = x[lid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[lid] = shared[lid ^ 1];
    """
    kernel = metal_kernel("emu_unwritten_tg", ["x"], ["out"], source)
    (out,) = run(kernel, [mx.ones((64,))], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    got = f64(out)
    assert np.isnan(got[::2]).all() and (got[1::2] == 1).all()


# Each collective runs inside `if (simd_group_id == 1)` of a 3-simdgroup threadgroup: a
# threadgroup-wide rendezvous would deadlock or mix simdgroups.
def _lanes_reference(name: str, v: np.ndarray) -> np.ndarray:
    lane = np.arange(32)
    table = {
        "simd_sum(v)": np.full(32, v.sum()),
        "simd_product(v)": np.full(32, v.prod()),
        "simd_max(v)": np.full(32, v.max()),
        "simd_min(v)": np.full(32, v.min()),
        "simd_prefix_inclusive_sum(v)": np.cumsum(v),
        "simd_prefix_exclusive_sum(v)": np.cumsum(v) - v,
        "simd_shuffle(v, (lane * 7) % 32)": v[(lane * 7) % 32],
        "simd_shuffle_down(v, 3)": np.where(lane + 3 < 32, v[np.minimum(lane + 3, 31)], v),
        "simd_shuffle_up(v, 5)": np.where(lane >= 5, v[np.maximum(lane - 5, 0)], v),
        "simd_shuffle_xor(v, 6)": v[lane ^ 6],
        "simd_broadcast(v, 9)": np.full(32, v[9]),
        "float(uint64_t(simd_ballot(v > 1.0f)) & 0xffffu)": np.full(
            32, float(sum(1 << i for i in range(16) if v[i] > 1.0))
        ),
        "float(simd_any(v > 4.0f))": np.full(32, float((v > 4.0).any())),
        "float(simd_all(v > 0.0f))": np.full(32, float((v > 0).all())),
        "float(simd_ballot(v > 0.0f).all()) + 2 * float(simd_ballot(v > 4.0f).any())": np.full(
            32, 1.0
        ),
        "simd_broadcast_first(v)": np.full(32, v[0]),
        "simd_shuffle_rotate_down(v, 5)": v[(lane + 5) % 32],
        "simd_shuffle_and_fill_down(v, v * 10.0f, 4)": np.where(
            lane + 4 < 32, v[(lane + 4) % 32], 10 * v[(lane + 4) % 32]
        ),
        "quad_sum(v)": np.repeat(v.reshape(8, 4).sum(axis=1), 4),
    }
    return table[name]


COLLECTIVES = [
    "simd_sum(v)",
    "simd_product(v)",
    "simd_max(v)",
    "simd_min(v)",
    "simd_prefix_inclusive_sum(v)",
    "simd_prefix_exclusive_sum(v)",
    "simd_shuffle(v, (lane * 7) % 32)",
    "simd_shuffle_down(v, 3)",
    "simd_shuffle_up(v, 5)",
    "simd_shuffle_xor(v, 6)",
    "simd_broadcast(v, 9)",
    "float(uint64_t(simd_ballot(v > 1.0f)) & 0xffffu)",
    "float(simd_any(v > 4.0f))",
    "float(simd_all(v > 0.0f))",
    "float(simd_ballot(v > 0.0f).all()) + 2 * float(simd_ballot(v > 4.0f).any())",
    "simd_broadcast_first(v)",
    "simd_shuffle_rotate_down(v, 5)",
    "simd_shuffle_and_fill_down(v, v * 10.0f, 4)",
    "quad_sum(v)",
]


@pytest.mark.parametrize("expr", COLLECTIVES)
def test_simd_collective_inside_one_simdgroup_branch(expr):
    source = f"""
    uint lane = thread_index_in_simdgroup;
    uint simd_group_id = simdgroup_index_in_threadgroup;
    uint i = thread_position_in_grid.x;
    float v = x[i];
    if (simd_group_id == uint(which)) {{
      out[i] = {expr};
    }} else {{
      out[i] = -1.0f;
    }}
    """
    kernel = metal_kernel("emu_collective", ["x", "which"], ["out"], source)
    # Powers of two: every sum and product here is exact in float32.
    rng = np.random.default_rng(2)
    values = rng.choice([0.5, 1.0, 2.0, 4.0], size=96).astype(np.float32)
    for which in (0, 1, 2):
        (out,) = run(
            kernel, [mx.array(values), which], [(96,)], [mx.float32], (96, 1, 1), (96, 1, 1)
        )
        got = f64(out).reshape(3, 32)
        lanes = values.reshape(3, 32)[which].astype(np.float64)
        for group in range(3):
            expected = _lanes_reference(expr, lanes) if group == which else np.full(32, -1.0)
            np.testing.assert_array_equal(got[group], expected)


def test_simd_sum_over_active_lanes_of_a_divergent_branch():
    source = """
    uint lane = thread_index_in_simdgroup;
    float v = x[lane];
    out[lane] = lane < 12 ? simd_sum(v) : 0.0f;
    """
    kernel = metal_kernel("emu_divergent_sum", ["x"], ["out"], source)
    x = mx.arange(32, dtype=mx.float32)
    (out,) = run(kernel, [x], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))
    expected = np.where(np.arange(32) < 12, np.arange(12).sum(), 0.0)
    np.testing.assert_array_equal(f64(out), expected)


# Metal functions and MLX utils a kernel body may use, each with a float64 reference per lane
# (v = x[i] = i / 4 for i < 8); `k` is the lane index as an int.
SHIM_CASES = [
    ("float(metal::exp(half(v)))", lambda v, k: np.float16(np.exp(np.float16(v))), 1e-3),
    ("float(metal::max(bfloat16_t(v), bfloat16_t(1.5f)))", lambda v, k: max(v, 1.5), 0),
    ("metal::clamp(float4(v, 2.0f * v, -v, 0.5f), 0.0f, 1.0f).y", lambda v, k: min(2 * v, 1), 0),
    ("metal::select(float4(-v), float4(9.0f), float4(-v) < 0.0f).z", lambda v, k: 9 if v else 0, 0),
    ("float(popcount(uint(k) + 5u))", lambda v, k: (k + 5).bit_count(), 0),
    ("metal::fract(v * 3.5f)", lambda v, k: (3.5 * v) % 1, 0),
    ("metal::sign(-v)", lambda v, k: -np.sign(v), 0),
    ("float(Limits<half>::finite_max)", lambda v, k: 65504.0, 0),
    ("float(ceildiv(k + 10, 4))", lambda v, k: -(-(k + 10) // 4), 0),
    ("float(metal::tanh(bfloat16_t(v)))", lambda v, k: np.tanh(v), 1e-2),
    (
        "metal::precise::rsqrt(v + 1.0f) + metal::fast::exp(0.0f)",
        lambda v, k: (v + 1) ** -0.5 + 1,
        1e-6,
    ),
    ("float(as_type<uint>(1.0f) >> 23)", lambda v, k: 127, 0),
    ("metal::fma(v, 2.0f, 1.0f)", lambda v, k: 2 * v + 1, 0),
    ("float(metal::abs(-k) + metal::min(k, 3))", lambda v, k: k + min(k, 3), 0),
    ("float(half4(float4(v)).y * half(2))", lambda v, k: 2 * v, 0),
    ("metal::dot(float4(v, 1, 2, 3).xy, float2(1.0f, 1.0f))", lambda v, k: v + 1, 0),
    ("float(metal::isnan(metal::numeric_limits<float>::quiet_NaN()))", lambda v, k: 1, 0),
    ("simd_prefix_inclusive_product(v > 0.0f ? 2.0f : 1.0f)", lambda v, k: 2.0**k, 0),
    ("quad_shuffle(v, 3)", lambda v, k: (k // 4 * 4 + 3) / 4, 0),
    ("elem_to_loc(uint(k), x_shape, x_strides, x_ndim) * 1.0f", lambda v, k: k, 0),
    # Metal's math constants (MSL specification, section 6.5).
    ("metal::max(-INFINITY, v) + float(INFINITY == HUGE_VALF)", lambda v, k: v + 1, 0),
    ("float(metal::isnan(NAN)) + MAXFLOAT / FLT_MAX", lambda v, k: 2, 0),
    ("M_PI_F * v + M_SQRT2_F - M_E_F", lambda v, k: np.pi * v + np.sqrt(2) - np.e, 1e-6),
    ("M_LN2_F * M_LOG2E_F + M_PI_2_F / M_PI_4_F", lambda v, k: 3, 1e-6),
    ("FLT_EPSILON / FLT_MIN * 0.0f + M_1_PI_F * M_2_SQRTPI_F", lambda v, k: 2 / np.pi**1.5, 1e-6),
]


def test_metal_functions_and_mlx_utils():
    writes = "\n".join(
        f"out[i * {len(SHIM_CASES)} + {j}] = {e};" for j, (e, _, _) in enumerate(SHIM_CASES)
    )
    source = f"uint i = thread_position_in_grid.x;\nint k = int(i);\nfloat v = x[i];\n{writes}"
    kernel = metal_kernel("emu_shim", ["x"], ["out"], source)
    x = mx.arange(8, dtype=mx.float32) / 4
    (out,) = run(kernel, [x], [(8 * len(SHIM_CASES),)], [mx.float32], (8, 1, 1), (8, 1, 1))
    got = f64(out).reshape(8, len(SHIM_CASES))
    for j, (expr, reference, tolerance) in enumerate(SHIM_CASES):
        expected = [float(reference(k / 4, k)) for k in range(8)]
        np.testing.assert_allclose(
            got[:, j], expected, rtol=tolerance, atol=tolerance, err_msg=expr
        )


def test_partial_threadgroups_at_the_grid_edge():
    source = """
    uint i = thread_position_in_grid.x + thread_position_in_grid.y * threads_per_grid.x;
    out[i * 4 + 0] = threads_per_threadgroup.x;
    out[i * 4 + 1] = threads_per_threadgroup.y;
    out[i * 4 + 2] = threadgroup_position_in_grid.x;
    out[i * 4 + 3] = simdgroups_per_threadgroup + 100 * dispatch_threads_per_threadgroup.y;
    """
    kernel = metal_kernel("emu_partial", ["x"], ["out"], source)
    grid, group = (10, 3, 1), (4, 2, 1)
    (out,) = run(kernel, [mx.zeros((1,))], [(30 * 4,)], [mx.uint32], grid, group)
    got = np.array(out).reshape(3, 10, 4)
    xs, ys = np.meshgrid(np.arange(10), np.arange(3))
    tx = np.minimum(4, 10 - (xs // 4) * 4)
    ty = np.minimum(2, 3 - (ys // 2) * 2)
    np.testing.assert_array_equal(got[..., 0], tx)
    np.testing.assert_array_equal(got[..., 1], ty)
    np.testing.assert_array_equal(got[..., 2], xs // 4)
    np.testing.assert_array_equal(got[..., 3], (tx * ty + 31) // 32 + 100 * 2)
    # A threadgroup larger than the grid is clamped to it: one group of 10 threads.
    (out,) = run(kernel, [mx.zeros((1,))], [(10 * 4,)], [mx.uint32], (10, 1, 1), (64, 4, 1))
    np.testing.assert_array_equal(np.array(out).reshape(10, 4)[:, [0, 1, 3]], [[10, 1, 101]] * 10)


def test_template_arguments_and_shape_strides():
    source = """
    uint elem = thread_position_in_grid.x;
    int64_t loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
    T v = inp[loc];
    out[elem] = FLIP ? T(-v * SCALE) : T(v * SCALE);
    """
    kernel = metal_kernel("emu_strided", ["inp"], ["out"], source, ensure_row_contiguous=False)
    x = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4).transpose(2, 0, 1)
    template = [("T", mx.float32), ("SCALE", 3), ("FLIP", True)]
    (out,) = run(kernel, [x], [x.shape], [mx.float32], (x.size, 1, 1), (8, 1, 1), template=template)
    np.testing.assert_array_equal(f64(out), -3.0 * f64(x))


def test_generated_signature_follows_mlx(capsys):
    source = "out[thread_position_in_grid.x] = a[0] + b + float(c[c_ndim]); (void)c_shape;"
    kernel = metal_kernel("emu_sig", ["a", "b", "c"], ["out"], source)
    a, b, c = mx.zeros((4,)), mx.array(2.0), mx.zeros((3, 4), dtype=mx.float16)
    run(
        kernel,
        [a, b, c],
        [(1,)],
        [mx.float32],
        (1, 1, 1),
        (1, 1, 1),
        template=[("N", 2), ("T", mx.bfloat16)],
        verbose=True,
    )
    printed = capsys.readouterr().out
    name = "custom_kernel_emu_sig__2_bfloat16_t_floatc_floats_float16_t_float"
    expected = (
        "template <int N, typename T>\n"
        f"[[kernel]] void {name}(\n"
        "  const constant float* a [[buffer(0)]],\n"
        "  const constant float& b [[buffer(1)]],\n"
        "  const device float16_t* c [[buffer(2)]],\n"
        "  const constant int* c_shape [[buffer(3)]],\n"
        "  const constant int& c_ndim [[buffer(4)]],\n"
        "  device float* out [[buffer(5)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
    )
    assert expected in printed
    assert f'template [[host_name("{name}")]] [[kernel]] decltype({name}<2, bfloat16_t>)' in printed


def _bf16_bits_rne(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_half_and_bfloat_round_trips():
    source = """
    uint i = thread_position_in_grid.x;
    as_half[i] = half(x[i]);
    as_bf[i] = bfloat16_t(x[i]);
    bf_back[i] = float(bf[i]);
    """
    kernel = metal_kernel("emu_round", ["x", "bf"], ["as_half", "as_bf", "bf_back"], source)
    rng = np.random.default_rng(3)
    ties = 1.0 + np.array([1, 3, 5, 7], dtype=np.float64) * 2.0**-8  # exact bfloat16 ties
    values = np.concatenate([rng.normal(size=60) * 100, ties]).astype(np.float32)
    x = mx.array(values)
    outs = run(
        kernel,
        [x, x.astype(mx.bfloat16)],
        [(64,)] * 3,
        [mx.float16, mx.bfloat16, mx.float32],
        (64, 1, 1),
        (64, 1, 1),
    )
    np.testing.assert_array_equal(np.array(outs[0]), values.astype(np.float16))
    np.testing.assert_array_equal(np.array(outs[1].view(mx.uint16)), _bf16_bits_rne(values))
    np.testing.assert_array_equal(
        np.array(outs[1].view(mx.uint16)), np.array(x.astype(mx.bfloat16).view(mx.uint16))
    )
    np.testing.assert_array_equal(np.array(outs[2]), f64(x.astype(mx.bfloat16)))


def test_output_an_unwritten_element_is_poisoned():
    source = """
    uint i = thread_position_in_grid.x;
    if (i % 2 == 0) { out[i] = x[i]; counts[i] = 1; }
    """
    kernel = metal_kernel("emu_forgot", ["x"], ["out", "counts"], source)
    x = mx.ones((8,))
    out, counts = run(kernel, [x], [(8,), (8,)], [mx.float32, mx.int32], (8, 1, 1), (8, 1, 1))
    got = f64(out)
    assert np.isnan(got[1::2]).all() and (got[::2] == 1).all()
    assert (np.array(counts)[1::2] == np.int32(np.uint32(0xA5A5A5A5).view(np.int32))).all()
    out, counts = run(
        kernel, [x], [(8,), (8,)], [mx.float32, mx.int32], (8, 1, 1), (8, 1, 1), init_value=0
    )
    np.testing.assert_array_equal(f64(out), [1, 0] * 4)


def test_uninitialised_thread_variable_is_not_a_plausible_value():
    source = (
        "float acc;\nfloat4 v;\nacc += x[0];\nout[0] = acc;\nout[1] = v.y;\nout[2] = float4().y;"
    )
    kernel = metal_kernel("emu_uninitialised", ["x"], ["out"], source)
    (out,) = run(kernel, [mx.ones((1,))], [(3,)], [mx.float32], (1, 1, 1), (1, 1, 1))
    got = f64(out)
    assert got[0] < -1e38 and got[1] < -1e38 and got[2] == 0


def test_missed_barrier_is_an_error():
    source = """
    uint lid = thread_position_in_threadgroup.x;
    if (lid >= 40) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[lid] = x[lid];
    """
    kernel = metal_kernel("emu_missed_barrier", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match=r"missed barrier.*threads \[40, 41"):
        run(kernel, [mx.ones((64,))], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))


def test_lanes_at_different_collectives_is_an_error():
    source = """
    uint lane = thread_index_in_simdgroup;
    float v = x[lane];
    out[lane] = lane < 16 ? simd_sum(v) : simd_max(v);
    """
    kernel = metal_kernel("emu_split_collective", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match="different simd collectives.*simd_sum.*simd_max"):
        run(kernel, [mx.ones((32,))], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


def test_out_of_bounds_read_and_write_are_errors():
    read = metal_kernel(
        "emu_oob_read", ["x"], ["out"], "uint i = thread_position_in_grid.x; out[i] = x[i + 1];"
    )
    with pytest.raises(EmulatorError) as info:
        run(read, [mx.ones((8,))], [(8,)], [mx.float32], (8, 1, 1), (8, 1, 1))
    message = str(info.value)
    assert "read" in message and "input 'x'" in message and "element index 8" in message
    assert "thread_position_in_grid (7, 0, 0)" in message

    write = metal_kernel(
        "emu_oob_write",
        ["x"],
        ["out"],
        "uint i = thread_position_in_grid.x; out[i == 3 ? 8 : i] = x[i];",
    )
    with pytest.raises(EmulatorError, match=r"write.*output 'out'.*element index 8 .*\(3, 0, 0\)"):
        run(write, [mx.ones((8,))], [(8,)], [mx.float32], (8, 1, 1), (8, 1, 1))


def test_misaligned_vector_load_is_an_error():
    source = "out[0] = ((const device float4*)(x + 1))[0].y;"
    kernel = metal_kernel("emu_misaligned", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match="misaligned read in input 'x': byte offset 4 .* 16"):
        run(kernel, [mx.ones((8,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))


def test_threadgroup_array_index_out_of_range_is_an_error():
    source = """
    threadgroup float tile[32];
    uint lid = thread_position_in_threadgroup.x;
    tile[lid == 5 ? 32 : lid] = 1.0f;
    out[lid] = tile[lid];
    """
    kernel = metal_kernel("emu_tile_oob", ["x"], ["out"], source)
    with pytest.raises(
        EmulatorError,
        match=r"index 32 outside threadgroup array 'tile' of 32 elements by .*\(5, 0, 0\)",
    ):
        run(kernel, [mx.ones((1,))], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


def test_metal_limits_are_enforced():
    kernel = metal_kernel("emu_limits", ["x"], ["out"], "out[0] = x[0];")
    for group in [(1025, 1, 1), (32, 32, 2)]:
        with pytest.raises(ValueError, match="greater than the maximum allowed threads"):
            run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (2048, 1, 1), group)
    big = metal_kernel(
        "emu_tg_memory",
        ["x"],
        ["out"],
        "threadgroup float a[4096];\nthreadgroup float b[4097];\n"
        "a[0] = 1; b[0] = 1; out[0] = a[0] + b[0];",
    )
    with pytest.raises(EmulatorError, match="32768 bytes.*'b'|'b'.*32 KiB"):
        run(big, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))


@pytest.mark.parametrize("limit", [832, 512])
def test_pipeline_thread_limit_from_the_environment(limit, monkeypatch):
    """A pipeline's limit falls below 1024 as its registers rise; the emulator takes one from
    MLX_LOCALNORM_EMULATE_MAX_THREADS and rejects larger threadgroups at launch, as MLX does."""
    monkeypatch.setenv("MLX_LOCALNORM_EMULATE_MAX_THREADS", str(limit))
    kernel = metal_kernel("emu_pipeline_limit", ["x"], ["out"],
                          "uint i = thread_position_in_grid.x;\nout[i] = 2 * x[i];")
    x = mx.arange(2048, dtype=mx.float32)
    (out,) = run(kernel, [x], [(2048,)], [mx.float32], (2048, 1, 1), (limit, 1, 1))
    np.testing.assert_array_equal(np.array(out), 2 * np.arange(2048))
    for group in [(limit + 32, 1, 1), (limit // 2, 2, 2)]:
        with pytest.raises(ValueError, match=rf"size \({limit + 32 if group[1] == 1 else 2 * limit}"
                                             rf"\) is greater than .*threadgroup \({limit}\)"):
            run(kernel, [x], [(2048,)], [mx.float32], (2048, 1, 1), group)


@pytest.mark.parametrize("value", ["fast", "0", "16", "1056", "500"])
def test_pipeline_thread_limit_setting_is_checked(value, monkeypatch):
    monkeypatch.setenv("MLX_LOCALNORM_EMULATE_MAX_THREADS", value)
    kernel = metal_kernel("emu_pipeline_limit_bad", ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(ValueError, match=rf"MLX_LOCALNORM_EMULATE_MAX_THREADS must be .*{value}"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (32, 1, 1), (32, 1, 1))


def test_copy_kernel_bytes_are_counted_exactly():
    kernel = metal_kernel("emu_copy4", ["x"], ["out"], COPY_FLOAT4_SOURCE)
    x = mx.random.normal((1000, 12), key=mx.random.key(4))
    (out,) = run(kernel, [x], [x.shape], [mx.float32], (x.size // 4, 1, 1), (256, 1, 1))
    np.testing.assert_array_equal(np.array(out), np.array(x))
    stats = kernel.last_stats
    assert stats["x"].bytes_read == x.nbytes and stats["x"].bytes_written == 0
    assert stats["out"].bytes_written == x.nbytes and stats["out"].bytes_read == 0
    assert stats.bytes_moved == 2 * x.nbytes and stats.traffic_ratio == 1.0


def test_atomic_outputs():
    source = """
    uint i = thread_position_in_grid.x;
    atomic_fetch_add_explicit(&hist[uint(x[i]) % 4], 1, memory_order_relaxed);
    """
    kernel = metal_kernel("emu_hist", ["x"], ["hist"], source, atomic_outputs=True)
    values = np.arange(37) % 7
    (hist,) = run(
        kernel,
        [mx.array(values.astype(np.float32))],
        [(4,)],
        [mx.int32],
        (37, 1, 1),
        (16, 1, 1),
        init_value=0,
    )
    np.testing.assert_array_equal(np.array(hist), np.bincount(values % 4, minlength=4))


def test_strided_input_keeps_its_layout_without_ensure_row_contiguous():
    source = """
    uint i = thread_position_in_grid.x;
    out[i] = x[elem_to_loc(i, x_shape, x_strides, x_ndim)] + 100 * x_strides[0];
    """
    x = mx.broadcast_to(mx.arange(4, dtype=mx.int32), (3, 4))
    expected = np.broadcast_to(np.arange(4), (3, 4)).ravel()
    for contiguous, row_stride in [(False, 0), (True, 4)]:
        kernel = metal_kernel(
            "emu_broadcast", ["x"], ["out"], source, ensure_row_contiguous=contiguous
        )
        (out,) = run(kernel, [x], [(12,)], [mx.int32], (12, 1, 1), (12, 1, 1))
        np.testing.assert_array_equal(np.array(out), expected + 100 * row_stride)


def test_vectors_swizzles_and_device_references():
    source = """
    uint i = thread_position_in_grid.x;
    half4 v = ((const device half4*)x)[i];
    float4 f = float4(v) * 2.0f + 1.0h;
    float2 hi = f.zw;
    device float& o = out[i];
    o = hi.x + dot(f.xyz, float3(1.0f)) + float(bfloat4(f).w);
    o += simd_shuffle_down(v, 1).w;
    """
    kernel = metal_kernel("emu_vectors", ["x"], ["out"], source)
    x = mx.arange(64, dtype=mx.float16)
    (out,) = run(kernel, [x], [(16,)], [mx.float32], (16, 1, 1), (16, 1, 1))
    v = np.arange(64, dtype=np.float64).reshape(16, 4)
    f = 2 * v + 1
    # Lane 15 shuffles from lane 16, absent in this 16-thread simdgroup: poison, not a value.
    below = np.concatenate([v[1:, 3], [np.nan]])
    np.testing.assert_array_equal(f64(out), f[:, 2] + f[:, :3].sum(axis=1) + f[:, 3] + below)


def test_threadgroup_atomics_and_partial_groups():
    source = """
    threadgroup atomic_int count;
    if (thread_index_in_threadgroup == 0) atomic_store_explicit(&count, 0, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&count, 1, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[threadgroup_position_in_grid.x] = atomic_load_explicit(&count, memory_order_relaxed);
    """
    kernel = metal_kernel("emu_tg_atomic", ["x"], ["out"], source)
    (out,) = run(kernel, [mx.zeros((1,))], [(3,)], [mx.int32], (100, 1, 1), (40, 1, 1))
    np.testing.assert_array_equal(np.array(out), [40, 40, 20])


def test_race_found_by_comparing_schedules():
    kernel = metal_kernel(
        "emu_last_writer",
        ["x"],
        ["out"],
        "out[0] = float(thread_position_in_grid.x) + x[0];",
        schedules=4,
    )
    with pytest.raises(EmulatorError, match="depends on the thread schedule"):
        run(kernel, [mx.zeros((1,))], [(1,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    # A race-free kernel gives bitwise-equal outputs under every schedule.
    _rms_call(_rms_kernel(schedules=3), mx.ones((5, 70)), mx.ones((70,)), 1e-6)


@pytest.mark.parametrize(
    "source, message",
    [
        (
            "int d = int(x[0]); out[thread_position_in_grid.x] = 10 / d;",
            "division or remainder by zero",
        ),
        (
            (
                "float big[200000];\nfor (int k = 0; k < 200000; k++) big[k] = x[0] + k;\n"
                "out[thread_position_in_grid.x] = big[thread_position_in_grid.x * 7919];"
            ),
            "thread stack overflow",
        ),
        ("volatile int spin = 1;\nwhile (spin) {}\nout[0] = 1;", "still running after 0.5 s"),
    ],
    ids=["division_by_zero", "stack_overflow", "infinite_loop"],
)
def test_faults_become_errors_naming_the_thread(source, message):
    kernel = metal_kernel("emu_fault", ["x"], ["out"], source, timeout=0.5)
    with pytest.raises(EmulatorError, match=message + ".*thread_position_in_grid"):
        run(kernel, [mx.zeros((1,))], [(4,)], [mx.int32], (4, 1, 1), (4, 1, 1))


def test_bad_arguments_name_what_is_wrong():
    kernel = metal_kernel("emu_args", ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(ValueError, match="`inputs` to have size 1 but got size 2"):
        run(kernel, [mx.ones((1,)), mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="`grid` must be 3 integers"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1), (1, 1, 1))
    with pytest.raises(TypeError, match="Invalid template argument"):
        run(
            kernel,
            [mx.ones((1,))],
            [(1,)],
            [mx.float32],
            (1, 1, 1),
            (1, 1, 1),
            template=[("T", 1.5)],
        )
    with pytest.raises(TypeError, match="complex64"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.complex64], (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="at least one output"):
        metal_kernel("emu_none", ["x"], [], "")


def test_threadgroup_declaration_the_emulator_cannot_share_is_refused():
    source = "threadgroup float a[32], b[32];\na[0] = b[0] = x[0];\nout[0] = a[0];"
    kernel = metal_kernel("emu_two_arrays", ["x"], ["out"], source)
    with pytest.raises(ValueError, match="one `threadgroup` variable per declaration"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))


def test_grid_component_over_int32_is_rejected_as_mlx_does():
    """MLX's binding takes grid and threadgroup as C++ ints: TypeError at the call."""
    kernel = metal_kernel("emu_big_grid", ["x"], ["out"], "out[0] = x[0];")
    for grid in [(2**31, 1, 1), (1, 2**31, 1), (1, 1, 2**40)]:
        with pytest.raises(TypeError, match=r"incompatible function arguments: `grid` .* at most "
                                            r"2\*\*31 - 1"):
            run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], grid, (1, 1, 1))
    with pytest.raises(TypeError, match="`threadgroup`"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (2**31, 1, 1))


# Kernels MLX would not compile for a Mac fail to compile here too, naming the problem; their
# fixed twins compile and run (each reads the value 1).
TILE = ("threadgroup float tile[4];\ntile[0] = 1.0f;\n"
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n")
CONVERSION = r"(could not|cannot) convert|no (matching|viable)"
ADDRESS_SPACE_BUGS = {
    # x has 4 elements: MLX binds it as `const constant float*`, which is not a device pointer.
    "constant_as_device": ("const device float* row = x + 1;\nout[0] = row[0];",
                           "out[0] = x[1];", r"device_ptr<\[\.\.\.\],1>.*device_ptr<\[\.\.\.\],0>"),
    # `big` has 16 elements (device): it does not decay to a thread pointer.
    "device_as_thread": ("out[0] = first(big + 1);", "out[0] = first_device(big + 1);",
                         CONVERSION),
    "threadgroup_as_thread": (TILE + "out[0] = first(tile);", TILE + "out[0] = first_tg(tile);",
                              CONVERSION),
    "constant_to_thread_cast": ("out[0] = reinterpret_cast<thread const float*>(x)[1];",
                                "out[0] = x[1];", "cannot be cast to a thread pointer"),
}
HELPERS = """
inline float first(thread const float* v) { return v[0]; }
inline float first_tg(threadgroup const float* v) { return v[0]; }
inline float first_device(const device float* v) { return v[0]; }
"""


@pytest.mark.parametrize("case", list(ADDRESS_SPACE_BUGS))
def test_address_spaces_are_kept(case):
    bad, good, message = ADDRESS_SPACE_BUGS[case]
    x, big = mx.arange(4, dtype=mx.float32), mx.arange(16, dtype=mx.float32)

    def call(text):
        kernel = metal_kernel(f"emu_space_{case}", ["x", "big"], ["out"], text, header=HELPERS)
        return run(kernel, [x, big], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))[0]

    with pytest.raises(KernelCompileError, match=message):
        call(bad)
    assert float(call(good)[0]) == 1.0


@pytest.mark.parametrize("source, message", [
    ("threadgroup_barrier();\nout[0] = x[0];", "threadgroup_barrier needs its mem_flags"),
    ("simdgroup_barrier();\nout[0] = x[0];", "simdgroup_barrier needs its mem_flags"),
    ("double d = x[0];\nout[0] = float(d);", r"poisoned \"double\""),
    ("int n = int(x[0]);\nfloat v[n];\nv[0] = 1;\nout[0] = v[0];", "variable length array"),
], ids=["barrier_flags", "simd_barrier_flags", "double", "vla"])
def test_what_metal_rejects_does_not_compile(source, message):
    kernel = metal_kernel("emu_not_metal", ["x"], ["out"], source)
    with pytest.raises(KernelCompileError, match=rf"(?s)emu_not_metal\.metal:\d+:\d+.*{message}"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))
    with pytest.raises(TypeError, match="float64 has no Metal type"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float64], (1, 1, 1), (1, 1, 1))


def test_thread_local_array_index_out_of_range_is_an_error():
    source = """
    float tile[2][4];
    uint lid = thread_position_in_threadgroup.x;
    for (int i = 0; i < 4; i++) { tile[0][i] = x[i]; tile[1][i] = x[i]; }
    out[lid] = tile[1][lid == 3 ? 4 : lid];
    """
    kernel = metal_kernel("emu_local_oob", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match=r"index 4 outside a thread-local array of type "
                                            r"'float \[4\]' at emu_local_oob\.metal:5:\d+ by "
                                            r"thread_position_in_grid \(3, 0, 0\)"):
        run(kernel, [mx.arange(4, dtype=mx.float32)], [(4,)], [mx.float32], (4, 1, 1), (4, 1, 1))
    (out,) = run(kernel, [mx.arange(4, dtype=mx.float32)], [(3,)], [mx.float32], (3, 1, 1),
                 (3, 1, 1))
    np.testing.assert_array_equal(np.array(out), [0, 1, 2])


def test_thread_order_setting_is_checked(monkeypatch):
    monkeypatch.setenv("MLX_LOCALNORM_EMULATE_ORDER", "backwards")
    kernel = metal_kernel("emu_order_bad", ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(ValueError,
                       match=r"MLX_LOCALNORM_EMULATE_ORDER must be one of .*'backwards'"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))


def test_compile_error_points_at_the_source_line():
    kernel = metal_kernel("emu_typo", ["x"], ["out"], "uint i = 0;\nout[i] = x[i] +;\n")
    with pytest.raises(KernelCompileError, match=r"emu_typo\.metal:2:"):
        run(kernel, [mx.ones((1,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))


# RMS_NORM_SOURCE is an RMSNorm in MLX's own style (mlx/backend/metal/kernels/rms_norm.metal):
# simd_sum -> threadgroup partials -> barrier -> simdgroup 0 sums them -> barrier -> scale.
NORM_TOLERANCE = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}


def _rms_kernel(**options):
    return metal_kernel(
        "emu_rms_norm", RMS_NORM_INPUTS, RMS_NORM_OUTPUTS, RMS_NORM_SOURCE, **options
    )


def _rms_call(kernel, x, w, eps):
    grid, threadgroup = rms_norm_geometry(*x.shape)
    (out,) = run(
        kernel, [x, w, eps], [x.shape], [x.dtype], grid, threadgroup, template=[("T", x.dtype)]
    )
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 33), (2, 1024), (3, 4099)])
def test_mlx_style_rms_norm_kernel_against_numpy(dtype, shape):
    key = mx.random.key(5)
    x = (mx.random.normal(shape, key=key) * 3).astype(dtype)
    w = (1 + 0.1 * mx.random.normal((shape[1],), key=mx.random.split(key)[0])).astype(dtype)
    eps = 1e-6
    out = _rms_call(_rms_kernel(), x, w, eps)
    xd, wd = f64(x), f64(w)
    ref = wd * xd / np.sqrt((xd**2).mean(axis=1, keepdims=True) + eps)
    np.testing.assert_allclose(
        f64(out), ref, rtol=NORM_TOLERANCE[dtype], atol=NORM_TOLERANCE[dtype]
    )


@pytest.mark.metal
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_emulator_matches_real_metal(dtype, capfd):
    x = mx.random.normal((7, 4099), key=mx.random.key(6)).astype(dtype)
    w = mx.random.uniform(shape=(4099,), key=mx.random.key(7)).astype(dtype)
    real = mx.fast.metal_kernel("emu_rms_norm", RMS_NORM_INPUTS, RMS_NORM_OUTPUTS, RMS_NORM_SOURCE)
    emulated = _rms_kernel()
    np.testing.assert_allclose(
        f64(_rms_call(emulated, x, w, 1e-6)),
        f64(_rms_call(real, x, w, 1e-6)),
        rtol=NORM_TOLERANCE[dtype],
        atol=NORM_TOLERANCE[dtype],
    )
    args = {"template": [("T", dtype)], "verbose": True}
    run(real, [x, w, 1e-6], [x.shape], [dtype], (7 * 1024, 1, 1), (1024, 1, 1), **args)
    metal_text = capfd.readouterr().out
    run(emulated, [x, w, 1e-6], [x.shape], [dtype], (7 * 1024, 1, 1), (1024, 1, 1), **args)
    assert capfd.readouterr().out == metal_text


def test_mlx_style_kernel_traffic_is_counted():
    x = mx.random.normal((4, 100), key=mx.random.key(8))
    w = mx.ones((100,))
    kernel = _rms_kernel()
    _rms_call(kernel, x, w, 1e-6)
    stats = kernel.last_stats
    # x is read twice (statistics, then scale), w once per row, the output written once.
    assert stats["x"].bytes_read == 2 * x.nbytes
    assert stats["w"].bytes_read == 4 * w.nbytes
    assert stats["out"].bytes_written == x.nbytes and stats["out"].bytes_read == 0
    assert stats["eps"].bytes_read == 0 and stats["eps"].scalar
    assert stats.minimum_bytes == 2 * x.nbytes + w.nbytes
    assert stats.traffic_ratio == (3 * x.nbytes + 4 * w.nbytes) / (2 * x.nbytes + w.nbytes)
    assert re.fullmatch(r"custom_kernel_emu_rms_norm__float_float_float_floats_float", stats.kernel)


# ----------------------------------------------------------------- the compiled-kernel cache
def _copy_kernel_run(name: str) -> np.ndarray:
    kernel = metal_kernel(name, ["x"], ["out"], COPY_FLOAT4_SOURCE)
    x = mx.arange(8, dtype=mx.float32)
    (out,) = run(kernel, [x], [(8,)], [mx.float32], (2, 1, 1), (2, 1, 1))
    return np.array(out)


@pytest.mark.parametrize("plant", ["world_writable", "other_owner", "symlink"])
def test_cache_never_loads_a_library_planted_in_a_shared_temp_dir(plant, tmp_path, monkeypatch):
    """With ~/.cache unwritable the cache falls back to the temporary directory, where anyone
    can create `mlx_localnorm-<uid>` first: such a directory must not be used."""
    from mlx_localnorm.emulate import _build

    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setenv("MLX_LOCALNORM_CACHE", str(tmp_path / "good"))
    _copy_kernel_run("emu_cache_probe")
    (library,) = (tmp_path / "good" / "emulate").glob("*.so")

    # The user cache is now unusable (a file where a directory should be).
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLX_LOCALNORM_CACHE", str(tmp_path / "file" / "sub"))
    shared = tmp_path / "shared_tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    uid = os.getuid()
    if plant == "other_owner":  # the planted directory keeps our real uid as its owner
        uid += 4242
        monkeypatch.setattr(os, "getuid", lambda: uid)
    attacker = tmp_path / "attacker" if plant == "symlink" else shared / f"mlx_localnorm-{uid}"
    (attacker / "emulate").mkdir(parents=True)
    (attacker / "emulate" / library.name).write_bytes(b"not a library: planted code")
    if plant == "symlink":
        (shared / f"mlx_localnorm-{uid}").symlink_to(attacker)
    attacker.chmod(0o777 if plant != "other_owner" else 0o700)
    monkeypatch.setattr(_build, "_loaded", {})

    with pytest.warns(UserWarning, match=f"not using the kernel cache .*mlx_localnorm-{uid}"):
        out = _copy_kernel_run("emu_cache_probe")
    np.testing.assert_array_equal(out, np.arange(8))
    with pytest.warns(UserWarning, match="not using the kernel cache"):
        chosen = _build._writable_cache()
    assert not chosen.resolve().is_relative_to(attacker.resolve())
    assert chosen.stat().st_mode & 0o077 == 0


def test_cache_fallback_is_created_private(tmp_path, monkeypatch):
    from mlx_localnorm.emulate import _build

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLX_LOCALNORM_CACHE", str(tmp_path / "file" / "sub"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old_umask = os.umask(0o000)  # the mode must not depend on the user's umask
    try:
        chosen = _build._writable_cache()
    finally:
        os.umask(old_umask)
    private = tmp_path / f"mlx_localnorm-{os.getuid()}"
    assert chosen == private / "emulate"
    for directory in (private, chosen):
        assert directory.stat().st_mode & 0o777 == 0o700, oct(directory.stat().st_mode)
    assert _build._writable_cache() == chosen  # reused: it is ours and private
