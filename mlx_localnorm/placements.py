"""Layer-norm placements: where the norms sit in a transformer block.

Each block wraps an attention module ``self_attn`` (called as ``self_attn(x, mask, cache)``)
and an MLP ``mlp`` (called as ``mlp(x)``) that the caller builds, plus fresh norms from
``new_norm()``; a block is ``__call__(x, mask=None, cache=None) -> x``. The same blocks serve
the LocalNorm model and ``swap_norms`` on mlx-lm models. Norm attribute names follow mlx-lm
(Llama: ``input_layernorm``/``post_attention_layernorm``; Gemma 2 for four norms).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .kernels import norm_add_norm
from .norms import ApproxNorm, RMSNorm, SeeDNorm, nu_activation, nu_linear
from .norms.seed import frozen

PLACEMENTS: dict[str, str] = {
    "post": "Post-LN, x = N(x + F(x)); no final norm (arXiv 1706.03762)",
    "pre": "Pre-LN, x = x + F(N(x)); final norm (arXiv 2002.04745)",
    "mix": "Mix-LN: Post-LN in the first floor(a*L) blocks, Pre-LN after (arXiv 2412.13795)",
    "peri": "Peri-LN, x = x + N_out(F(N_in(x))), plus an embedding norm (arXiv 2502.02732)",
    "sandwich": "Sandwich-LN: Peri-LN without the embedding norm (arXiv 2105.13290)",
    "lnscaling": "LayerNorm scaling: Pre-LN with N(x)/sqrt(l) in block l (arXiv 2502.05795)",
    "ngpt": "nGPT: unit-norm hidden states, eigen learning rates, no norm layers (arXiv 2410.01131)",
    "angpt": "anGPT: nGPT with constant approximate normalization factors (arXiv 2505.22014)",
}

# Placements without configurable norm layers -> the only norm they use.
HYPERSPHERE_NORMS: dict[str, str] = {"ngpt": "l2norm", "angpt": "angpt"}
# nGPT's eigen learning-rate init (SPEC: 0.05, or 1/L).
NGPT_ALPHA_INIT = 0.05

NormFactory = Callable[[], nn.Module]


def check_placement(placement: str, norm: str) -> None:
    """Raise ValueError unless ``placement`` exists and can use the norm named ``norm``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; valid placements: "
                         f"{', '.join(PLACEMENTS)}")
    if placement in HYPERSPHERE_NORMS:
        if norm != HYPERSPHERE_NORMS[placement]:
            raise ValueError(f"placement {placement!r} has no norm layers to configure; its "
                             f"norm_type must be {HYPERSPHERE_NORMS[placement]!r} (or None), "
                             f"got {norm!r}")
    elif norm == "angpt":
        # ApproxNorm needs the constant of the layer it follows, which only anGPT derives.
        raise ValueError(f"norm 'angpt' (constant ApproxNorm) only works in placement 'angpt'; "
                         f"placement {placement!r} needs a norm with statistics or DyT")


class PreLN(nn.Module):
    r"""Pre-LN block (arXiv 2002.04745): :math:`x = x + F(N(x))`, attention then MLP.

    ``scale`` multiplies each norm output: ``1/sqrt(l)`` gives LayerNorm scaling
    (arXiv 2502.05795), which damps the variance growth of deep Pre-LN stacks.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, new_norm: NormFactory,
                 scale: float = 1.0):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = new_norm()
        self.post_attention_layernorm = new_norm()
        self.scale = scale

    def _normed(self, norm: nn.Module, x: mx.array) -> mx.array:
        return norm(x) if self.scale == 1.0 else norm(x) * self.scale

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self._normed(self.input_layernorm, x), mask, cache)
        return h + self.mlp(self._normed(self.post_attention_layernorm, h))


class PostLN(nn.Module):
    r"""Post-LN block (arXiv 1706.03762): :math:`x = N(x + F(x))`, attention then MLP."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, new_norm: NormFactory):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.post_attention_layernorm = new_norm()
        self.post_feedforward_layernorm = new_norm()

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = self.post_attention_layernorm(x + self.self_attn(x, mask, cache))
        return self.post_feedforward_layernorm(h + self.mlp(h))


