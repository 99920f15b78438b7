"""File safety: every file the library writes goes through :func:`atomic_write`, so a crash,
Ctrl-C or failed command never leaves half a file or replaces a good one with a broken one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes"]


def _umask() -> int:
    try:  # Linux shows it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], write_fn: Callable[[str], object]) -> None:
    """Call ``write_fn(tmp_path)`` then rename over ``path``: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the
        # umask), so a server running as another user can read a model written here
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` atomically, flushed to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
