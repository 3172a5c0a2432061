"""The wheel carries every subpackage, the Metal sources and the data files."""

from pathlib import Path

import pytest

# tomllib is in the standard library from Python 3.11 on.
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "mlx_localnorm").rglob("__init__.py")}
    assert on_disk | {"mlx_localnorm.metal"} == listed


def test_package_data_globs_match_files():
    dirs = {"mlx_localnorm.metal": ROOT / "metal"} | {
        name: ROOT.joinpath(*name.split(".")) for name in PYPROJECT["tool"]["setuptools"][
            "package-data"] if name != "mlx_localnorm.metal"}
    for name, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list(dirs[name].glob(pattern)), f"{name}: {pattern} matches nothing"
    kernels_used = {p.name for p in (ROOT / "metal").iterdir()}
    assert any(n.endswith(".metal") for n in kernels_used) and "common.h" in kernels_used
