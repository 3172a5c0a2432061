"""``ModelArgs``: the LocalNorm transformer's configuration, one field per config.json key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from ..norms import make_norm
from ..placements import HYPERSPHERE_NORMS, NGPT_ALPHA_INIT, check_placement

LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
# Placements a linear-attention block works in: nGPT/anGPT's weight projections and norm
# constants assume softmax attention.
LINEAR_PLACEMENTS = ("post", "pre", "mix", "peri", "sandwich", "lnscaling")
# silu: Llama/Qwen SwiGLU; gelu_tanh: GPT-2 and Gemma's GeGLU (tanh approximation); gelu: erf.
MLP_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
# rope: rotary q/k; learned: absolute positions added to the embeddings (GPT-2).
POSITION_EMBEDDINGS = ("rope", "learned")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelArgs: {name} must be a positive int, got {value!r}")
    return value


def check_mix_ratio(value, where: str) -> None:
    """Mix-LN's share of Post-LN blocks must be a fraction."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: mix_ratio must be in [0, 1], got {value!r}")


@dataclass
class ModelArgs(BaseModelArgs):
    """Configuration of :class:`Model`, saved as config.json (mlx-lm's ``from_dict`` reads it).

    ``norm_type=None`` picks the placement's own norm: ``rmsnorm``, or ``l2norm`` for nGPT and
    ``angpt`` (ApproxNorm) for anGPT, whose norms are not configurable.
    """

    vocab_size: int = field(metadata={"help": "vocabulary size"})
    hidden_size: int = field(metadata={"help": "residual stream width D"})
    num_hidden_layers: int = field(metadata={"help": "number of blocks L"})
    num_attention_heads: int = field(metadata={"help": "query heads"})
    intermediate_size: int = field(metadata={"help": "MLP hidden width"})
    model_type: str = field(default="localnorm", metadata={"help": "always 'localnorm'"})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "key/value heads (GQA); None = num_attention_heads"})
    head_dim: int | None = field(
        default=None, metadata={"help": "per-head width; None = hidden_size // heads"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    rope_traditional: bool = field(default=False, metadata={"help": "interleaved RoPE"})
    partial_rotary_factor: float = field(
        default=1.0, metadata={"help": "share of each head's features RoPE rotates (Qwen3-Next "
                                       "0.25)"})
    rope_scaling: dict[str, Any] | None = field(
        default=None, metadata={"help": "mlx-lm rope_scaling config (llama3, yarn, ...)"})
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "context length (used by scaled RoPE)"})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "head = embedding^T"})
    attention_bias: bool = field(default=False, metadata={"help": "biases in q/k/v/o"})
    attention_out_bias: bool | None = field(
        default=None, metadata={"help": "bias in o_proj; None = attention_bias (Qwen2: False)"})
    mlp_bias: bool = field(default=False, metadata={"help": "biases in the MLP"})
    mlp_activation: str = field(
        default="silu", metadata={"help": f"MLP nonlinearity, one of {MLP_ACTIVATIONS}"})
    mlp_gated: bool = field(
        default=True, metadata={"help": "GLU MLP act(gate) * up; False: act(up) (GPT-2)"})
    position_embedding: str = field(
        default="rope", metadata={"help": f"one of {POSITION_EMBEDDINGS}; learned needs "
                                          "max_position_embeddings"})
    embed_scale: float = field(
        default=1.0, metadata={"help": "multiplies the token embeddings (Gemma: sqrt(D))"})
    norm_type: str | None = field(
        default=None, metadata={"help": "a name of ln.NORMS; None = the placement's norm"})
    norm_eps: float = field(default=1e-6, metadata={"help": "eps of every norm that has one"})
    norm_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra make_norm options, e.g. num_heads"})
    placement: str = field(default="pre", metadata={"help": "a name of ln.PLACEMENTS"})
    mix_ratio: float = field(
        default=0.25, metadata={"help": "mix: Post-LN for blocks l < floor(mix_ratio * L)"})
    ngpt_alpha_init: float | None = field(
        default=None, metadata={"help": "nGPT/anGPT eigen learning rate init; None = 0.05"})
    qk_norm: str | None = field(
        default=None, metadata={"help": "per-head norm of q and k (a name of ln.NORMS)"})
    qk_norm_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra make_norm options of qk_norm"})
    attention_gate: bool = field(
        default=False, metadata={"help": "sigmoid output gate per head (Qwen3-Next)"})
    layer_types: list[str] | None = field(
        default=None,
        metadata={"help": "per block: full_attention | sliding_attention | linear_attention"})
    sliding_window: int | None = field(
        default=None, metadata={"help": "window of the sliding_attention blocks"})
    linear_num_key_heads: int | None = field(
        default=None, metadata={"help": "linear_attention q/k heads; None = num_attention_heads"})
    linear_num_value_heads: int | None = field(
        default=None, metadata={"help": "linear_attention v heads (a multiple of the key "
                                        "heads); None = num_attention_heads"})
    linear_key_head_dim: int | None = field(
        default=None, metadata={"help": "linear_attention q/k head width; None = head_dim"})
    linear_value_head_dim: int | None = field(
        default=None, metadata={"help": "linear_attention v head width; None = head_dim"})
    linear_conv_kernel_dim: int = field(
        default=4, metadata={"help": "causal conv width on q/k/v of linear_attention"})
    linear_chunk_size: int = field(
        default=64, metadata={"help": "tokens per chunk of the chunked gated delta rule "
                                      "(a power of two)"})
    num_experts: int = field(default=0, metadata={"help": "MoE experts; 0 = dense MLP"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "MoE top-k"})
    moe_intermediate_size: int | None = field(
        default=None, metadata={"help": "expert MLP width; None = intermediate_size"})
    router_aux_loss_coef: float = field(
        default=0.01, metadata={"help": "load-balance loss weight a (a * E * sum f_e P_e)"})

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size"):
            _positive_int(getattr(self, name), name)
        if self.model_type != "localnorm":
            raise ValueError(f"ModelArgs: model_type must be 'localnorm', got {self.model_type!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive_int(self.num_key_value_heads, "num_key_value_heads")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelArgs: num_attention_heads={self.num_attention_heads} must divide "
                    f"hidden_size={self.hidden_size} (or set head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive_int(self.head_dim, "head_dim")
        if self.head_dim % 2 and self.position_embedding == "rope":
            raise ValueError("ModelArgs: head_dim must be even for RoPE (it rotates pairs of "
                             f"features), got {self.head_dim}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) \
                or not 0 < self.rope_theta < math.inf:
            raise ValueError(f"ModelArgs: rope_theta must be a positive number, got "
                             f"{self.rope_theta!r}")
        self._check_architecture()
        factor = self.partial_rotary_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
                0 < factor <= 1) or (self.position_embedding == "rope"
                                     and int(self.head_dim * factor) % 2):
            raise ValueError(f"ModelArgs: partial_rotary_factor must be in (0, 1] and rotate an "
                             f"even number of the head_dim={self.head_dim} features, got "
                             f"{self.partial_rotary_factor!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelArgs: num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}")

        for name in ("norm_options", "qk_norm_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"ModelArgs: {name} must be a dict of make_norm options, got "
                                f"{type(getattr(self, name)).__name__} {getattr(self, name)!r}")
        if self.norm_type is None:
            self.norm_type = HYPERSPHERE_NORMS.get(self.placement, "rmsnorm")
        check_placement(self.placement, self.norm_type)
        if self.norm_type == "patchnorm" and self.norm_options.get("patch_size", 1) != 1:
            raise ValueError("ModelArgs: norm_type='patchnorm' needs patch_size=1 in a model "
                             "(a causal token window needs past tokens the KV cache does not "
                             f"keep), got patch_size={self.norm_options['patch_size']!r}")
        self.new_norm()  # fails early with make_norm's message on a bad option
        self.new_qk_norm()
        check_mix_ratio(self.mix_ratio, "ModelArgs")
        if self.ngpt_alpha_init is None:
            self.ngpt_alpha_init = NGPT_ALPHA_INIT

        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers or not set(
                self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"ModelArgs: layer_types must be {self.num_hidden_layers} entries "
                             f"of {LAYER_TYPES}, got {self.layer_types!r}")
        if "sliding_attention" in self.layer_types:
            _positive_int(self.sliding_window, "sliding_window (needed by sliding_attention)")
        if "linear_attention" in self.layer_types:
            self._check_linear_attention()

        if self.num_experts:
            _positive_int(self.num_experts, "num_experts")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"ModelArgs: num_experts_per_tok must be in [1, num_experts="
                                 f"{self.num_experts}], got {self.num_experts_per_tok!r}")
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
        if self.moe_intermediate_size is not None:
            _positive_int(self.moe_intermediate_size, "moe_intermediate_size")
        if self.hypersphere and (self.num_experts or self.attention_gate or self.qk_norm
                                 or self.attention_bias or self.attention_out_bias or self.mlp_bias
                                 or not self.mlp_gated or self.position_embedding != "rope"):
            raise ValueError(f"ModelArgs: placement {self.placement!r} fixes its own q/k norm and "
                             "has no MoE, attention gate, biases, ungated MLP or learned "
                             "positions; unset num_experts, attention_gate, qk_norm, "
                             "attention_bias, mlp_bias, mlp_gated and position_embedding")
        if self.num_experts and (self.mlp_activation != "silu" or not self.mlp_gated):
            raise ValueError(f"ModelArgs: MoE experts are SwiGLU; num_experts={self.num_experts} "
                             f"needs mlp_activation='silu' and mlp_gated=True, got "
                             f"{self.mlp_activation!r} and {self.mlp_gated!r}")

    def _check_architecture(self) -> None:
        """The options converted checkpoints need: activation, positions, scales, biases."""
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"ModelArgs: mlp_activation must be one of {MLP_ACTIVATIONS}, got "
                             f"{self.mlp_activation!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"ModelArgs: position_embedding must be one of "
                             f"{POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if self.position_embedding == "learned":
            _positive_int(self.max_position_embeddings,
                          "max_position_embeddings (needed by learned positions)")
        for name in ("mlp_gated", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ModelArgs: {name} must be a bool, got {getattr(self, name)!r}")
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if not isinstance(self.attention_out_bias, bool):
            raise TypeError(f"ModelArgs: attention_out_bias must be a bool or None, got "
                            f"{self.attention_out_bias!r}")
        if isinstance(self.embed_scale, bool) or not isinstance(self.embed_scale, (int, float)) \
                or not 0 < self.embed_scale < math.inf:
            raise ValueError(f"ModelArgs: embed_scale must be a positive number, got "
                             f"{self.embed_scale!r}")

    def _check_linear_attention(self) -> None:
        """Sizes and compatible settings of the Gated DeltaNet blocks."""
        if self.placement not in LINEAR_PLACEMENTS or self.position_embedding != "rope":
            raise ValueError(f"ModelArgs: linear_attention works with placements "
                             f"{LINEAR_PLACEMENTS} and position_embedding='rope', got "
                             f"{self.placement!r} and {self.position_embedding!r}")
        for name, default in (("linear_num_key_heads", self.num_attention_heads),
                              ("linear_num_value_heads", self.num_attention_heads),
                              ("linear_key_head_dim", self.head_dim),
                              ("linear_value_head_dim", self.head_dim)):
            if getattr(self, name) is None:
                setattr(self, name, default)
            _positive_int(getattr(self, name), name)
        _positive_int(self.linear_conv_kernel_dim, "linear_conv_kernel_dim")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"ModelArgs: linear_num_key_heads={self.linear_num_key_heads} must divide "
                f"linear_num_value_heads={self.linear_num_value_heads}")
        chunk = _positive_int(self.linear_chunk_size, "linear_chunk_size")
        if chunk & (chunk - 1):
            raise ValueError(f"ModelArgs: linear_chunk_size must be a power of two, got {chunk}")
        self.new_norm(self.linear_value_head_dim)  # the gated output norm, per value head

    @property
    def hypersphere(self) -> bool:
        """nGPT or anGPT: hidden states and weights live on (or in) the unit sphere."""
        return self.placement in HYPERSPHERE_NORMS

    def new_qk_norm(self) -> nn.Module | None:
        """A fresh per-head q/k norm: L2 for nGPT/anGPT, else ``qk_norm`` (None: no q/k norm)."""
        if self.hypersphere:
            return make_norm("l2norm", self.head_dim, eps=self.norm_eps)
        if self.qk_norm is None:
            return None
        return make_norm(self.qk_norm, self.head_dim, eps=self.norm_eps, **self.qk_norm_options)

    def new_norm(self, dims: int | None = None) -> nn.Module:
        """A fresh norm of ``norm_type`` over ``dims`` (default ``hidden_size``)."""
        return make_norm(self.norm_type, dims or self.hidden_size, eps=self.norm_eps,
                         **self.norm_options)
