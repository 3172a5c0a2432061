"""``export_hf``: a LocalNorm model -> a Hugging Face checkpoint directory ``transformers`` reads.

Only models ``transformers`` can compute exist there: RMSNorm or LayerNorm in Pre-LN blocks,
with each architecture's own options (the inverse of ``architectures.py``). Anything else is
refused with the reason, before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import make_shards

from ..models import Model
from ..models.quantized import quantized_layers
from .architectures import ROPE_TYPES

_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def check_exportable(model: Model) -> None:
    """Raise ValueError naming every reason ``transformers`` has no such model."""
    if not isinstance(model, Model):
        raise TypeError(f"export_hf: model must be an mlx_localnorm Model, got "
                        f"{type(model).__name__}")
    args, reasons = model.args, []
    if args.placement != "pre":
        reasons.append(f"placement {args.placement!r} (transformers' models are Pre-LN)")
    if args.norm_type not in ("rmsnorm", "layernorm"):
        reasons.append(f"norm {args.norm_type!r} (transformers has RMSNorm and LayerNorm)")
    if set(args.norm_options) - {"zero_centered"} or args.qk_norm_options:
        reasons.append(f"norm options {args.norm_options or args.qk_norm_options}")
    if args.qk_norm not in (None, "rmsnorm"):
        reasons.append(f"q/k norm {args.qk_norm!r}")
    if args.num_experts or args.attention_gate:
        reasons.append("MoE or gated attention")
    if len(set(args.layer_types)) > 1 or not set(args.layer_types) <= {
            "full_attention", "sliding_attention"}:
        reasons.append(f"layer types {sorted(set(args.layer_types))} (one kind of attention "
                       "in every block)")
    if args.rope_traditional:
        reasons.append("interleaved (traditional) RoPE")
    if _rope_type(args) not in ROPE_TYPES:
        reasons.append(f"RoPE scaling {_rope_type(args)!r}")
    if quantized_layers(model):
        reasons.append("quantized layers (transformers reads float checkpoints)")
    if not reasons:
        reasons = _architecture(args)[1]
    if reasons:
        raise ValueError(f"export_hf: transformers has no model with {'; '.join(reasons)}; "
                         "export-hf writes RMSNorm/LayerNorm Pre-LN models only")


def _rope_type(args) -> str:
    scaling = args.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _architecture(args) -> tuple[str, list[str]]:
    """The Hugging Face model_type for ``args`` and what does not fit it (empty: it fits)."""
    zero_centered = args.norm_options.get("zero_centered", False)
    sliding = args.layer_types[0] == "sliding_attention"
    same_bias = args.attention_out_bias == args.attention_bias
    if args.norm_type == "layernorm":
        gpt2 = (args.position_embedding == "learned" and not args.mlp_gated
                and args.mlp_activation == "gelu_tanh" and args.attention_bias and same_bias
                and args.mlp_bias and args.num_key_value_heads == args.num_attention_heads
                and args.head_dim * args.num_attention_heads == args.hidden_size
                and args.qk_norm is None and not sliding and args.embed_scale == 1.0)
        return "gpt2", [] if gpt2 else [
            "LayerNorm outside GPT-2's form (learned positions, plain tanh-GELU MLP, biases "
            "everywhere, no GQA, no q/k norm, no sliding window)"]
    common = []
    if args.position_embedding != "rope" or not args.mlp_gated:
        common.append("RMSNorm with learned positions or an ungated MLP")
    if zero_centered:
        gemma = (args.mlp_activation == "gelu_tanh" and args.tie_word_embeddings
                 and math.isclose(args.embed_scale, math.sqrt(args.hidden_size))
                 and same_bias and not args.mlp_bias and args.qk_norm is None and not sliding)
        return "gemma", common + ([] if gemma else [
            "a zero-centred RMSNorm outside Gemma's form (GeGLU, tied embeddings scaled by "
            "sqrt(D), no MLP bias, no q/k norm, no sliding window)"])
    if args.embed_scale != 1.0:
        common.append(f"embed_scale {args.embed_scale} without Gemma's zero-centred norms")
    if args.qk_norm is not None:
        fits = same_bias and not args.mlp_bias and args.mlp_activation == "silu"
        return "qwen3", common + ([] if fits and not sliding else [
            "a q/k norm outside Qwen3's form (SwiGLU, no MLP bias, full attention)"])
    if args.attention_bias and not args.attention_out_bias:
        fits = not args.mlp_bias and args.mlp_activation == "silu" and not sliding
        return "qwen2", common + ([] if fits else [
            "q/k/v-only biases outside Qwen2's form (SwiGLU, no MLP bias, full attention)"])
    if not same_bias:
        common.append("a bias in o_proj only")
    if sliding:
        fits = not args.attention_bias and not args.mlp_bias and args.mlp_activation == "silu"
        return "mistral", common + ([] if fits else [
            "sliding windows outside Mistral's form (SwiGLU, no biases)"])
    return "llama", common


def hf_config(args, eos_token_id=None) -> tuple[str, dict]:
    """``(model_type, config keywords)`` for ``transformers.AutoConfig.for_model``."""
    model_type, _ = _architecture(args)
    if model_type == "gpt2":
        config = {"vocab_size": args.vocab_size, "n_embd": args.hidden_size,
                  "n_layer": args.num_hidden_layers, "n_head": args.num_attention_heads,
                  "n_inner": args.intermediate_size, "n_positions": args.max_position_embeddings,
                  "layer_norm_epsilon": args.norm_eps, "activation_function": "gelu_new"}
    else:
        scaling = {k: v for k, v in (args.rope_scaling or {}).items()
                   if k not in ("rope_type", "type")}
        config = {"vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
                  "intermediate_size": args.intermediate_size,
                  "num_hidden_layers": args.num_hidden_layers,
                  "num_attention_heads": args.num_attention_heads,
                  "num_key_value_heads": args.num_key_value_heads, "head_dim": args.head_dim,
                  "rms_norm_eps": args.norm_eps, "hidden_act": _ACTIVATIONS[args.mlp_activation],
                  "rope_parameters": {"rope_type": _rope_type(args), "rope_theta": args.rope_theta,
                                      **scaling}}
        if args.max_position_embeddings is not None:
            config["max_position_embeddings"] = args.max_position_embeddings
        if model_type in ("llama", "qwen3", "gemma"):
            config["attention_bias"] = args.attention_bias
        if model_type == "llama":
            config["mlp_bias"] = args.mlp_bias
        if model_type == "mistral":
            config["sliding_window"] = args.sliding_window
    config["tie_word_embeddings"] = args.tie_word_embeddings
    config.update(eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None)
    return model_type, config


def hf_tensors(model: Model, model_type: str) -> dict[str, mx.array]:
    """The model's weights under Hugging Face names and layouts."""
    weights = dict(tree_flatten(model.parameters()))
    if model_type != "gpt2":
        return weights
    return _gpt2_tensors(weights, model.args.num_hidden_layers)


