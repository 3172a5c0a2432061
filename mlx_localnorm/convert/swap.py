"""Another norm or placement for a converted model, carrying over what keeps its meaning."""

from __future__ import annotations

import dataclasses

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models import Model
from ..models.quantized import quantized_layers
from ..norms import NORMS
from ..placements import HYPERSPHERE_NORMS, PLACEMENTS, check_placement

# Placements whose norms sit where the source's Pre-LN norms sit, so their gains carry over.
_SAME_POSITIONS = ("pre", "lnscaling")
# nGPT/anGPT change attention, MLP and weights, not just norms.
SWAP_PLACEMENTS = tuple(p for p in PLACEMENTS if p not in HYPERSPHERE_NORMS)


def check_swap(norm: str | None, placement: str | None, source: str = "pre") -> None:
    """Reject a norm or placement ``swap_model_norms`` cannot use on a model of placement
    ``source`` (converted checkpoints are Pre-LN), before any work."""
    if norm is not None and (not isinstance(norm, str) or norm not in NORMS):
        raise ValueError(f"from_hf: norm must be None or one of {', '.join(sorted(NORMS))}, "
                         f"got {norm!r}")
    if placement is not None and (not isinstance(placement, str)
                                  or placement not in SWAP_PLACEMENTS):
        raise ValueError(f"from_hf: placement must be None or one of "
                         f"{', '.join(SWAP_PLACEMENTS)} (nGPT/anGPT change more than norms), "
                         f"got {placement!r}")
    if (norm or placement) and source in HYPERSPHERE_NORMS:
        raise ValueError(f"from_hf: the source is an {source} model (no norm layers, weights "
                         "on the hypersphere); norm/placement swaps work on the other "
                         "placements")
    if norm is not None:
        check_placement(placement or source, norm)


def swap_model_norms(model: Model, norm: str | None, placement: str | None) -> Model:
    """A new :class:`Model` with ``norm`` (None: the same) and ``placement`` (None: the same).

    Attention, MLP and embedding weights are copied (quantized layers stay quantized as they
    were). A new norm takes the old norm's gain
    (and bias, if both have one) when it sits in the same place: q/k norms always, block
    and final norms when the placement is kept or both are Pre-LN/LN-scaling.
    ``norm="seednorm"`` on an RMSNorm model thus keeps the function.
    """
    args = model.args
    norm = norm or args.norm_type
    same_norm = norm == args.norm_type
    new = Model(dataclasses.replace(
        args, norm_type=norm, placement=placement or args.placement,
        norm_options=args.norm_options if same_norm else {},
        qk_norm=args.qk_norm if same_norm or args.qk_norm is None else norm,
        qk_norm_options=args.qk_norm_options if same_norm else {}))
    quantized = quantized_layers(model)
    nn.quantize(new, class_predicate=lambda path, _: quantized.get(path, False))
    norm_kinds = tuple(NORMS.values())
    new_norms = {p: m for p, m in new.named_modules() if isinstance(m, norm_kinds)}
    old_modules = dict(model.named_modules())
    kept = new.args.placement == args.placement or {
        new.args.placement, args.placement} <= set(_SAME_POSITIONS)
    weights = []
    for path, module in new_norms.items():
        old = old_modules.get(path)
        if isinstance(old, norm_kinds) and (kept or path.endswith(("q_norm", "k_norm"))):
            weights += [(f"{path}.{k}", v) for k, v in _carried(old, module).items()]
    old_params = dict(tree_flatten(model.parameters()))
    weights += [(key, old_params[key]) for key, _ in tree_flatten(new.parameters())
                if key.rpartition(".")[0] not in new_norms]
    new.load_weights(weights, strict=False)
    return new


def _carried(old: nn.Module, new: nn.Module) -> dict:
    """The gain (as ``1 + w`` for zero-centred norms) and bias ``new`` can take from ``old``."""
    carried = {}
    if "weight" in old and "weight" in new and old.weight.shape == new.weight.shape:
        gain = old.weight + 1 if getattr(old, "zero_centered", False) else old.weight
        carried["weight"] = gain - 1 if getattr(new, "zero_centered", False) else gain
    if "bias" in old and "bias" in new and old.bias.shape == new.bias.shape:
        carried["bias"] = old.bias
    return carried
