"""Orthogonalization of (stacks of) matrices by odd matrix polynomials, the core of Muon.

Each step maps ``X -> a X + (b A + c A^2) X`` with ``A = X X^T``, which pushes every singular
value of ``X`` towards 1 while keeping the singular vectors: the result approximates
``U V^T`` of ``X = U S V^T``.

- Newton–Schulz (KellerJordan/Muon): one quintic ``(a, b, c)`` repeated; singular values end
  in about [0.7, 1.2].
- Polar Express (arXiv 2505.16932): per-step coefficients (modded-nanogpt's 5-step list,
  safety factor 2e-2), which converge faster and closer to 1.
"""

from __future__ import annotations

import mlx.core as mx

from ._cast import as_dtype
from ._checks import check_choice, check_float_dtype, check_steps

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)

POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

ORTH_METHODS = ("newton_schulz", "polar_express")


def coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each step. Polar Express past its 5 listed steps repeats the
    last one (**Decision**: it maps values near 1 to values near 1)."""
    check_choice(method, ORTH_METHODS, "method", "orthogonalize")
    check_steps(steps, "orthogonalize")
    if method == "newton_schulz":
        return [NEWTON_SCHULZ] * steps
    return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]


def orthogonalize(
    u: mx.array, method: str = "newton_schulz", steps: int = 5, dtype: mx.Dtype = mx.float32
) -> mx.array:
    """Approximate ``U V^T`` of each matrix in the last two axes of ``u`` (leading axes are a
    batch), iterating in ``dtype``; the result is float32.

    Input scaling: ``X / (||X||_F + 1e-7)`` (Newton–Schulz) or ``X / (1.02 ||X||_F + 1e-6)``
    (Polar Express, arXiv 2505.16932), per matrix, so every singular value starts in (0, 1].
    Each step ``A = X X^T; X = a X + (b A + c A A) X`` keeps ``a, b, c`` exact in any ``dtype``.
    """
    coeffs = coefficients(method, steps)
    check_float_dtype(dtype, "dtype", "orthogonalize")
    if u.ndim < 2:
        raise ValueError(f"orthogonalize: u must have at least 2 axes, got shape {u.shape}")
    x = as_dtype(u, mx.float32)
    # Iterate on the wide orientation so X X^T is the smaller Gram matrix.
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.swapaxes(-1, -2)
    fro = mx.sqrt(mx.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / (fro + 1e-7) if method == "newton_schulz" else x / (fro * 1.02 + 1e-6)
    x = as_dtype(x, dtype)
    for a, b, c in coeffs:
        gram = x @ x.swapaxes(-1, -2)
        # alpha/beta stay float32 inside addmm; `b * gram` would round b to bfloat16 first
        # (Polar Express 8.1566 -> 8.1875), several times the iteration's own error.
        poly = mx.addmm(gram, gram, gram, alpha=c, beta=b)
        x = mx.addmm(x, poly, x, beta=a)
    x = as_dtype(x, mx.float32)
    return x.swapaxes(-1, -2) if tall else x
