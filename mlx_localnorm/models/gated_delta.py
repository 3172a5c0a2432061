r"""The gated delta rule in chunks: a differentiable form for training and prefill.

Per head, with state :math:`S` (``Dv x Dk``), decay :math:`D_t = \mathrm{diag}(g_t)` (a scalar
per head or one value per key dimension) and write strength :math:`\beta_t`
(arXiv 2412.06464):

.. math:: S_t = S_{t-1} D_t (I - \beta_t k_t k_t^T) + \beta_t v_t k_t^T, \quad o_t = S_t q_t

mlx-lm's ``gated_delta_ops`` runs this step by step (one graph node chain per token).
Here the sequence is split into chunks of ``C`` tokens; within a chunk the product of the
``I - beta k k^T`` factors is a WY/UT representation (arXiv 2406.06484, flash-linear-attention's
``chunk_gated_delta_rule``): with :math:`\lambda_t = \prod_{r \le t} g_r` the in-chunk decay,

.. math:: U = (I + A)^{-1} \mathrm{diag}(\beta) (V - (K \odot \lambda) S_0^T), \quad
          A_{ts} = \beta_t \textstyle\sum_j k_{tj} k_{sj} \lambda_{tj} / \lambda_{sj} \; (s < t)

so :math:`O = (Q \odot \lambda) S_0^T + (Q K^T \odot \Gamma)_{s \le t} U` and
:math:`S_C = S_0 \Lambda_C + U^T (K \odot \lambda_C / \lambda)`: a few matmuls per chunk and a
scan of ``T / C`` steps over chunks, O(T C d + T d^2) work. Decay ratios are formed in log
space, masked before ``exp``, so strong decays neither overflow nor divide by zero.
"""

from __future__ import annotations

import mlx.core as mx


