"""Make MLX's CPU matmuls use OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS: a float32 1024^3 matmul takes
about 400 ms on one core. MLX resolves ``cblas_sgemm``/``cblas_dgemm``/``cblas_cgemm`` through
the global symbol scope, so a library exporting them that is loaded with ``RTLD_GLOBAL``
*before* ``mlx.core`` is picked up instead. ``scipy-openblas32`` exports them with a
``scipy_`` prefix, so we build a tiny forwarding shim with the system C compiler on first use,
cache it, and load it. ``MLX_LOCALNORM_FAST_BLAS=0`` turns this off.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from ._private import is_private

_SHIM_SOURCE = r"""
typedef int blasint;
void scipy_cblas_sgemm(int, int, int, blasint, blasint, blasint, float, const float *, blasint,
                       const float *, blasint, float, float *, blasint);
void scipy_cblas_dgemm(int, int, int, blasint, blasint, blasint, double, const double *,
                       blasint, const double *, blasint, double, double *, blasint);
void scipy_cblas_cgemm(int, int, int, blasint, blasint, blasint, const void *, const void *,
                       blasint, const void *, blasint, const void *, void *, blasint);

void cblas_sgemm(int o, int ta, int tb, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta,
                 float *c, blasint ldc) {
    scipy_cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_dgemm(int o, int ta, int tb, blasint m, blasint n, blasint k, double alpha,
                 const double *a, blasint lda, const double *b, blasint ldb, double beta,
                 double *c, blasint ldc) {
    scipy_cblas_dgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_cgemm(int o, int ta, int tb, blasint m, blasint n, blasint k, const void *alpha,
                 const void *a, blasint lda, const void *b, blasint ldb, const void *beta,
                 void *c, blasint ldc) {
    scipy_cblas_cgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""

# One of: "loaded", "disabled", "not-linux", "mlx-imported-first", "unavailable".
status = "not-tried"
_handle = None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "mlx_localnorm"


def _openblas_dir() -> Path | None:
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib_dir if (lib_dir / "libscipy_openblas.so").exists() else None


def _build_shim(lib_dir: Path) -> Path:
    """Compile the forwarding shim once per OpenBLAS location; atomic rename into the cache."""
    key = hashlib.sha256((_SHIM_SOURCE + str(lib_dir)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fastblas-{key}.so"
    if target.exists() and is_private(target.parent):
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_private(target.parent):
        raise RuntimeError(f"the cache {target.parent} is writable by others or not ours, so "
                           "a library there could be planted")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        src.write_text(_SHIM_SOURCE)
        cmd = [compiler, "-O2", "-shared", "-fPIC", str(src), "-o", str(out),
               f"-L{lib_dir}", "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the BLAS shim failed: {result.stderr.strip()}")
        os.replace(out, target)
    return target


def enable() -> str:
    """Load the OpenBLAS shim into the global symbol scope; return the resulting status."""
    global status, _handle
    if status != "not-tried":
        return status
    if not sys.platform.startswith("linux"):
        status = "not-linux"
    elif os.environ.get("MLX_LOCALNORM_FAST_BLAS", "1") == "0":
        status = "disabled"
    elif "mlx.core" in sys.modules:
        status = "mlx-imported-first"
        warnings.warn(
            "mlx_localnorm: mlx.core was imported before mlx_localnorm, so MLX keeps the slow "
            "reference BLAS for CPU matmuls (about 10x slower). Import mlx_localnorm first, or "
            "set MLX_LOCALNORM_FAST_BLAS=0 to silence this.",
            stacklevel=3,
        )
    else:
        try:
            lib_dir = _openblas_dir()
            if lib_dir is None:
                raise RuntimeError("the scipy-openblas32 package is not installed")
            _handle = ctypes.CDLL(str(_build_shim(lib_dir)), mode=ctypes.RTLD_GLOBAL)
            status = "loaded"
        except (OSError, RuntimeError) as err:
            status = "unavailable"
            warnings.warn(
                f"mlx_localnorm: fast BLAS not loaded ({err}); MLX CPU matmuls stay on the "
                "reference BLAS. Fix: `pip install scipy-openblas32` and a C compiler, or set "
                "MLX_LOCALNORM_FAST_BLAS=0 to silence this.",
                stacklevel=3,
            )
    return status