class PeriLN(nn.Module):
    r"""Peri-LN block (arXiv 2502.02732): :math:`x = x + N_{out}(F(N_{in}(x)))`.

    The residual stream itself is never normalized. ``embed_norm=True`` (the first block of
    Peri-LN) normalizes the block input first, :math:`x_0 = N(\mathrm{embed})`; without it
    the block is Sandwich-LN (arXiv 2105.13290).
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, new_norm: NormFactory,
                 embed_norm: bool = False):
        super().__init__()
        if embed_norm:
            self.embed_layernorm = new_norm()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = new_norm()
        self.post_attention_layernorm = new_norm()
        self.pre_feedforward_layernorm = new_norm()
        self.post_feedforward_layernorm = new_norm()

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if "embed_layernorm" in self:
            x = self.embed_layernorm(x)
        attn = self.self_attn(self.input_layernorm(x), mask, cache)
        h, normed = self._norm_add_norm(attn, x)
        return h + self.post_feedforward_layernorm(self.mlp(normed))

    def _norm_add_norm(self, attn: mx.array, x: mx.array) -> tuple[mx.array, mx.array]:
        """``h = x + N_out(attn)`` and ``N_in(h)`` of the MLP: one fused kernel call when both
        norms are plain RMSNorm or single-head SeeDNorm of one configuration (the same values
        as the three separate passes), else the separate modules."""
        out_norm, in_norm = self.post_attention_layernorm, self.pre_feedforward_layernorm
        fused = fused_norms(out_norm, in_norm)
        if fused is None:
            h = x + out_norm(attn)
            return h, in_norm(h)
        return norm_add_norm(attn, x, norm_params(out_norm), norm_params(in_norm),
                             out_norm.eps, in_norm.eps, **fused)


def norm_params(norm: RMSNorm | SeeDNorm) -> tuple[mx.array, ...]:
    """The parameters of ``norm`` as :func:`mlx_localnorm.kernels.norm_add_norm` takes them."""
    if isinstance(norm, SeeDNorm):
        return norm.weight, norm.alpha, norm.beta
    return (1 + norm.weight if norm.zero_centered else norm.weight,)


def fused_norms(out_norm: nn.Module, in_norm: nn.Module) -> dict | None:
    """The keywords of the fused norm-add-norm for this pair of norms, or None when it cannot
    stand in for them: other norm types (or wrapped ones: recorders, hooks), or SeeDNorms with
    several heads or different options."""
    kinds = {type(out_norm), type(in_norm)}
    if kinds == {RMSNorm}:
        names, options = ("weight",), {"dot_scale": "none", "backend": "auto"}
    elif kinds == {SeeDNorm}:
        config = [(n.num_heads, n.dot_scale, n.backend) for n in (out_norm, in_norm)]
        if config[0] != config[1] or out_norm.num_heads != 1:
            return None
        names, options = ("weight", "alpha", "beta"), {"dot_scale": out_norm.dot_scale,
                                                       "backend": out_norm.backend}
    else:
        return None
    return {**options, "frozen": frozen(out_norm, names) and frozen(in_norm, names)}


def scaled_vector(dims: int, init_value: float, init_scaling: float) -> tuple[mx.array, float]:
    """nGPT's scaled parameter: store ``p = init_scaling``, use ``p * init_value/init_scaling``."""
    return mx.full((dims,), init_scaling), init_value / init_scaling


