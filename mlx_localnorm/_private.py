"""Directories we may load compiled libraries from: a library planted there would run as us."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def is_private(directory: Path) -> bool:
    """A real directory (no symlink) owned by this user and writable by nobody else."""
    info = directory.lstat()
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and os.access(directory, os.W_OK))
