"""Parameter groups and ready-made optimizers for mlx-lm style models.

Hidden matrices (2-D, or 3-D stacked experts, inside ``model.layers``) go to the Muon family;
embeddings, the output head, MoE routers, norm parameters, biases and scalars to AdamW.
SeeDNorm's dynamic ``alpha``/``beta`` are decayed (SPEC: the paper's stability fix); other norm
gains, biases and scalars are not. The output head is ``lm_head`` or, in an ``nn.Sequential``,
its last layer with a matrix. **Decision**: a MoE router (mlx-lm names it ``gate`` or
``router``) is a small matrix whose output scale sets the routing softmax, so it stays on AdamW.
"""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from ..norms import NORMS, SeeDNorm
from ._checks import (
    check_betas,
    check_flag,
    check_learning_rate,
    check_non_negative,
    check_positive,
)
from .adamw import AdamW
from .constrained import Constrained
from .muon import Muon, NorMuon
from .scion import Scion
from .trust import LAMB, LARS

OPTIMIZERS: dict[str, str] = {
    "adamw": "AdamW everywhere; decay on matrices, embeddings, head and SeeDNorm alpha/beta",
    "muon": "Muon (orthogonalized momentum) on hidden matrices, AdamW on the rest",
    "normuon": "NorMuon (Muon + per-neuron second moment, arXiv 2510.05491), AdamW on the rest",
    "scion": "Scion LMOs (arXiv 2502.07529): spectral hidden, colnorm embedding, sign head",
    "lamb": "LAMB (Adam + layer-wise trust ratio, arXiv 1904.00962) everywhere",
    "lars": "LARS (momentum SGD + layer-wise trust ratio, arXiv 1708.03888) everywhere",
}

# "matrix": hidden matrices; "embedding"/"head": the vocabulary maps; "decay": other decayed
# parameters; "no_decay": norm gains, biases, scalars.
PARAM_GROUPS = ("matrix", "embedding", "head", "decay", "no_decay")

_NORM_TYPES = (*NORMS.values(), nn.RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm,
               nn.InstanceNorm)

# AdamW defaults for the non-matrix groups (bias-corrected, as in most LM recipes).
_ADAMW_DEFAULTS = {"learning_rate": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                   "weight_decay": 0.1, "bias_correction": True}


class MultiOptimizer(optim.MultiOptimizer):
    """``mlx.optimizers.MultiOptimizer`` that joins its groups' updates by path.

    MLX merges them with ``mlx.utils.tree_merge``, which raises on ``tree_merge({}, None)``
    (mlx 0.32.4): any model whose groups' lists of layers differ in length with an empty slot
    past the shorter one's end fails (``nn.Sequential``, LoRA on the last layers, partly
    frozen models). Each parameter belongs to one group, so the flat updates just concatenate.
    """

    def apply_gradients(self, gradients: dict, parameters: dict):
        flat = []
        for opt, grads in zip(self.optimizers, self._split_dictionary(gradients)):
            flat.extend(tree_flatten(opt.apply_gradients(grads, parameters)))
        return tree_unflatten(flat) if flat else {}


def param_groups(model: nn.Module) -> dict[str, str]:
    """Every parameter path of ``model`` -> its group in ``PARAM_GROUPS``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be an mlx.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    head = _sequential_head(model)
    groups = {}
    for path, p in tree_flatten(model.parameters()):
        owner_path, _, leaf = path.rpartition(".")
        owner = modules.get(owner_path)
        in_head = head is not None and path.startswith(head) and p.ndim >= 2
        groups[path] = _group(owner_path, owner, leaf, p, path, in_head)
    return groups


def _sequential_head(model: nn.Module) -> str | None:
    """Path prefix of an ``nn.Sequential``'s last layer with a matrix: its output head."""
    if not isinstance(model, nn.Sequential):
        return None
    for i in reversed(range(len(model.layers))):
        if any(v.ndim >= 2 for _, v in tree_flatten(model.layers[i].parameters())):
            return f"layers.{i}."
    return None


def _group(owner_path: str, owner, leaf: str, p: mx.array, path: str, in_head: bool) -> str:
    if isinstance(owner, SeeDNorm) and leaf in ("alpha", "beta"):
        return "decay"
    if isinstance(owner, _NORM_TYPES):
        return "no_decay"
    if isinstance(owner, (nn.Embedding, nn.QuantizedEmbedding)):
        return "embedding"
    owner_name = owner_path.rpartition(".")[2]
    if owner_name == "lm_head" or in_head:
        return "head"
    if owner_name in ("gate", "router"):
        return "decay"
    if p.ndim >= 2:
        return "matrix" if "layers" in path.split(".") else "decay"
    return "no_decay"


def split_params(model: nn.Module) -> tuple[dict, dict]:
    """``(matrix_params, other_params)``: trainable hidden matrices for the Muon family, and
    everything else for AdamW, as two parameter trees."""
    groups = param_groups(model)
    flat = tree_flatten(model.trainable_parameters())
    matrix = [(k, v) for k, v in flat if groups[k] == "matrix"]
    other = [(k, v) for k, v in flat if groups[k] != "matrix"]
    return (tree_unflatten(matrix) if matrix else {}), (tree_unflatten(other) if other else {})