class NGPTBlock(nn.Module):
    r"""nGPT block (arXiv 2410.01131): residual updates on the unit hypersphere.

    .. math:: h = L2(h + |\alpha_A| (L2(\mathrm{Attn}(h)) - h)), \quad
              h = L2(h + |\alpha_M| (L2(\mathrm{MLP}(h)) - h))

    ``alpha_attn``/``alpha_mlp`` are the eigen learning rates (vectors of size ``D``), stored
    scaled: ``p`` starts at ``1/sqrt(D)`` and is used as ``p * alpha_init * sqrt(D)``.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dims: int,
                 alpha_init: float = NGPT_ALPHA_INIT, eps: float = 1e-6):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.alpha_attn, self.alpha_factor = scaled_vector(dims, alpha_init, dims**-0.5)
        self.alpha_mlp, _ = scaled_vector(dims, alpha_init, dims**-0.5)
        self.eps = eps

    def _unit(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        return (xf / mx.maximum(mx.linalg.norm(xf, axis=-1, keepdims=True), self.eps)
                ).astype(x.dtype)

    def _update(self, h: mx.array, out: mx.array, alpha: mx.array) -> mx.array:
        a = mx.abs(alpha * self.alpha_factor)
        return self._unit(h + a * (self._unit(out) - h))

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = self._update(x, self.self_attn(x, mask, cache), self.alpha_attn)
        return self._update(h, self.mlp(h), self.alpha_mlp)


class ANGPTBlock(nn.Module):
    r"""anGPT block (arXiv 2505.22014): nGPT with the hidden-state L2 norms replaced by constants.

    .. math:: h = \nu_{lerp}(a) (h + a (\nu_F F(h) - h)), \quad
              \nu_{lerp}(a) = 1/\sqrt{(1-a)^2 + a^2}, \quad a = |\alpha|

    **Decision** (package, not the paper's code): ``nu_F`` follows SPEC's rules for unit-norm
    inputs and unit-norm weight rows/columns: attention ``nu_linear(D, heads*head_dim)`` (the
    value projection shrinks the norm; ``o_proj`` with unit columns keeps it), MLP
    ``nu_activation("silu") * nu_linear(D, F)``; ``nu_lerp`` uses the current ``a`` per
    dimension (a constant of the weights, no statistics of ``h``).
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dims: int, attn_dims: int,
                 mlp_dims: int, alpha_init: float = NGPT_ALPHA_INIT):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.attn_out_norm = ApproxNorm(dims, nu_linear(dims, attn_dims))
        self.mlp_out_norm = ApproxNorm(dims, nu_activation("silu") * nu_linear(dims, mlp_dims))
        self.alpha_attn, self.alpha_factor = scaled_vector(dims, alpha_init, dims**-0.5)
        self.alpha_mlp, _ = scaled_vector(dims, alpha_init, dims**-0.5)

    def _update(self, h: mx.array, out: mx.array, alpha: mx.array) -> mx.array:
        a = mx.abs(alpha * self.alpha_factor)
        nu = mx.rsqrt((1 - a) ** 2 + a**2)
        return (nu * (h + a * (out - h))).astype(h.dtype)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = self._update(x, self.attn_out_norm(self.self_attn(x, mask, cache)), self.alpha_attn)
        return self._update(h, self.mlp_out_norm(self.mlp(h)), self.alpha_mlp)


def has_final_norm(placement: str) -> bool:
    """Whether the placement normalizes the last hidden state before the head."""
    return placement not in ("post", "ngpt", "angpt")


def make_block(placement: str, layer_index: int, num_layers: int, self_attn: nn.Module,
               mlp: nn.Module, new_norm: NormFactory | None, *, mix_ratio: float = 0.25,
               dims: int | None = None, attn_dims: int | None = None,
               mlp_dims: int | None = None, alpha_init: float = NGPT_ALPHA_INIT) -> nn.Module:
    """The block of ``placement`` at 0-based ``layer_index`` of ``num_layers``.

    ``new_norm`` builds one fresh norm (norm placements); ``dims`` (hidden size),
    ``attn_dims`` (heads * head_dim) and ``mlp_dims`` (MLP width) size nGPT/anGPT blocks.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; valid placements: "
                         f"{', '.join(PLACEMENTS)}")
    if placement == "ngpt":
        return NGPTBlock(self_attn, mlp, dims, alpha_init)
    if placement == "angpt":
        return ANGPTBlock(self_attn, mlp, dims, attn_dims, mlp_dims, alpha_init)
    if placement == "post" or (placement == "mix" and layer_index < math.floor(
            mix_ratio * num_layers)):
        return PostLN(self_attn, mlp, new_norm)
    if placement in ("peri", "sandwich"):
        return PeriLN(self_attn, mlp, new_norm,
                      embed_norm=placement == "peri" and layer_index == 0)
    scale = (layer_index + 1) ** -0.5 if placement == "lnscaling" else 1.0
    return PreLN(self_attn, mlp, new_norm, scale)