def _gpt2_tensors(weights: dict, layers: int) -> dict[str, mx.array]:
    """GPT-2's names, fused ``c_attn`` and ``Conv1D`` (in, out) weights."""
    out = {"transformer.wte.weight": weights.pop("model.embed_tokens.weight"),
           "transformer.wpe.weight": weights.pop("model.embed_positions.weight")}
    for kind in ("weight", "bias"):
        out[f"transformer.ln_f.{kind}"] = weights.pop(f"model.norm.{kind}")
    if "lm_head.weight" in weights:
        out["lm_head.weight"] = weights.pop("lm_head.weight")
    for i in range(layers):
        ours, theirs = f"model.layers.{i}", f"transformer.h.{i}"
        for kind in ("weight", "bias"):
            qkv = [weights.pop(f"{ours}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            fused = mx.concatenate(qkv, axis=0)
            out[f"{theirs}.attn.c_attn.{kind}"] = fused.T if kind == "weight" else fused
            for mine, name in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                out[f"{theirs}.{name}.{kind}"] = weights.pop(f"{ours}.{mine}.{kind}")
            for mine, name in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                               ("mlp.down_proj", "mlp.c_proj")):
                value = weights.pop(f"{ours}.{mine}.{kind}")
                out[f"{theirs}.{name}.{kind}"] = value.T if kind == "weight" else value
    if weights:  # every parameter must have found its place
        raise ValueError(f"export_hf: no GPT-2 name for {sorted(weights)}")
    return out


def export_hf(model: Model, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out`` as a Hugging Face checkpoint directory.

    config.json (the matching ``model_type``: llama, mistral, qwen2, qwen3, gemma or gpt2),
    model.safetensors (or shards with model.safetensors.index.json) with Hugging Face names
    and layouts, and the tokenizer files. ``from_hf`` reads it back to the same logits.
    Written beside ``out`` and renamed: a failure leaves nothing; an existing non-empty
    ``out`` is replaced only with ``overwrite=True``.
    """
    from transformers import AutoConfig

    check_exportable(model)
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export_hf: out {str(out)!r} exists and is not empty; choose "
                         "another directory or pass overwrite=True")
    model_type, config = hf_config(model.args, getattr(tokenizer, "eos_token_id", None))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            AutoConfig.for_model(model_type, **config).save_pretrained(str(staging))
        _save_tensors(hf_tensors(model, model_type), staging)
        tokenizer.save_pretrained(str(staging))
        _replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _save_tensors(tensors: dict[str, mx.array], directory: Path) -> None:
    shards = make_shards(tensors)
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, {"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an old ``out`` goes aside first and is deleted last."""
    if not out.exists():
        os.rename(staging, out)
        return
    aside = out.with_name(f".{out.name}.old")
    os.rename(out, aside)
    os.rename(staging, out)
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink()
