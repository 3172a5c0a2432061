"""The OpenBLAS shim that replaces MLX's reference BLAS on Linux (mlx_localnorm/_fast_blas.py)."""

import os
import subprocess
import sys

import mlx_localnorm  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the BLAS shim only exists on Linux")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


MATMUL = "import mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a)"


def test_loaded_and_bound_by_mlx():
    """The dynamic linker binds MLX's cblas_sgemm to our shim, not to the bundled libblas."""
    run = _python("import mlx_localnorm._fast_blas as fb, mlx_localnorm; print(fb.status); "
                  + MATMUL, LD_DEBUG="bindings", MLX_LOCALNORM_FAST_BLAS="1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "loaded"
    bindings = [line for line in run.stderr.splitlines()
                if "libmlx.so" in line and "`cblas_sgemm'" in line]
    assert bindings and all("fastblas-" in line for line in bindings), bindings


def test_disabled_by_environment():
    run = _python("import mlx_localnorm._fast_blas as fb, mlx_localnorm; print(fb.status); "
                  + MATMUL, LD_DEBUG="bindings", MLX_LOCALNORM_FAST_BLAS="0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "disabled"
    assert "fastblas-" not in run.stderr


def test_warns_when_mlx_was_imported_first():
    run = _python("import mlx.core, mlx_localnorm, mlx_localnorm._fast_blas as fb; "
                  "print(fb.status)", MLX_LOCALNORM_FAST_BLAS="1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "mlx-imported-first"
    assert "Import mlx_localnorm first" in run.stderr


def test_warns_when_no_compiler(tmp_path):
    run = _python("import mlx_localnorm._fast_blas as fb, mlx_localnorm; print(fb.status)",
                  MLX_LOCALNORM_FAST_BLAS="1", CC="/nonexistent/cc", PATH=str(tmp_path),
                  XDG_CACHE_HOME=str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "unavailable"
    assert "fast BLAS not loaded (no C compiler found" in run.stderr


@pytest.mark.parametrize("transpose_b", [False, True])
def test_float32_matmul_matches_float64(transpose_b):
    """The swapped BLAS gives float32-accurate products, also for transposed operands."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(257, 300)), rng.normal(size=(300, 129))
    b_mx = mx.array(b.T.astype(np.float32)).T if transpose_b else mx.array(b.astype(np.float32))
    got = np.array(mx.array(a.astype(np.float32)) @ b_mx)
    # float32 rounding of 300-term dot products: about sqrt(300) * 6e-8 * |a||b|.
    bound = 1e-5 * np.abs(a) @ np.abs(b)
    assert np.all(np.abs(got - a @ b) <= bound)


PLANTED_SOURCE = '#include <stdio.h>\n__attribute__((constructor)) static void f(void) ' \
                 '{ puts("PLANTED"); fflush(stdout); }\n'


def test_never_loads_a_library_planted_in_a_cache_others_can_write(tmp_path):
    """Another user who can write the cache directory must not get code run in our process."""
    probe = "import mlx_localnorm._fast_blas as fb, mlx_localnorm; print(fb.status)"
    first = _python(probe, MLX_LOCALNORM_FAST_BLAS="1", XDG_CACHE_HOME=str(tmp_path / "own"))
    assert first.stdout.split() == ["loaded"], first.stderr[-2000:]
    (built,) = (tmp_path / "own" / "mlx_localnorm").glob("fastblas-*.so")
    shared = tmp_path / "shared" / "mlx_localnorm"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    (tmp_path / "planted.c").write_text(PLANTED_SOURCE)
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "planted.c"), "-o",
                    str(shared / built.name)], check=True)
    run = _python(probe, MLX_LOCALNORM_FAST_BLAS="1", XDG_CACHE_HOME=str(tmp_path / "shared"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "PLANTED" not in run.stdout
    assert run.stdout.split() == ["unavailable"]
    assert f"{shared} is writable by others" in run.stderr
