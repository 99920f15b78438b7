"""A full or read-only file system: every writing command (convert, export, finetune, study,
diagnose --plot, quickstart) is one red line naming the path and the cause (errno 28 ENOSPC,
30 EROFS), leaves nothing partial behind and changes no file that was there.

The file systems are small tmpfs mounts the tests make, which needs root; elsewhere the tests
are skipped with the reason. Each mount is undone in the fixture's finalizer."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import one_line_error


SMALL = ["--input-size", "3", "32", "32"]
GOOD = b"a good file from before"
CAUSES = {"full": "[Errno 28] ENOSPC", "ro": "[Errno 30] EROFS", "space": "[Errno 28] ENOSPC"}


def _state(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (but the filler) and the sha256 of each regular file."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*")) if p.name != "filler"}


def _fill(folder: Path, leave: int) -> None:
    """Take all the file system's free space but ``leave`` bytes (whole pages) with one file."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - leave
    with open(folder / "filler", "wb") as f:
        while free > 0:
            try:
                f.write(b"\0" * min(free, 1 << 20))
                f.flush()
            except OSError:
                break
            free -= 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """``make(kind, files)``: a folder on a 16 MiB tmpfs of its own holding ``files`` ({relative
    path: bytes}), then made 'full' (no byte free), 'space' (1 MiB free) or 'ro' (read-only)."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; these tests run as uid {os.geteuid()}")
    mounted: list[Path] = []

    def make(kind: str, files: dict[str, bytes]) -> Path:
        folder = tmp_path / kind
        folder.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(folder)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        if kind == "ro":
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            _fill(folder, 0 if kind == "full" else 1 << 20)
        return folder

    yield make
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _command(name: str, d: Path, checkpoint: Path) -> tuple[tuple, dict[str, bytes], str]:
    """(CLI arguments, the files already in ``d``, the path the error names)."""
    if name == "convert":
        return (("convert", "resnet10t", "--recipe", "resnet", "-o", d / "c.safetensors", *SMALL),
                {"c.safetensors": GOOD}, f"cannot write {d / 'c.safetensors'}")
    if name == "export":
        return (("export", checkpoint, "-o", d / "m.onnx"), {"m.onnx": GOOD},
                f"cannot write {d / 'm.onnx'}")
    if name == "finetune":
        return (("finetune", "resnet10t", "--data", "synthetic", "-o", d / "run", "--epochs", "1",
                 "--subset", "32", "--batch-size", "16", *SMALL), {"run/notes.txt": GOOD},
                f"--output {d / 'run'} cannot hold the run's files")
    if name == "study":
        return (("study", "resnet10t", "--data", "synthetic", "--arms", "none,resnet", "--seeds",
                 "2", "--epochs", "1", "--subset", "32", "--batch-size", "16", *SMALL, "-o",
                 d / "study"), {"notes.txt": GOOD},
                f"--output {d / 'study'} cannot hold the study's files")
    if name == "diagnose":
        return (("diagnose", "resnet10t", *SMALL, "--plot", d / "rms.png"), {"rms.png": GOOD},
                f"cannot write {d / 'rms.png'}")
    if name == "quickstart":
        return (("quickstart", "-o", d / "qs"), {"keep.txt": GOOD},
                f"--output {d / 'qs'} cannot hold the run's files")
    raise AssertionError(name)


COMMANDS = ["convert", "export", "finetune", "study", "diagnose", "quickstart"]
#: Where the command fails only after its work (an export on a full disk: about 20 s here).
_SLOW = {("export", "full")}
CASES = [pytest.param(c, k, marks=[pytest.mark.slow] if (c, k) in _SLOW else [], id=f"{c}-{k}")
         for c in COMMANDS for k in ("full", "ro")]


def _check_untouched(d: Path, before: dict[str, str], allowed: set[str] = frozenset()) -> None:
    after = _state(d)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    new = set(after) - set(before)
    assert new <= allowed, new  # nothing partial: no temporary file, no staging folder
    assert not any(".sbn-tmp-" in k or ".sbn-stage-" in k for k in after), after


@pytest.mark.timeout(180)
@pytest.mark.parametrize("command, kind", CASES)
def test_every_writing_command_on_a_full_or_read_only_disk_is_one_line(run_cli, small_fs,
                                                                        resnet10t_file, command,
                                                                        kind):
    _, files, _ = _command(command, Path("/"), resnet10t_file)  # the files to put there first
    d = small_fs(kind, files)
    args, _, names = _command(command, d, resnet10t_file)
    before = _state(d)
    one_line_error(run_cli(*args), names, CAUSES[kind])
    # a run directory made before the first write failed, and its (empty) lock file, may stay
    _check_untouched(d, before, {"run", "run/.sbn-surgery.lock", "study",
                                 "study/.sbn-surgery.lock", "qs", "qs/.sbn-surgery.lock"})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["convert", pytest.param("export", marks=pytest.mark.slow)])
def test_a_disk_that_fills_up_mid_file_keeps_nothing_of_it(run_cli, small_fs, resnet10t_file,
                                                          command):
    """1 MiB free: the file (about 20 MB) fails part-way; the part written is gone."""
    _, files, _ = _command(command, Path("/"), resnet10t_file)  # the files to put there first
    d = small_fs("space", files)
    args, _, names = _command(command, d, resnet10t_file)
    before = _state(d)
    one_line_error(run_cli(*args), names, CAUSES["space"], "any file already at that path is "
                   "as it was")
    _check_untouched(d, before)


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_a_run_whose_disk_fills_up_keeps_its_last_good_files(run_cli, small_fs):
    """A run that starts (its small files fit) and fails at its first checkpoint: one line, the
    files of the run so far whole, nothing partial (the run's calibration line comes before it)."""
    d = small_fs("space", {})
    res = run_cli("finetune", "resnet10t", "--data", "synthetic", "-o", d / "run", "--epochs",
                  "1", "--subset", "32", "--batch-size", "16", *SMALL)
    one_line_error(res, f"cannot write {d / 'run'}", CAUSES["space"], notes=("calibration:",))
    names = {p.name for p in (d / "run").iterdir()}
    assert not any(".sbn-tmp-" in n for n in names), names
    assert "state.pt" not in names  # the epoch was not recorded as done


@pytest.mark.timeout(120)
def test_a_stray_os_error_of_a_write_is_one_line_and_a_bug_is_not(run_cli, tmp_path,
                                                                   monkeypatch):
    """An OSError that no library code turned into a user error: one line with the path and the
    cause when it is a write's (no space, read-only, permissions), a traceback otherwise."""
    import errno

    import sbn_surgery.checkpoint as C

    def refuse(path, write_fn):
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(C, "atomic_write", refuse)
    target = tmp_path / "c.safetensors"
    one_line_error(run_cli("convert", "resnet10t", "--recipe", "resnet", "-o", target, *SMALL),
                   f"{target}: Permission denied ([Errno 13] EACCES)")

    def lost(path, write_fn):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(C, "atomic_write", lost)
    with pytest.raises(OSError, match="Bad file descriptor"):
        run_cli("convert", "resnet10t", "--recipe", "resnet", "-o", target, *SMALL)


@pytest.mark.parametrize("text, number", [
    ("Error while serializing: I/O error: No space left on device (os error 28)", 28),
    ('Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: '
     '"Read-only file system" })', 30),  # safetensors before 0.5 wrote the debug form
    ("Error while serializing: some other problem", None),
])
def test_a_writer_s_error_text_gives_its_errno(text, number):
    """safetensors (Rust) reports a failed write as text; its errno is read from it, so a full
    disk under save_file is the same one line as under open().write()."""
    from sbn_surgery.files import errno_of, write_error

    class SafetensorError(Exception):
        pass

    assert errno_of(SafetensorError(text)) == number
    if number is not None:
        msg = str(write_error("/d/c.safetensors", SafetensorError(text)))
        assert msg.startswith(f"cannot write /d/c.safetensors: {os.strerror(number)} ([Errno "
                              f"{number}]")
