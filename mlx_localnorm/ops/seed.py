"""The SeeDNorm ops twin (arXiv 2510.22777): plain MLX ops, also the fused kernel's fallback."""

from __future__ import annotations

import mlx.core as mx

from ._checks import check_choice, check_eps, check_heads, check_input, check_param

DOT_SCALES = ("none", "rsqrt_d")


def seednorm(
    x: mx.array,
    weight: mx.array,
    alpha: mx.array,
    beta: mx.array,
    eps: float = 1e-6,
    num_heads: int = 1,
    dot_scale: str = "none",
    head_rms: bool = False,
) -> mx.array:
    """``y_k = (weight_k + alpha_k * tanh(<x_k, beta_k>)) * x_k / RMS(x)`` per head ``k``.

    The plain-ops twin of the fused kernel. Statistics and the dot product are float32;
    ``RMS`` is over the whole row unless ``head_rms``; ``dot_scale="rsqrt_d"`` multiplies the
    dot product by ``1/sqrt(D / num_heads)`` (the length of the dot product).
    """
    check_input(x, None, "seednorm")
    dims = x.shape[-1]
    for name, p in (("weight", weight), ("alpha", alpha), ("beta", beta)):
        check_param(p, (dims,), name, "seednorm", optional=False)
    check_eps(eps, "seednorm")
    check_heads(num_heads, dims, "seednorm")
    check_choice(dot_scale, DOT_SCALES, "dot_scale", "seednorm")

    head_dim = dims // num_heads
    xf = x.astype(mx.float32).reshape(*x.shape[:-1], num_heads, head_dim)
    dot = (xf * beta.astype(mx.float32).reshape(num_heads, head_dim)).sum(-1, keepdims=True)
    if dot_scale == "rsqrt_d":
        dot = dot * head_dim**-0.5
    s = mx.tanh(dot)
    if head_rms:
        mean_sq = mx.mean(xf * xf, axis=-1, keepdims=True)
    else:
        mean_sq = mx.mean(xf * xf, axis=(-2, -1), keepdims=True)
    gain = weight.reshape(num_heads, head_dim) + alpha.reshape(num_heads, head_dim) * s
    y = gain * (xf * mx.rsqrt(mean_sq + eps))
    return y.reshape(x.shape).astype(x.dtype)