def make_optimizer(
    name: str, model: nn.Module, constraint: str | None = None, **hparams
) -> optim.Optimizer:
    """A ready ``MultiOptimizer`` for ``model`` (see ``OPTIMIZERS`` for the names).

    ``hparams`` go to the main optimizer (e.g. ``learning_rate``, ``momentum``,
    ``weight_decay``); ``adamw_<arg>`` go to the AdamW groups of "muon", "normuon" and
    "scion"; Scion takes ``rho_hidden``, ``rho_embedding``, ``rho_head``. ``constraint``
    ("normalize" for nGPT, "constrain" for anGPT) wraps the result in ``Constrained`` and makes
    weight decay default to 0 in every group, as those papers train.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(sorted(OPTIMIZERS))}")
    groups = param_groups(model)
    main, adamw = _split_hparams(name, hparams)
    if name == "adamw":
        _check_adamw(main, f"make_optimizer({name!r})", prefix="")
    else:
        _check_adamw(adamw, f"make_optimizer({name!r})", prefix="adamw_")
    if constraint is not None:
        # nGPT and anGPT train without weight decay (SPEC); explicit values still win.
        adamw.setdefault("weight_decay", 0.0)
        if name != "scion":
            main.setdefault("weight_decay", 0.0)
    adamw = {**_ADAMW_DEFAULTS, **adamw}
    if name == "adamw":
        adamw = {**_ADAMW_DEFAULTS, **main}
        parts = [(AdamW(**adamw), ("matrix", "embedding", "head", "decay"))]
    elif name in ("muon", "normuon"):
        muon_cls = Muon if name == "muon" else NorMuon
        parts = [(muon_cls(**main), ("matrix",)),
                 (AdamW(**adamw), ("embedding", "head", "decay"))]
    elif name == "scion":
        rho = {g: main.pop(f"rho_{g}", 1.0) for g in ("hidden", "embedding", "head")}
        parts = [(Scion(norm="spectral", rho=rho["hidden"], **main), ("matrix",)),
                 (Scion(norm="colnorm", rho=rho["embedding"], **main), ("embedding",)),
                 (Scion(norm="sign", rho=rho["head"], **main), ("head",)),
                 (AdamW(**adamw), ("decay",))]
    if name in ("lamb", "lars"):
        trust_cls = LAMB if name == "lamb" else LARS
        parts = [(trust_cls(**main), ("matrix", "embedding", "head", "decay"))]
        fallback = trust_cls(**{**main, "weight_decay": 0.0})
    else:
        fallback = AdamW(**{**adamw, "weight_decay": 0.0})
    filters = [_group_filter(groups, wanted) for _, wanted in parts]
    opt = MultiOptimizer([o for o, _ in parts] + [fallback], filters)
    return opt if constraint is None else Constrained(opt, mode=constraint)


def _check_adamw(hparams: dict, owner: str, prefix: str) -> None:
    """MLX's AdamW takes any value (a NaN learning rate trains to NaN): check as Muon does."""
    for key, value in hparams.items():
        name = prefix + key
        if key == "learning_rate":
            check_learning_rate(value, owner, name)
        elif key == "betas":
            check_betas(value, name, owner)
        elif key == "eps":
            check_positive(value, name, owner)
        elif key == "weight_decay":
            check_non_negative(value, name, owner)
        else:
            check_flag(value, name, owner)  # bias_correction, the only other AdamW argument


def _group_filter(groups: dict[str, str], wanted: tuple):
    # Paths unknown to the model (none in practice) fall through to the no-decay fallback.
    return lambda path, _grad: groups.get(path) in wanted


def _split_hparams(name: str, hparams: dict) -> tuple[dict, dict]:
    main_cls = {"adamw": AdamW, "muon": Muon, "normuon": NorMuon, "scion": Scion,
                "lamb": LAMB, "lars": LARS}[name]
    valid = set(inspect.signature(main_cls.__init__).parameters) - {"self", "muon_options"}
    if name == "normuon":
        valid |= set(inspect.signature(Muon.__init__).parameters) - {"self"}
    if name == "scion":
        valid = (valid - {"norm", "rho"}) | {"rho_hidden", "rho_embedding", "rho_head"}
    has_adamw = name in ("muon", "normuon", "scion")
    adamw_valid = {"learning_rate", "betas", "eps", "weight_decay", "bias_correction"}
    main, adamw, unknown = {}, {}, []
    for key, value in hparams.items():
        if has_adamw and key.startswith("adamw_") and key[6:] in adamw_valid:
            adamw[key[6:]] = value
        elif key in valid:
            main[key] = value
        else:
            unknown.append(key)
    if unknown:
        accepted = sorted(valid) + (sorted(f"adamw_{k}" for k in adamw_valid) if has_adamw else [])
        raise TypeError(f"make_optimizer({name!r}) got unknown hyperparameter(s) {unknown}; "
                        f"it accepts {accepted}")
    return main, adamw
