"""Calibration of a norm swap: fit each new norm to what the source model computed there.

The source (a converted Pre-LN model, or any LocalNorm model whose norm is swapped and
placement kept) runs on sample tokens while each of its norms records its input ``x``; the
norm's output ``y`` is the target. Where the swapped model keeps a norm in the same place, its
new norm is fitted to ``x -> y``; a Peri-LN/Sandwich output norm,
which has no counterpart, is fitted to the identity on the branch output it will see (its
gain becomes about the branch output's RMS), and Peri-LN's embedding norm to the identity on
the embeddings. Fits are per norm, closed form in the gain and bias (per-channel least
squares on the norm's output at unit gain) and a 1-D search for DyT's ``alpha``; the shift
a bias-free norm cannot hold goes into the biases of the linear layers that read it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..models import Model
from ..norms import NORMS, DyT
from ..placements import PeriLN, PreLN

# An uncalibrated norm whose output is this close to its target (relative RMS) already
# computes the source's function (a carried-over SeeDNorm): it is left as it is.
EXACT = 1e-5
# DyT alpha search: a log grid over GRID_SPAN octaves around 1/std(x), then golden section.
GRID_SPAN = (-8.0, 6.0)
GRID_POINTS = 29
GOLDEN_STEPS = 30


@dataclass(frozen=True)
class Site:
    """One norm of the swapped model and what it is fitted to in the source.

    ``source`` is the path of a source module; ``"input"``: the target norm sees that
    module's input and should output the source module's output (a source norm);
    ``"output"``: it sees that module's output and should give it back (identity).
    ``scale`` multiplies the new norm's output in its block (LN-scaling's 1/sqrt(l)).
    ``consumers``: the linear layers that read the norm's output, which take the shift a
    norm without a bias cannot hold (GPT-2's LayerNorm bias, swapped to RMSNorm).
    """

    target: str
    source: str
    kind: str
    scale: float = 1.0
    consumers: tuple[str, ...] = ()


def plan(source: Model, target: Model) -> list[Site]:
    """Where each norm of ``target`` sits in ``source``: the norm at the same path when the
    placement is kept, else in a Pre-LN source, where Post-LN/Mix-LN norms have no
    counterpart and are left out (they keep their init)."""
    if source.args.placement == target.args.placement:
        return _same_places(source, target)
    if source.args.placement != "pre":
        raise ValueError(f"calibrate: a placement change needs a Pre-LN source (a converted "
                         f"checkpoint), got {source.args.placement!r} -> "
                         f"{target.args.placement!r}")
    sites = []
    for i, block in enumerate(target.layers):
        src, dst = f"model.layers.{i}", f"model.layers.{i}"
        attn, mlp = _readers(block, "self_attn", _QKV), _readers(block, "mlp", _UP)
        if isinstance(block, PreLN):
            sites += [Site(f"{dst}.input_layernorm", f"{src}.input_layernorm", "input",
                           block.scale, tuple(f"{dst}.{c}" for c in attn)),
                      Site(f"{dst}.post_attention_layernorm", f"{src}.post_attention_layernorm",
                           "input", block.scale, tuple(f"{dst}.{c}" for c in mlp))]
        elif isinstance(block, PeriLN):
            if "embed_layernorm" in block:
                sites.append(Site(f"{dst}.embed_layernorm", f"{src}.input_layernorm", "embed"))
            sites += [Site(f"{dst}.input_layernorm", f"{src}.input_layernorm", "input",
                           consumers=tuple(f"{dst}.{c}" for c in attn)),
                      Site(f"{dst}.post_attention_layernorm", f"{src}.self_attn", "output"),
                      Site(f"{dst}.pre_feedforward_layernorm",
                           f"{src}.post_attention_layernorm", "input",
                           consumers=tuple(f"{dst}.{c}" for c in mlp)),
                      Site(f"{dst}.post_feedforward_layernorm", f"{src}.mlp", "output")]
        if "q_norm" in block.self_attn and "q_norm" in source.layers[i].self_attn:
            sites += [Site(f"{dst}.self_attn.{n}", f"{src}.self_attn.{n}", "input")
                      for n in ("q_norm", "k_norm")]
    if "norm" in target.model and "norm" in source.model:
        sites.append(Site("model.norm", "model.norm", "input"))
    return sites


def _same_places(source: Model, target: Model) -> list[Site]:
    """Each norm of ``target`` replaces the source's norm at its path. The norms whose output
    only a branch reads (Pre-LN's two, Peri-LN's input norms) can hand a missing shift to
    the branch's first linear layers."""
    kinds = tuple(NORMS.values())
    old = dict(source.named_modules())
    sites = []
    for path, module in target.named_modules():
        if isinstance(module, kinds) and isinstance(old.get(path), kinds):
            sites.append(Site(path, path, "input", consumers=_branch_readers(target, path)))
    return sites


def _branch_readers(target: Model, path: str) -> tuple[str, ...]:
    """The shift takers of the norm at ``path`` (see :func:`_same_places`), else ()."""
    head, _, name = path.rpartition(".")
    node, key = _parent(target, head) if head.startswith("model.layers.") else (None, None)
    block = None if node is None else node[key]
    branch = {(PreLN, "input_layernorm"): ("self_attn", _QKV),
              (PreLN, "post_attention_layernorm"): ("mlp", _UP),
              (PeriLN, "input_layernorm"): ("self_attn", _QKV),
              (PeriLN, "pre_feedforward_layernorm"): ("mlp", _UP)}.get((type(block), name))
    if branch is None:
        return ()
    return tuple(f"{head}.{c}" for c in _readers(block, *branch))


_QKV = ("q_proj", "k_proj", "v_proj")
_UP = ("gate_proj", "up_proj")


def _readers(block: nn.Module, branch: str, names: tuple[str, ...]) -> list[str]:
    """The float linear layers with a bias that read a norm's output (others cannot shift)."""
    module = block[branch]
    return [f"{branch}.{n}" for n in names if n in module and isinstance(module[n], nn.Linear)
            and "bias" in module[n]]


_CALLS = itertools.count()


class _Recorder(nn.Module):
    """Calls ``module`` and keeps its first input and its output, as rows of the last axis."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.inputs, self.outputs = [], []
        self.first_call = None

    def __call__(self, x, *args, **kwargs):
        out = self.module(x, *args, **kwargs)
        if self.first_call is None:
            self.first_call = next(_CALLS)
        self.inputs.append(x.reshape(-1, x.shape[-1]).astype(mx.float32))
        self.outputs.append(out.reshape(-1, out.shape[-1]).astype(mx.float32))
        mx.eval(self.inputs[-1], self.outputs[-1])
        return out


def _parent(root: nn.Module, path: str):
    *parents, last = path.split(".")
    node = root
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, int(last) if isinstance(node, list) else last


def record(model: Model, batches: list[mx.array], paths: list[str]) -> dict[str, tuple]:
    """``{path: (inputs, outputs)}`` of the modules at ``paths`` over ``batches`` of tokens,
    in the order the forward pass first calls them."""
    recorders = {}
    # Deepest first, so a wrapped module's children are wrapped through the original tree.
    for path in sorted(set(paths), key=lambda p: -p.count(".")):
        node, key = _parent(model, path)
        recorders[path] = node[key] = _Recorder(node[key])
    try:
        for tokens in batches:
            mx.eval(model(tokens))
    finally:
        for path in reversed(recorders):
            node, key = _parent(model, path)
            node[key] = recorders[path].module
    missed = [path for path, r in recorders.items() if r.first_call is None]
    if missed:
        raise ValueError(f"calibrate: the forward pass never calls {', '.join(sorted(missed))}"
                         f"; there is nothing to fit it to")
    called = sorted(recorders.items(), key=lambda item: item[1].first_call)
    return {path: (mx.concatenate(r.inputs), mx.concatenate(r.outputs)) for path, r in called}


def _least_squares(z: mx.array, y: mx.array, intercept: bool) -> tuple[mx.array, mx.array]:
    """Per channel ``j``: the ``w_j`` (and ``b_j``) minimizing ``sum (w_j z_j + b_j - y_j)^2``."""
    if intercept:
        zc, yc = z - z.mean(axis=0), y - y.mean(axis=0)
        w = (zc * yc).sum(axis=0) / mx.maximum((zc * zc).sum(axis=0), 1e-30)
        return w, y.mean(axis=0) - w * z.mean(axis=0)
    w = (z * y).sum(axis=0) / mx.maximum((z * z).sum(axis=0), 1e-30)
    return w, mx.zeros_like(w)


def _sse(z, y, intercept: bool) -> float:
    w, b = _least_squares(z, y, intercept)
    return ((w * z + b - y) ** 2).sum().item()


def fit_dyt_alpha(x: mx.array, y: mx.array, intercept: bool = True) -> float:
    r"""DyT's ``alpha`` minimizing :math:`\sum (w \tanh(\alpha x) + b - y)^2` with the best
    per-channel ``w, b`` for each ``alpha`` (arXiv 2503.10622): a log-spaced grid around
    ``1/std(x)``, then golden-section search in log ``alpha`` between the best point's
    neighbours."""
    x, y = x.astype(mx.float32), y.astype(mx.float32)
    base = 1.0 / max(mx.sqrt((x * x).mean()).item(), 1e-30)

    def loss(log2_alpha: float) -> float:
        return _sse(mx.tanh(base * 2.0**log2_alpha * x), y, intercept)

    step = (GRID_SPAN[1] - GRID_SPAN[0]) / (GRID_POINTS - 1)
    grid = [GRID_SPAN[0] + k * step for k in range(GRID_POINTS)]
    best = min(range(GRID_POINTS), key=lambda k: loss(grid[k]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(GOLDEN_STEPS):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return base * 2.0 ** ((low + high) / 2)


def _unit_output(norm: nn.Module, x: mx.array) -> mx.array:
    """The norm's output with gain 1 and no bias (its parameters are restored after)."""
    saved = dict(norm.parameters())
    unit = {"weight": mx.zeros_like(norm.weight) if getattr(norm, "zero_centered", False)
            else mx.ones_like(norm.weight)}
    if "bias" in norm:
        unit["bias"] = mx.zeros_like(norm.bias)
    norm.update(unit)
    z = norm(x).astype(mx.float32)
    norm.update(saved)
    return z


def fit_norm(norm: nn.Module, x: mx.array, y: mx.array, shift: bool = False):
    """Set ``norm``'s gain (and bias, DyT's alpha) so that ``norm(x)`` is closest to ``y``.

    ``shift``: fit a per-channel shift even if ``norm`` has no bias, and return it (for the
    layers after the norm to add); else the fit has no shift without a bias. Returns False
    for norms whose gain is not a vector over the last axis (PatchNorm's full matrix, L2Norm
    without a scale), left as they are; else True, or the shift.
    """
    weight = norm.get("weight") if isinstance(norm, nn.Module) else None
    if not isinstance(weight, mx.array) or weight.shape != (x.shape[-1],):
        return False
    intercept = "bias" in norm or shift
    if isinstance(norm, DyT):
        norm.alpha = mx.array([fit_dyt_alpha(x, y, intercept)], dtype=norm.alpha.dtype)
    w, b = _least_squares(_unit_output(norm, x), y, intercept)
    if getattr(norm, "zero_centered", False):
        w = w - 1
    norm.weight = w.astype(weight.dtype)
    if "bias" in norm:
        norm.bias = b.astype(norm.bias.dtype)
        return True
    return b if shift else True


def _relative_error(norm: nn.Module, x: mx.array, y: mx.array, shift=None) -> float:
    out = norm(x).astype(mx.float32) + (0 if shift is None else shift)
    return (mx.sqrt(((out - y) ** 2).mean()) / mx.maximum(mx.sqrt((y * y).mean()), 1e-30)).item()


def calibrate(source: Model, target: Model, batches: list[mx.array],
              sequential: bool = True) -> dict[str, dict]:
    """Fit the norms of ``target`` (``source`` with swapped norms or placement) in place.

    ``batches``: token arrays ``(B, L)`` of sample text. Each norm of :func:`plan` is fitted
    to what the source computed at its place on these tokens, unless it already reproduces
    it (relative error below ``EXACT``, e.g. SeeDNorm carried over from RMSNorm), or gets
    no better (its init is kept). The outputs to match come from the source; the inputs
    are, with ``sequential`` (one forward pass of ``target`` per norm, in order), what the
    norm sees in ``target`` once the norms before it are fitted, else what the source's
    norm saw (one pass in all; the fits then ignore how earlier swaps moved the inputs).
    Returns ``{target norm path: {"before": error, "after": error, "fitted": bool}}``, the
    relative RMS error of each norm's output before and after.
    """
    if not isinstance(batches, (list, tuple)) or not batches or not all(
            isinstance(b, mx.array) and b.ndim == 2 and mx.issubdtype(b.dtype, mx.integer)
            for b in batches):
        raise TypeError(f"calibrate: batches must be a non-empty list of (B, L) integer "
                        f"token arrays, got {type(batches).__name__} {batches!r:.80}")
    sites = plan(source, target)
    if sequential:  # in forward order: each fit sees the fitted norms before it
        order = list(record(target, batches[:1], [site.target for site in sites]))
        sites.sort(key=lambda site: order.index(site.target))
    recorded = record(source, batches, [site.source for site in sites])
    norms = dict(target.named_modules())
    report = {}
    for site in sites:
        inputs, outputs = recorded[site.source]
        x = outputs if site.kind == "output" else inputs
        y = outputs if site.kind == "input" else x
        y = y / site.scale
        norm = norms[site.target]
        if sequential:  # what the new norm sees once the norms before it are fitted
            x = record(target, batches, [site.target])[site.target][0]
        before, initial = _relative_error(norm, x, y), dict(norm.parameters())
        fitted = before > EXACT and fit_norm(norm, x, y, shift=bool(site.consumers))
        shift = fitted if isinstance(fitted, mx.array) else None
        after = _relative_error(norm, x, y, shift)
        if fitted is not False and after >= before:  # the fit does not help: keep the init
            norm.update(initial)
            fitted, shift, after = False, None, before
        if shift is not None:
            _add_shift(norms, site.consumers, shift * site.scale)
        report[site.target] = {"before": before, "after": after,
                               "fitted": fitted is not False}
    return report


def _add_shift(modules: dict, consumers: tuple[str, ...], shift: mx.array) -> None:
    """``W (z + s) + b = W z + (b + W s)``: the readers of a norm take its missing shift."""
    for path in consumers:
        linear = modules[path]
        linear.bias = linear.bias + (linear.weight @ shift.astype(linear.weight.dtype)
                                     ).astype(linear.bias.dtype)
