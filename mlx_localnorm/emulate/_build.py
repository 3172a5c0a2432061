"""Compile a kernel's C++ translation once, cache the shared library on disk, load it."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from .._private import is_private

INCLUDE_DIR = Path(__file__).parent / "include"
# Stack-clash protection probes every page of a big thread-local array, so an oversized one
# hits the guard page below its fiber stack instead of silently overwriting a neighbour.
# Uninitialised thread-local variables hold 0xFE bytes (-1.7e38 as float) instead of a
# plausible leftover; signed integers wrap as on the GPU. -fsanitize=bounds checks every index
# into an array of known size (thread-local arrays), reported by mlxe_runtime.h's handler.
# Variable-length arrays, which Metal lacks, are errors (so warnings are not silenced by -w).
CXX_FLAGS = (
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-shared",
    "-fno-strict-aliasing",
    "-fstack-clash-protection",
    "-ftrivial-auto-var-init=pattern",
    "-fwrapv",
    "-fsanitize=bounds",
    "-Werror=vla",
)


# Extra compiler flags, e.g. "-O0 -g" to step through a kernel in gdb (they come last, so win).
CXXFLAGS_ENV = "MLX_LOCALNORM_EMULATE_CXXFLAGS"


def _flags() -> list[str]:
    return [*CXX_FLAGS, *shlex.split(os.environ.get(CXXFLAGS_ENV, ""))]


class KernelCompileError(RuntimeError):
    """The kernel text did not compile as C++ against the Metal shim."""


class Buffer(ctypes.Structure):
    """One kernel argument; mirrors `mlxe::Buffer` in include/mlxe_runtime.h."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("itemsize", ctypes.c_int64),
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_char_p),
        ("is_output", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.POINTER(ctypes.c_int32)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("bytes_read", ctypes.c_int64),
        ("bytes_written", ctypes.c_int64),
    ]


def cache_dir() -> Path:
    """`$MLX_LOCALNORM_CACHE/emulate`, else `$XDG_CACHE_HOME` or `~/.cache` /mlx_localnorm/emulate."""
    root = os.environ.get("MLX_LOCALNORM_CACHE")
    if root:
        return Path(root) / "emulate"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_localnorm" / "emulate"


def _usable(directory: Path, private_root: Path | None = None) -> bool:
    """Create `private_root` and `directory` (mode 0700) if needed; True if both are private."""
    checked = [directory] if private_root is None else [private_root, directory]
    try:
        if private_root is not None:
            private_root.mkdir(mode=0o700, exist_ok=True)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if all(is_private(d) for d in checked):
            return True
    except OSError:
        return False
    warnings.warn(f"mlx_localnorm.emulate: not using the kernel cache {directory}: it is not a "
                  f"directory of uid {os.getuid()} writable only by its owner", stacklevel=4)
    return False


_session_dir: Path | None = None


def _writable_cache() -> Path:
    """The user cache, else `<tmp>/mlx_localnorm-<uid>/emulate` (a read-only home, some CI
    runners), else a fresh directory for this process only.

    Anyone may create the temporary-directory path first and plant a library there: it is
    used only if owned by us and writable by nobody else.
    """
    global _session_dir
    if _usable(cache_dir()):
        return cache_dir()
    shared = Path(tempfile.gettempdir()) / f"mlx_localnorm-{os.getuid()}"
    if _usable(shared / "emulate", private_root=shared):
        return shared / "emulate"
    if _session_dir is None or not _session_dir.is_dir():
        _session_dir = Path(tempfile.mkdtemp(prefix="mlx_localnorm-emulate-"))
    return _session_dir


@functools.cache
def compiler() -> tuple[str, str]:
    """The C++ compiler (`$CXX` or g++/clang++) and its version string."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            version = subprocess.run(
                [path, "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()
            return path, version[0] if version else ""
    raise RuntimeError(
        f"the Metal emulator needs a C++20 compiler; none of {candidates} is on PATH "
        "(install g++ or set CXX)"
    )


@functools.cache
def _shim_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(INCLUDE_DIR.glob("*.h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_DIAGNOSTIC = re.compile(r":\d+:\d+: (warning|error|fatal error|note):")


def _without_warnings(lines: list[str]) -> list[str]:
    """The compiler's messages without its warnings (and their notes and source excerpts)."""
    kept, keep = [], True
    for line in lines:
        found = _DIAGNOSTIC.search(line)
        if found and found.group(1) != "note":
            keep = found.group(1) != "warning"
        if keep:
            kept.append(line)
    return kept


def _compile(cpp: str, target: Path, kernel: str, sources: dict[str, str]) -> None:
    # The C++ and the kernel's own text sit in <key>/, the compiler's working directory, so
    # messages and debuggers (gdb: `break <name>.metal:LINE`) find the original lines.
    cxx, _ = compiler()
    workdir = target.with_suffix("")
    workdir.mkdir(exist_ok=True)
    for filename, text in sources.items():
        _write_atomically(workdir / filename, text.encode())
    source = workdir / "kernel.cpp"
    _write_atomically(source, cpp.encode())
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *_flags(), f"-I{INCLUDE_DIR}", source.name, "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=workdir)
        if result.returncode != 0:
            lines = _without_warnings(result.stderr.splitlines())
            shown = "\n".join(lines[:60]) + ("\n..." if len(lines) > 60 else "")
            raise KernelCompileError(
                f"kernel '{kernel}' does not compile for the emulator (C++ translation in "
                f"{source}; '<name>.metal:LINE' counts lines of `source`, '<name>.h:LINE' of "
                f"`header`):\n{shown}"
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load(cpp: str, kernel: str, sources: dict[str, str]) -> ctypes.CDLL:
    """The loaded library for `cpp`, compiling it on first use (cached by content hash).

    `sources` maps the file names of the `#line` directives in `cpp` to the kernel's own text.
    """
    _cxx, version = compiler()
    key = hashlib.sha256(
        "\0".join([cpp, _shim_digest(), version, platform.machine(), *_flags()]).encode()
    ).hexdigest()[:32]
    with _lock:
        if key in _loaded:
            return _loaded[key]
        target = _writable_cache() / f"{key}.so"
        if not target.exists():
            _compile(cpp, target, kernel, sources)
        lib = ctypes.CDLL(str(target))
        lib.mlxe_launch.argtypes = [
            ctypes.POINTER(Buffer),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_double,
            ctypes.c_char_p,
            ctypes.c_int64,
        ]
        lib.mlxe_launch.restype = ctypes.c_int
        _loaded[key] = lib
        return lib
