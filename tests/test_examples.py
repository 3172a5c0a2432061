"""Every script in examples/ runs (small sizes) and prints what it claims."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def numbers(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return [float(g) for g in match.groups()]


def check_norm_in_your_model():
    for norm in ("seednorm", "dyt"):
        out = run("norm_in_your_model.py", "--norm", norm, "--steps", "30")
        first, last, accuracy = numbers(r"loss ([\d.]+) -> ([\d.]+), train accuracy ([\d.]+)",
                                        out)
        assert last < 0.25 * first and accuracy >= 0.9, out


def check_swap_norms_mlx_lm():
    out = run("swap_norms_mlx_lm.py")
    (same,) = numbers(r"seednorm\s+pre\s+norms SeeDNorm: max logit change (\S+)", out)
    (peri,) = numbers(r"seednorm\s+peri\s+norms SeeDNorm: max logit change (\S+)", out)
    (dyt,) = numbers(r"dyt\s+pre\s+norms DyT: max logit change (\S+)", out)
    assert same < 1e-4, "SeeDNorm with Pre-LN must keep the logits at init"
    assert peri > 1e-2 and dyt > 1e-2, "new norms in new places change the logits"


def check_train_with_muon():
    out = run("train_with_muon.py", "--steps", "12")
    losses = [float(v) for v in re.findall(r"step\s+\d+\s+loss ([\d.]+)", out)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], out


def check_custom_metal_kernel():
    out = run("custom_metal_kernel.py")
    (error,) = numbers(r"max \|kernel - mx.softmax\| = (\S+)", out)
    assert error < 1e-5
    read, size, written = numbers(r"read (\d+) bytes of x \((\d+) bytes, three passes\), "
                                  r"wrote (\d+) bytes", out)
    assert read == 3 * size and written == size


CHECKS = {
    "norm_in_your_model.py": check_norm_in_your_model,
    "swap_norms_mlx_lm.py": check_swap_norms_mlx_lm,
    "train_with_muon.py": check_train_with_muon,
    "custom_metal_kernel.py": check_custom_metal_kernel,
}


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(CHECKS)


@pytest.mark.parametrize("script", list(CHECKS))
def test_example_runs(script):
    CHECKS[script]()
