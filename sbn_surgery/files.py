"""File safety: every file the library writes goes through :func:`atomic_write`, so a crash,
Ctrl-C or failed command never leaves half a file or replaces a good one with a broken one.

* A file is written to ``.NAME.sbn-tmp-XXXXXXXX`` (8 hex digits) in its own folder, then renamed
  over ``NAME``. While it is written the temporary file holds an advisory lock (``flock``), which
  the kernel drops when its process ends, kill -9 included. A later write of ``NAME``, and a run
  that starts in the folder (:func:`remove_stale`), delete such files whose lock is free: the
  leftovers of a process that died mid-write. Nothing of another name is ever deleted.
* A staged export lives in a folder ``.NAME.sbn-stage-XXXXXXXX`` beside ``NAME``
  (:func:`staging_dir`), locked and swept the same way.
* A write that fails for lack of space, a read-only file system or permissions raises one
  :class:`~sbn_surgery.errors.WriteError` naming the path and the cause; the temporary file is
  gone and whatever was at the path is as it was.
* :func:`lock_folder`: one process at a time in a folder (a run's output directory), by an
  advisory lock on ``.sbn-surgery.lock`` there, released when the process ends however it ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .errors import WriteError

__all__ = ["atomic_write", "atomic_write_bytes", "remove_stale", "staging_dir", "write_error",
           "errno_of", "cause_text", "lock_folder", "unlock_folder", "FolderBusy", "LOCK_NAME", "probe_folder",
           "is_own_file"]

#: What this module names its temporary files and staging folders: ``.NAME`` + tag + 8 hex.
TMP_TAG, STAGE_TAG = ".sbn-tmp-", ".sbn-stage-"
_OWN = re.compile(r"\..+\.sbn-(?:tmp|stage)-[0-9a-f]{8}")
#: The lock file of a folder that one process at a time may write into (see :func:`lock_folder`).
LOCK_NAME = ".sbn-surgery.lock"
_MAX_LOCK_INFO = 4096

PathLike = Union[str, os.PathLike]

#: Causes of a failed write and what a user can do about each.
_HINTS = {
    errno.ENOSPC: "free space on that file system or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "the file system does not take a file this large; write elsewhere",
    errno.EROFS: "that file system is mounted read-only; write elsewhere",
    errno.EACCES: "you may not write there; fix the permissions or write elsewhere",
    errno.EPERM: "you may not write there; fix the permissions or write elsewhere",
}
#: safetensors (Rust) reports an I/O error as text: ``... (os error 28)`` (Rust's display of an
#: io::Error) or ``IoError(Os { code: 28, ... })`` (its debug form, in older versions).
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def errno_of(exc: BaseException) -> Optional[int]:
    """The OS error number behind ``exc`` (an OSError, or a writer's error that names one)."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return exc.errno
    found = _RUST_ERRNO.search(str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def cause_text(n: int) -> str:
    """An OS error number as a user reads it: what, its number and name, and what to do."""
    return (f"{os.strerror(n)} ([Errno {n}] {errno.errorcode.get(n, '?')}); "
            f"{_HINTS.get(n, 'write elsewhere')}")


def write_error(path: PathLike, cause: Union[int, BaseException]) -> WriteError:
    """One line for a write of ``path`` that failed with ``cause`` (an errno or an exception)."""
    n = cause if isinstance(cause, int) else errno_of(cause)
    if n is None:
        what = f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}"
        return WriteError(f"cannot write {path}: {what}; nothing was written there", path, None)
    return WriteError(f"cannot write {path}: {cause_text(n)}. Nothing was written there and any "
                      "file already at that path is as it was", path, n)


# --------------------------------------------------------------------------------------------
# temporary files and their leftovers
# --------------------------------------------------------------------------------------------
def is_own_file(name: str, target: Optional[str] = None) -> bool:
    """Whether ``name`` is a temporary file or staging folder this module makes (of ``target``
    only, when given)."""
    if target is not None and not name.startswith(f".{target}."):
        return False
    return _OWN.fullmatch(name) is not None


def _create(folder: Path, name: str, tag: str, make_dir: bool) -> tuple[Path, int]:
    """A new ``.NAME<tag>XXXXXXXX`` in ``folder`` (file or folder), locked: (path, fd)."""
    for _ in range(100):
        path = folder / f".{name}{tag}{secrets.token_hex(4)}"
        try:
            if make_dir:
                os.mkdir(path, 0o777)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:  # 0o666 less the umask: the mode a plain open() gives
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while in use: a sweep leaves it alone
        if _same_file(path, fd):
            return path, fd
        os.close(fd)  # a sweep took it for a dead writer's before it was locked: another name
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file or folder open as ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _fresh(path: Path, tag: str, make_dir: bool) -> tuple[Path, int]:
    """:func:`_create` beside ``path``, in its folder (made if need be) once the leftovers of
    killed writers of ``path`` are gone; an OS error is a WriteError for ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, path.name)
        return _create(path.parent, path.name, tag, make_dir)
    except OSError as exc:
        raise write_error(path, exc) from None


def _remove_if_stale(entry: os.DirEntry) -> bool:
    """Delete ``entry`` (a file or folder of ours) when no process holds its lock."""
    if entry.is_symlink():
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(entry.path, flags)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif stat.S_ISREG(mode):
            os.unlink(entry.path)
        else:
            return False
        return True
    except OSError:  # locked: a live writer's; or it went away meanwhile
        return False
    finally:
        os.close(fd)


def remove_stale(folder: PathLike, target: Optional[str] = None) -> list[str]:
    """Delete the temporary files and staging folders in ``folder`` that this module made (of
    ``target`` only, when given) and whose writer is gone. Returns their names. Best effort: a
    folder that cannot be read is left as it is."""
    removed = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_own_file(entry.name, target) and _remove_if_stale(entry):
                    removed.append(entry.name)
    except OSError:
        pass
    return removed


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_write(path: PathLike, write_fn: Callable[[str], object]) -> None:
    """Call ``write_fn(tmp_path)`` then rename over ``path``: a crash never leaves a half file.
    An OS error (no space, read-only, permissions) is one :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp, fd = _fresh(path, TMP_TAG, make_dir=False)
    try:
        write_fn(str(tmp))
        os.replace(tmp, path)
    except Exception as exc:
        _discard(tmp)
        if isinstance(exc, WriteError) or errno_of(exc) is None:
            raise
        raise write_error(path, exc) from None
    except BaseException:  # Ctrl-C: no half file either
        _discard(tmp)
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` atomically, flushed to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


@contextlib.contextmanager
def staging_dir(path: PathLike) -> Iterator[Path]:
    """A fresh hidden folder ``.NAME.sbn-stage-XXXXXXXX`` beside ``path`` (same file system, so
    moving a file out of it is a rename), locked while in use and removed afterwards (whatever
    is still in it). A failed write inside it is reported for ``path``."""
    path = Path(path)
    folder, fd = _fresh(path, STAGE_TAG, make_dir=True)
    try:
        yield folder
    except WriteError as exc:  # the staged file's name means nothing to the user
        raise write_error(path, exc.errno if exc.errno is not None else exc) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def probe_folder(folder: PathLike) -> None:
    """Prove that ``folder`` takes a file (create, write a byte, delete), under a name of its
    own, so two processes never race on it. Raises :class:`WriteError`."""
    folder = Path(folder)
    try:
        path, fd = _create(folder, "write-probe", TMP_TAG, make_dir=False)
    except OSError as exc:
        raise write_error(folder, exc) from None
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    except OSError as exc:
        raise write_error(folder, exc) from None
    finally:
        os.close(fd)
        _discard(path)


# --------------------------------------------------------------------------------------------
# one process at a time in a folder
# --------------------------------------------------------------------------------------------
class FolderBusy(Exception):
    """Another process holds the folder's lock; ``holder`` is what it wrote there (pid,
    started, command), checked, or {} when unreadable."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        super().__init__(f"{folder} is locked by another process")
        self.folder, self.holder = folder, holder


def _holder_of(fd: int) -> dict[str, Any]:
    """The lock file's record, read as untrusted: short, JSON, and only the expected fields
    of the expected types (text cut, non-printable characters dropped)."""
    try:
        data = json.loads(os.pread(fd, _MAX_LOCK_INFO, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, kind in (("pid", int), ("started", (int, float)), ("command", str), ("host", str)):
        value = data.get(key)
        if isinstance(value, kind) and not isinstance(value, bool):
            out[key] = "".join(c for c in value if c.isprintable())[:200] \
                if isinstance(value, str) else value
    return out


def lock_folder(folder: PathLike, info: dict[str, Any]) -> int:
    """Take ``folder``'s lock (creating the folder and ``.sbn-surgery.lock``) and record
    ``info`` in it; returns the descriptor to pass to :func:`unlock_folder`. Raises
    :class:`FolderBusy` when another process holds it, :class:`WriteError` when the folder
    cannot be written."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_of(fd)
        os.close(fd)
        raise FolderBusy(folder, holder) from None
    except OSError as exc:
        os.close(fd)
        raise write_error(path, exc) from None
    with contextlib.suppress(OSError):  # the record only helps a second process say who
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode()[:_MAX_LOCK_INFO], 0)
    return fd


def unlock_folder(fd: int) -> None:
    """Release a lock taken by :func:`lock_folder` (the file stays: removing it would race
    with a process about to lock it)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)
