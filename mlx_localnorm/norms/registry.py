"""The norm registry: ``NORMS`` maps a name to its class, ``make_norm`` builds one."""

from __future__ import annotations

import inspect

import mlx.nn as nn

from .approx import ApproxNorm
from .dyt import DyT
from .l2 import L2Norm
from .layer import LayerNorm
from .patch import PatchNorm
from .rms import RMSNorm
from .seed import SeeDNorm

NORMS: dict[str, type[nn.Module]] = {
    "rmsnorm": RMSNorm,
    "layernorm": LayerNorm,
    "seednorm": SeeDNorm,
    "patchnorm": PatchNorm,
    "dyt": DyT,
    "l2norm": L2Norm,
    "angpt": ApproxNorm,
}


def norm_options(name: str) -> list[str]:
    """The keyword options that ``make_norm(name, dims, **options)`` accepts."""
    params = inspect.signature(_norm_class(name).__init__).parameters
    return [p for p in params if p not in ("self", "dims")]


def _norm_class(name: str) -> type[nn.Module]:
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a str, one of {', '.join(sorted(NORMS))}; "
                        f"got {name!r}")
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(sorted(NORMS))}")
    return NORMS[name]


def make_norm(name: str, dims: int, **options) -> nn.Module:
    """Build the norm registered as ``name`` over a last axis of size ``dims``.

    ``eps`` is dropped for the norms that have none (DyT, ApproxNorm), so a model can pass
    one ``eps`` whatever its norm; any other unknown option is an error.
    """
    cls = _norm_class(name)
    valid = norm_options(name)
    if "eps" not in valid:
        options.pop("eps", None)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"make_norm({name!r}) got unknown option(s) {unknown}; "
                        f"{cls.__name__} takes {valid}")
    return cls(dims, **options)
