"""The LocalNorm transformer: a decoder-only LM whose norm and placement are settings.

Follows mlx-lm's model contract (``mlx_lm/models/llama.py``): ``Model(args)`` with
``.layers``, ``__call__(inputs, cache=None)`` -> logits, ``make_cache()``, ``sanitize()``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from ..constraints import project_weights
from ..placements import has_final_norm, make_block, scaled_vector
from .args import ModelArgs
from .layers import MLP, Attention, MoE
from .linear_attention import GatedDeltaNet


def _check_tokens(inputs, vocab_size: int, cache) -> None:
    """Type, shape and range of token ids: out-of-range ids crash or corrupt MLX's gather."""
    if not isinstance(inputs, mx.array) or not mx.issubdtype(inputs.dtype, mx.integer):
        kind = inputs.dtype if isinstance(inputs, mx.array) else type(inputs).__name__
        raise TypeError(f"Model expects integer token ids as an mx.array, got {kind}")
    if inputs.ndim != 2:
        raise ValueError(f"Model expects token ids of shape (batch, length), got {inputs.shape}")
    if inputs.size == 0:
        raise ValueError(f"Model expects at least one token, got shape {inputs.shape}")
    if _sampled_tokens(inputs, cache):
        return
    try:
        low, high = mx.stack([inputs.min(), inputs.max()]).tolist()
    except ValueError:  # inside mx.compile or vmap, where values cannot be read
        return
    if low < 0 or high >= vocab_size:
        raise ValueError(f"Model: token ids must be in [0, vocab_size={vocab_size}), "
                         f"got ids from {low} to {high}")


def _sampled_tokens(inputs, cache) -> bool:
    """mlx-lm's decode step: its own samples (unsigned, in range) fed back on a warm cache.

    They are still being computed; reading them would stall mlx-lm's asynchronous pipeline.
    """
    if cache is None or mx.issubdtype(inputs.dtype, mx.signedinteger):
        return False
    return cache[0] is not None and not cache[0].empty()


