"""Files a run leaves on a shared filesystem: written whole or not at all, and readable as the user's umask says.

Some writers (safetensors) create their files 0600 whatever the umask, so an export would be the one part of a run
directory that the rest of a group cannot read. :func:`apply_umask` gives a written tree the permissions that the
umask gives any new file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """chmod ``root`` and everything under it to what a new file (0666) or directory (0777) gets under the umask."""
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomic(path: Path, content: str | bytes | Callable[[IO[bytes]], Any]) -> None:
    """Readers see the old file or the whole new one: a temporary file (``content``, or what ``content(f)`` writes),
    fsynced, renamed over ``path``, and the directory fsynced so that the rename survives a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (written by any rank of this node; on a shared filesystem the writers' close
    has already sent theirs) and the directories that name them."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def tree_bytes(root: Path) -> int:
    """Bytes in the files under ``root``."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
