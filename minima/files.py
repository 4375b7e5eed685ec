"""Files a run leaves on a shared filesystem: written whole or not at all, and readable as the user's umask says.

Some writers (safetensors) create their files 0600 whatever the umask, so an export would be the one part of a run
directory that the rest of a group cannot read. :func:`apply_umask` gives a written tree the permissions that the
umask gives any new file.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the new, never a part (tmp + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def tree_bytes(root: Path) -> int:
    """Bytes in the files under ``root``."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
