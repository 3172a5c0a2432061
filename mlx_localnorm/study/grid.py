"""Grid files of the study: named families of run settings over shared base settings.

A grid is TOML (read with ``tomllib``) or JSON with the same structure::

    [study]                       # optional
    seeds = [0, 1, 2]             # every family runs these seeds
    target_loss = 5.5             # results give the tokens each run needs to reach it
    spike_threshold = 0.5         # a loss spike: this many nats above the recent median
    diagnose = true               # per-layer diagnostics of each family's first run

    [base]                        # PretrainConfig fields shared by every language-model run
    vocab_size = 2048

    [vision]                      # VisionConfig fields shared by every vision run
    steps = 300

    [family.pre-rmsnorm]          # one family: its overrides of [base] (or [vision])
    group = "norms"               # families of a group share a plot (default: the family);
                                  # a list puts the family in several plots
    kind = "lm"                   # "lm" (PretrainConfig) or "vision" (VisionConfig)
    learning_rates = [1e-3, 3e-3] # the sweep: every rate on the first seed, the best on all
    norm = "rmsnorm"

Every family is checked when the grid is read (each of its configs is built), so a bad
value fails at once with a one-line message that names the file, the family and the key.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train import PretrainConfig
from .vision import VisionConfig

KINDS = {"lm": PretrainConfig, "vision": VisionConfig}
SECTIONS = ("study", "base", "vision", "family")
STUDY_KEYS = {"seeds": list, "target_loss": (int, float), "spike_threshold": (int, float),
              "diagnose": bool}
FAMILY_KEYS = ("group", "kind", "learning_rates")
# Joins the groups of a family that is in several (results.csv's group column).
GROUP_SEPARATOR = "+"
# Set by the runner for each run, so a grid may not set them.
RUN_KEYS = ("out_dir", "seed", "learning_rate")


@dataclass(frozen=True)
class Family:
    """One family: its overrides of the base settings and its learning-rate sweep."""

    name: str
    kind: str
    group: str  # its groups joined by GROUP_SEPARATOR
    learning_rates: tuple[float, ...]
    overrides: dict[str, Any]
    base: dict[str, Any]

    def config(self, out_dir: str | Path, learning_rate: float, seed: int):
        """The config of one run of this family."""
        quiet = {"progress": False} if self.kind == "lm" else {}  # the study has its own bar
        return KINDS[self.kind].from_dict({**quiet, **self.base, **self.overrides,
                                           "out_dir": str(out_dir), "seed": seed,
                                           "learning_rate": learning_rate})

    def describe(self) -> str:
        """The overrides in one line, e.g. ``norm=rmsnorm placement=pre``."""
        return " ".join(f"{k}={v}" for k, v in self.overrides.items())


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    families: tuple[Family, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    target_loss: float = 6.0
    spike_threshold: float = 0.5
    diagnose: bool = True
    source: str = field(default="<grid>", compare=False)


def read_grid(path: str | Path) -> Grid:
    """Parse and check a grid file; ``ValueError`` names the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ValueError(f"grid {path}: not valid {kind}: {err}") from None
    return parse_grid(values, str(path))


def parse_grid(values: Any, where: str = "grid") -> Grid:
    """A :class:`Grid` from the mapping a grid file holds."""
    _check_mapping(values, where)
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; valid: {list(SECTIONS)}")
    study = values.get("study", {})
    _check_mapping(study, f"{where}: [study]")
    for key, value in study.items():
        if key not in STUDY_KEYS:
            raise ValueError(f"{where}: [study] has unknown key {key!r}; valid: "
                             f"{list(STUDY_KEYS)}")
        if not isinstance(value, STUDY_KEYS[key]) or (
                isinstance(value, bool) and STUDY_KEYS[key] is not bool):
            raise TypeError(f"{where}: [study] {key} must be a {_type_name(STUDY_KEYS[key])}, "
                            f"got {value!r}")
    seeds = tuple(study.get("seeds", (0, 1, 2)))
    check_seeds(seeds, f"{where}: [study] seeds")
    bases = {"lm": values.get("base", {}), "vision": values.get("vision", {})}
    for kind, section in (("lm", "base"), ("vision", "vision")):
        _check_mapping(bases[kind], f"{where}: [{section}]")
        _check_no_run_keys(bases[kind], f"{where}: [{section}]")
    families = values.get("family", {})
    _check_mapping(families, f"{where}: [family]")
    if not families:
        raise ValueError(f"{where}: no [family.NAME] table; a grid needs at least one family")
    parsed = tuple(_family(name, spec, bases, seeds[0], f"{where}: [family.{name}]")
                   for name, spec in families.items())
    return Grid(parsed, seeds, float(study.get("target_loss", 6.0)),
                float(study.get("spike_threshold", 0.5)), study.get("diagnose", True), where)


def check_seeds(seeds: Any, where: str) -> None:
    """Seeds: a non-empty list of distinct ints >= 0."""
    if (not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                             for s in seeds) or len(set(seeds)) != len(seeds)):
        raise ValueError(f"{where} must be a non-empty list of distinct ints >= 0, "
                         f"got {list(seeds)!r}")


def _family(name: str, spec: Any, bases: dict[str, dict], seed: int, where: str) -> Family:
    _check_mapping(spec, where)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{where}: a family name must be a plain folder name, got {name!r}")
    kind = spec.get("kind", "lm")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    group = spec.get("group", name)
    groups = [group] if isinstance(group, str) else group
    if (not isinstance(groups, list) or not groups or not all(
            isinstance(g, str) and g and GROUP_SEPARATOR not in g for g in groups)):
        raise TypeError(f"{where}: group must be a name or a list of names (without "
                        f"{GROUP_SEPARATOR!r}), got {group!r}")
    rates = spec.get("learning_rates")
    if (not isinstance(rates, list) or not rates or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)
            and r > 0 for r in rates) or len(set(rates)) != len(rates)):
        raise ValueError(f"{where}: learning_rates must be a non-empty list of distinct "
                         f"numbers > 0, got {rates!r}")
    overrides = {k: v for k, v in spec.items() if k not in FAMILY_KEYS}
    _check_no_run_keys(overrides, where)
    family = Family(name, kind, GROUP_SEPARATOR.join(groups), tuple(float(r) for r in rates),
                    overrides, bases[kind])
    try:  # every field, range and name checked now, not hours into the study
        family.config("<check>", family.learning_rates[0], seed)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{where}: {err}") from None
    return family


def _check_no_run_keys(values: dict, where: str) -> None:
    for key in RUN_KEYS:
        if key in values:
            hint = ("give the sweep as learning_rates = [...]" if key == "learning_rate"
                    else "the study sets it for each run")
            raise ValueError(f"{where}: {key} cannot be set here: {hint}")


def _check_mapping(values: Any, where: str) -> None:
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a table (mapping), got {type(values).__name__}")


def _type_name(types) -> str:
    return {list: "list", bool: "true or false"}.get(types, "number")