class LocalNormModel(nn.Module):
    """Embedding, blocks of the configured placement, and the final norm if it has one."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        if args.position_embedding == "learned":
            self.embed_positions = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        dims, layers = args.hidden_size, args.num_hidden_layers
        self.layers = [
            make_block(
                args.placement, i, layers,
                GatedDeltaNet(args) if kind == "linear_attention" else Attention(args),
                MoE(args) if args.num_experts else MLP(
                    dims, args.intermediate_size, args.mlp_bias, scaled=args.hypersphere,
                    activation=args.mlp_activation, gated=args.mlp_gated),
                args.new_norm, mix_ratio=args.mix_ratio, dims=dims,
                attn_dims=args.num_attention_heads * args.head_dim,
                mlp_dims=args.intermediate_size, alpha_init=args.ngpt_alpha_init)
            for i, kind in enumerate(args.layer_types)
        ]
        if has_final_norm(args.placement):
            self.norm = args.new_norm()
        # A tuple, not a list: MLX would walk a list attribute as part of the module tree.
        self.layer_types = tuple(args.layer_types)

    def __call__(self, inputs: mx.array, cache=None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        if self.args.embed_scale != 1.0:
            h = h * mx.array(self.args.embed_scale, dtype=h.dtype)
        cache = cache or [None] * len(self.layers)
        if "embed_positions" in self:
            h = h + self.embed_positions(self._positions(h.shape[1], cache[0]))
        # One mask per layer type, made from the first cache of that type (as mlx-lm).
        masks = {}
        for kind in set(self.layer_types):
            first = cache[self.layer_types.index(kind)]
            if kind == "linear_attention":
                masks[kind] = create_ssm_mask(h, first)
            else:
                window = self.args.sliding_window if kind == "sliding_attention" else None
                masks[kind] = create_attention_mask(h, first, window_size=window)
        for layer, kind, layer_cache in zip(self.layers, self.layer_types, cache):
            h = layer(h, masks[kind], layer_cache)
        return self.norm(h) if "norm" in self else h

    def _positions(self, length: int, cache) -> mx.array:
        """Absolute positions of the next ``length`` tokens, after those in ``cache``."""
        offset = 0 if cache is None else cache.offset
        limit = self.args.max_position_embeddings
        if offset + length > limit:
            raise ValueError(f"Model: learned positions reach max_position_embeddings={limit}; "
                             f"got {length} tokens after {offset} cached ones")
        return mx.arange(offset, offset + length)


class Model(nn.Module):
    r"""The LocalNorm transformer (mlx-lm model interface).

    .. math:: \mathrm{logits} = W_{out}\, N_f(\mathrm{block}_L(\cdots \mathrm{block}_1(E[x])))

    Blocks come from ``ln.placements`` (Post/Pre/Mix/Peri/Sandwich/LN-Scaling with any norm
    of ``ln.NORMS``, nGPT arXiv 2410.01131, anGPT arXiv 2505.22014). nGPT/anGPT scale the
    logits by ``s_z`` (stored at ``1/sqrt(D)``, used as ``p * sqrt(D)``) and keep their
    weights on (in) the unit sphere: call :meth:`project_weights` after every optimizer step.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LocalNormModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.hypersphere:
            self.s_z, self.s_z_factor = scaled_vector(args.vocab_size, 1.0,
                                                      args.hidden_size**-0.5)
            self.project_weights()

    def __call__(self, inputs: mx.array, cache=None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        return self.head(self.hidden_states(inputs, cache, input_embeddings))

    def hidden_states(self, inputs: mx.array, cache=None,
                      input_embeddings: mx.array | None = None) -> mx.array:
        """The final hidden states ``(B, T, D)`` the head turns into logits."""
        if input_embeddings is None:
            _check_tokens(inputs, self.args.vocab_size, cache)
        return self.model(inputs, cache, input_embeddings)

    def head(self, h: mx.array) -> mx.array:
        """Logits of final hidden states ``h`` ``(..., D)``: the output projection (tied or
        not), scaled by nGPT/anGPT's ``s_z``. Apart from :meth:`hidden_states` so a loss can
        run it on the positions it trains on only."""
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if "s_z" in self:
            logits = logits * (self.s_z * self.s_z_factor).astype(logits.dtype)
        return logits

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def make_cache(self) -> list:
        """mlx-lm caches: ``RotatingKVCache`` for sliding-window blocks, ``ArraysCache(2)``
        (conv inputs, recurrent state) for linear-attention blocks, ``KVCache`` otherwise."""
        caches = {"sliding_attention": lambda: RotatingKVCache(max_size=self.args.sliding_window),
                  "linear_attention": lambda: ArraysCache(size=2), "full_attention": KVCache}
        return [caches[kind]() for kind in self.model.layer_types]

    def sanitize(self, weights: dict) -> dict:
        """Drop what mlx-lm checkpoints may carry but this model does not use."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        """Tensor parallelism as mlx-lm's Llama/Qwen3 (``mlx_lm.utils.sharded_load`` calls it).

        Each rank of ``group`` (default: ``mx.distributed.init()``) keeps 1/N of the attention
        heads and of the MLP (or each expert's) width; o_proj and down_proj sum across ranks.
        Norms, embeddings and the head are replicated. For inference: nGPT/anGPT's
        ``project_weights`` does not know the split.
        """
        if "linear_attention" in self.args.layer_types:
            raise ValueError("Model.shard: linear_attention blocks cannot be sharded yet; got "
                             f"layer_types {self.args.layer_types}")
        group = group or mx.distributed.init()
        width = "moe_intermediate_size" if self.args.num_experts else "intermediate_size"
        for name in ("num_key_value_heads", width):
            if getattr(self.args, name) % group.size():
                raise ValueError(f"Model.shard: {name}={getattr(self.args, name)} must be "
                                 f"divisible by the group size {group.size()}")
        for layer in self.layers:
            layer.self_attn.shard(group)
            layer.mlp.shard(group)

    @property
    def quant_predicate(self):
        """mlx-lm's quantization rule for MoE models: routers (``mlp.gate``) at 8 bits."""

        def predicate(path: str, module: nn.Module):
            if path.endswith("mlp.gate"):
                # mlx-lm's group of 64; a router too narrow for it stays in full precision.
                return module.weight.shape[-1] % 64 == 0 and {"group_size": 64, "bits": 8}
            return True

        return predicate

    def aux_loss(self) -> mx.array:
        """The MoE load-balance loss of the last forward pass (0 for a dense model).

        Call it inside the same loss function as the forward pass, so it is differentiated
        (and compiled) with it.
        """
        losses = [layer.mlp._aux_loss for layer in self.layers if isinstance(layer.mlp, MoE)]
        return sum(losses, mx.array(0.0))

    def project_weights(self) -> None:
        """nGPT: normalize, anGPT: constrain the residual weights to the unit sphere (else no-op)."""
        if self.args.placement == "ngpt":
            project_weights(self, mode="normalize")
        elif self.args.placement == "angpt":
            project_weights(self, mode="constrain")