def _check(q, k, v, log_g, beta, state, mask, chunk_size) -> None:
    """Shapes as mlx-lm's ``gated_delta_ops``; chunk_size a power of two."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_gated_delta: chunk_size must be a power of two, got "
                         f"{chunk_size!r}")
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"chunk_gated_delta: q and k must be (B, T, Hk, Dk) and v (B, T, Hv, "
                         f"Dv) alike, got {q.shape}, {k.shape}, {v.shape}")
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    if Hv % Hk:
        raise ValueError(f"chunk_gated_delta: key heads {Hk} must divide value heads {Hv}")
    if beta.shape != (B, T, Hv) or log_g.shape not in ((B, T, Hv), (B, T, Hv, Dk)):
        raise ValueError(f"chunk_gated_delta: beta must be {(B, T, Hv)} and log_g "
                         f"{(B, T, Hv)} or {(B, T, Hv, Dk)}, got {beta.shape}, {log_g.shape}")
    if state is not None and state.shape != (B, Hv, Dv, Dk):
        raise ValueError(f"chunk_gated_delta: state must be {(B, Hv, Dv, Dk)}, got "
                         f"{state.shape}")
    if mask is not None and mask.shape != (B, T):
        raise ValueError(f"chunk_gated_delta: mask must be {(B, T)}, got {mask.shape}")


def _diagonal_blocks(a: mx.array, size: int) -> mx.array:
    """The ``size x size`` blocks on the diagonal of ``a`` (..., C, C) -> (..., C/size, s, s)."""
    n = a.shape[-1] // size
    blocks = a.reshape(*a.shape[:-2], n, size, n, size)
    return mx.moveaxis(mx.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)


def unit_lower_inverse(a: mx.array) -> mx.array:
    r"""``(I + tril(A, -1))^{-1}`` for ``A`` (..., C, C), C a power of two.

    Only the strictly lower triangle of ``A`` is read.

    Block forward substitution, doubling the block size each level:
    :math:`\begin{pmatrix} X_1 & 0 \\ A_{21} & X_2 \end{pmatrix}^{-1}` has lower-left block
    :math:`-X_2^{-1} A_{21} X_1^{-1}`; log2(C) levels of batched matmuls, differentiable.
    """
    C, lead = a.shape[-1], a.shape[:-2]
    inverse = mx.ones((*lead, C, 1, 1), dtype=a.dtype)
    size = 1
    while size < C:
        n = C // (2 * size)
        low = _diagonal_blocks(a, 2 * size)[..., size:, :size]
        pairs = inverse.reshape(*lead, n, 2, size, size)
        x1, x2 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        top = mx.concatenate([x1, mx.zeros_like(x1)], axis=-1)
        bottom = mx.concatenate([-(x2 @ low @ x1), x2], axis=-1)
        inverse = mx.concatenate([top, bottom], axis=-2)
        size *= 2
    return inverse.reshape(*lead, C, C)


class _Chunks:
    """The in-chunk decays of one call: cumulative log decay ``G`` (..., N, C[, Dk])."""

    def __init__(self, log_g: mx.array, vector: bool):
        self.vector = vector
        self.G = mx.cumsum(log_g, axis=-2 if vector else -1)
        C = log_g.shape[-2] if vector else log_g.shape[-1]
        inclusive = mx.tril(mx.ones((C, C), dtype=mx.bool_))
        # lambda_t / lambda_s for s <= t (..., C, C[, Dk]); masked before exp: no overflow.
        if vector:
            diff = self.G[..., :, None, :] - self.G[..., None, :, :]
            self.ratio = mx.exp(mx.where(inclusive[..., None], diff, -mx.inf))
        else:
            diff = self.G[..., :, None] - self.G[..., None, :]
            self.ratio = mx.exp(mx.where(inclusive, diff, -mx.inf))

    def _expand(self, x: mx.array) -> mx.array:
        return x if self.vector else x[..., None]

    def decayed(self, x: mx.array) -> mx.array:
        """``x_t * lambda_t``, the decay from the chunk start through t."""
        return x * mx.exp(self._expand(self.G))

    def to_end(self, x: mx.array) -> mx.array:
        """``x_s * lambda_C / lambda_s``, the decay from s (exclusive) to the chunk end."""
        G = self._expand(self.G)
        return x * mx.exp(G[..., -1:, :] - G)

    def end_decay(self) -> mx.array:
        """``lambda_C`` shaped to multiply a state (..., N, Dv, Dk)."""
        last = mx.exp(self.G[..., -1, :] if self.vector else self.G[..., -1])
        return last[..., None, :] if self.vector else last[..., None, None]

    def scores(self, x: mx.array, y: mx.array) -> mx.array:
        """``sum_j x_tj y_sj lambda_tj / lambda_sj`` for s <= t, else 0 (..., C, C)."""
        if self.vector:
            return (x[..., :, None, :] * y[..., None, :, :] * self.ratio).sum(axis=-1)
        return (x @ y.swapaxes(-1, -2)) * self.ratio


def _to_chunks(x: mx.array, chunk: int, padded: int) -> mx.array:
    """(B, T, H, ...) -> (B, H, N, C, ...), zero-padded to ``padded`` tokens."""
    x = mx.moveaxis(x, 2, 1)
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, padded - x.shape[2])
    x = mx.pad(x, pad)
    return x.reshape(*x.shape[:2], padded // chunk, chunk, *x.shape[3:])


def chunk_gated_delta(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array,
                      beta: mx.array, state: mx.array | None = None,
                      mask: mx.array | None = None, chunk_size: int = 64
                      ) -> tuple[mx.array, mx.array]:
    """The gated delta rule over a whole sequence in chunks (see the module docstring).

    Arguments as mlx-lm's ``gated_delta_ops(q, k, v, exp(log_g), beta, state, mask)``: q, k
    (B, T, Hk, Dk), v (B, T, Hv, Dv) with Hk dividing Hv (GQA: each key head serves Hv/Hk
    value heads), ``log_g`` the log decay (B, T, Hv) or per key dimension (B, T, Hv, Dk),
    ``beta`` (B, T, Hv), ``state`` (B, Hv, Dv, Dk) or None (zeros), ``mask`` (B, T) bool:
    masked steps leave the state unchanged and output what the step would have read, as
    mlx-lm does. Computes in float32; returns ``y`` (B, T, Hv, Dv) in q's dtype and the
    float32 state. ``chunk_size`` (a power of two) is reduced for short sequences.
    """
    _check(q, k, v, log_g, beta, state, mask, chunk_size)
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    out_dtype = q.dtype
    q, k, v, log_g, beta = (x.astype(mx.float32) for x in (q, k, v, log_g, beta))
    if Hv > Hk:
        q, k = mx.repeat(q, Hv // Hk, axis=2), mx.repeat(k, Hv // Hk, axis=2)
    vector = log_g.ndim == 4
    if mask is not None:
        # Masked steps become identity steps; their outputs are rebuilt below from the
        # state they would have read (queries g*q and g*k).
        m = mask[..., None]
        gain = mx.exp(log_g if vector else log_g[..., None])
        read_q = mx.where(m[..., None], q, q * gain)
        read_k = k * gain
        log_g = mx.where(m[..., None] if vector else m, log_g, 0.0)
        step_beta = mx.where(m, beta, 0.0)
    else:
        read_q, step_beta = q, beta

    chunk = min(chunk_size, 1 << max(T - 1, 0).bit_length())
    padded = -(-T // chunk) * chunk
    k_, v_, g_, b_ = (_to_chunks(x, chunk, padded) for x in (k, v, log_g, step_beta))
    decays = _Chunks(g_, vector)
    a = decays.scores(k_, k_) * b_[..., None]  # its diagonal and upper part are not read
    solve = unit_lower_inverse(a)
    w = solve @ (b_[..., None] * decays.decayed(k_))
    u_free = solve @ (b_[..., None] * v_)
    k_end, end = decays.to_end(k_), decays.end_decay()

    S = mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state.astype(mx.float32)
    starts, us = [], []
    for n in range(padded // chunk):
        starts.append(S)
        u = u_free[:, :, n] - w[:, :, n] @ S.swapaxes(-1, -2)
        us.append(u)
        S = S * end[:, :, n] + u.swapaxes(-1, -2) @ k_end[:, :, n]
    starts, us = mx.stack(starts, axis=2), mx.stack(us, axis=2)

    def read(x: mx.array) -> mx.array:
        """``S_t x_t`` for every t, x (B, T, Hv, Dk) -> (B, T, Hv, Dv)."""
        x_ = _to_chunks(x, chunk, padded)
        o = decays.decayed(x_) @ starts.swapaxes(-1, -2) + decays.scores(x_, k_) @ us
        return mx.moveaxis(o.reshape(B, Hv, padded, Dv)[:, :, :T], 1, 2)

    y = read(read_q)
    if mask is not None:
        written = beta[..., None] * (v - read(read_k)) * (k * q).sum(axis=-1, keepdims=True)
        y = mx.where(m[..., None], y, y + written)
    return y.astype(out_dtype), S
