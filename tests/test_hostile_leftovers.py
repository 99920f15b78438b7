"""What a killed process leaves, and two processes in one folder.

* A process killed (kill -9) while writing a file leaves its temporary file
  ``.NAME.sbn-tmp-XXXXXXXX``, or its export staging folder ``.NAME.sbn-stage-XXXXXXXX``. A run
  that starts or resumes in the folder, and a later write of NAME (convert, export), remove
  those whose writer is gone (its advisory lock died with it); a live writer's, and anything
  not named by this tool, stay.
* One run (finetune, study) at a time per output folder: a second is refused with one line
  naming the first; the lock dies with its process, kill -9 included.

The writers and lock holders are real subprocesses, stopped where they say they are (they write
a file once there), never after a sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error

from sbn_surgery.files import is_own_file
from sbn_surgery.train.outputs import run_lock

SMALL = ["--input-size", "3", "32", "32"]

#: Writes TARGET (argv 1) through atomic_write, or inside a staging folder for it (argv 3:
#: "stage"), and stops half-way: writes READY (argv 2), then waits to be killed.
WRITER = """
import sys, time
from pathlib import Path
from sbn_surgery.files import atomic_write, staging_dir

target, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        ready.write_text("here")
        time.sleep(600)

if mode == "stage":
    with staging_dir(target) as folder:
        atomic_write(folder / target.name, write)
else:
    atomic_write(target, write)
"""
#: Holds the run lock of the folder argv 1, writes READY (argv 2), then waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from sbn_surgery.train.outputs import run_lock

with run_lock(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("here")
    time.sleep(600)
"""


def _start(script: str, *args, tmp_path: Path) -> subprocess.Popen:
    """A subprocess running ``script`` that has reached the point where it writes READY."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", script, str(args[0]), str(ready),
                             *map(str, args[1:])], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while not ready.exists():  # bounded by the test's timeout
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.02)
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # once it is reaped, the kernel has dropped its locks


def _own(folder: Path) -> list[str]:
    """The temporary files and staging folders of this tool in ``folder`` (a link is not one,
    whatever its name)."""
    return sorted(p.name for p in folder.iterdir() if is_own_file(p.name) and not p.is_symlink())


@pytest.fixture
def decoys(tmp_path):
    """Files that look like ours but are not, in ``folder``: none may ever be deleted."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")

    def make(folder: Path) -> set[str]:
        names = {".last.safetensors.1a2b3c4d.tmp",  # an older version's naming
                 "last.safetensors.sbn-tmp-deadbeef",  # no leading dot
                 ".x.sbn-tmp-DEADBEEF",  # not lower-case hex
                 ".y.sbn-tmp-deadbeef0",  # 9 digits
                 ".sbn-tmp-deadbeef",  # no NAME
                 "notes.txt"}
        for name in names:
            (folder / name).write_bytes(b"user data")
        os.symlink(outside, folder / ".z.sbn-tmp-deadbeef")  # a link named like ours
        return names | {".z.sbn-tmp-deadbeef"}

    return make


@pytest.mark.timeout(120)
def test_a_run_start_removes_what_killed_writers_left_and_nothing_else(tmp_path, decoys):
    out = tmp_path / "run"
    out.mkdir()
    killed = _start(WRITER, out / "last.safetensors", "file", tmp_path=tmp_path)
    staged = _start(WRITER, out / "model.onnx", "stage", tmp_path=tmp_path)
    live = _start(WRITER, out / "metrics.jsonl", "file", tmp_path=tmp_path)
    try:
        _kill9(killed)
        _kill9(staged)
        keep = decoys(out)
        left = _own(out)
        assert len(left) == 3 and sum(".sbn-stage-" in n for n in left) == 1, left
        with run_lock(out):
            pass  # what a run does first in its folder
        remaining = set(p.name for p in out.iterdir())
        assert _own(out) == [n for n in left if n.startswith(".metrics.jsonl.")]  # the live one
        assert keep <= remaining and (tmp_path / "outside.bin").read_bytes() == b"not ours"
    finally:
        _kill9(live)
    with run_lock(out):  # its writer gone too, the next run removes it
        pass
    assert _own(out) == []


@pytest.mark.timeout(120)
def test_convert_removes_a_killed_writer_s_file_of_its_target(run_cli, tmp_path, decoys):
    target = tmp_path / "c.safetensors"
    _kill9(_start(WRITER, target, "file", tmp_path=tmp_path))
    other = tmp_path / "other.safetensors"
    _kill9(_start(WRITER, other, "file", tmp_path=tmp_path))
    keep = decoys(tmp_path)
    assert len(_own(tmp_path)) == 2
    res = run_cli("convert", "resnet10t", "--recipe", "resnet", "-o", target, *SMALL)
    assert res.code == 0, res.stderr
    # its own target's leftover went; another name's is a run's business, not convert's
    left = _own(tmp_path)
    assert len(left) == 1 and left[0].startswith(".other.safetensors.sbn-tmp-"), left
    assert keep <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_export_removes_a_killed_export_s_staging_folder(run_cli, tmp_path):
    import sbn_surgery as sbn

    model, _ = sbn.convert("resnet10t", "resnet", num_classes=10, input_size=(3, 32, 32),
                           init="standard")
    ckpt = tmp_path / "r10.safetensors"
    sbn.save_converted(model, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    _kill9(_start(WRITER, out / "m.onnx", "stage", tmp_path=tmp_path))
    assert len(_own(out)) == 1 and ".sbn-stage-" in _own(out)[0]
    res = run_cli("export", ckpt, "-o", out / "m.onnx")
    assert res.code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]


#: finetune, killed (-9) in the middle of writing epoch 2's last.safetensors.
KILLED_RUN = """
import sys, time
from pathlib import Path
import sbn_surgery.train.outputs as O
from sbn_surgery.files import atomic_write
from sbn_surgery.train import finetune

out, ready = Path(sys.argv[1]), Path(sys.argv[2])
original, calls = O.save_checkpoint, []

def save(model, path):
    if path.name == O.LAST_FILE:
        calls.append(path)
        if len(calls) == 2:
            def half(tmp):
                Path(tmp).write_bytes(b"x" * 100_000)
                ready.write_text("here")
                time.sleep(600)
            atomic_write(path, half)
    original(model, path)

O.save_checkpoint = save
finetune("resnet10t", "synthetic", output=out, recipe="resnet", epochs=2, subset=32,
         batch_size=16, input_size=(3, 32, 32))
"""


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_resume_after_kill_9_mid_checkpoint_removes_the_half_file(tmp_path):
    from sbn_surgery.train import finetune

    out = tmp_path / "run"
    _kill9(_start(KILLED_RUN, out, tmp_path=tmp_path))
    half = _own(out)
    assert len(half) == 1 and half[0].startswith(".last.safetensors.sbn-tmp-")
    assert (out / half[0]).stat().st_size == 100_000
    result = finetune("resnet10t", "synthetic", output=out, resume=True)
    assert result.epochs == 2 and _own(out) == []


# ============================================================================================
# one run per output folder
# ============================================================================================
@pytest.mark.timeout(180)
def test_a_second_run_in_a_busy_folder_is_refused_naming_the_first(run_cli, tmp_path):
    out = tmp_path / "run"
    holder = _start(HOLDER, out, tmp_path=tmp_path)
    try:
        for command in (("finetune", "resnet10t", "--data", "synthetic", "-o", out, "--epochs",
                         "1", *SMALL),
                        ("study", "resnet10t", "--data", "synthetic", "--arms", "none,resnet",
                         "--seeds", "2", "--epochs", "1", *SMALL, "-o", out)):
            line = one_line_error(run_cli(*command), f"--output {out} is in use",
                                  f"pid {holder.pid}", "started 20",
                                  "-c " + str(out), "Wait for it to end")
            assert "Traceback" not in line
        assert sorted(p.name for p in out.iterdir()) == [".sbn-surgery.lock"]  # nothing written
    finally:
        _kill9(holder)
    with run_lock(out):  # kill -9 released it
        pass


@pytest.mark.timeout(180)
def test_the_lock_is_released_when_a_run_fails_or_finishes(tmp_path, monkeypatch):
    import sbn_surgery.train.setup as S
    from sbn_surgery.errors import SbnSurgeryError
    from sbn_surgery.train import finetune

    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise SbnSurgeryError("a model that cannot be built")

    monkeypatch.setattr(S, "build_model", broken)
    with pytest.raises(SbnSurgeryError, match="cannot be built"):
        finetune("resnet10t", "synthetic", output=out, epochs=1, subset=32, batch_size=16,
                 input_size=(3, 32, 32))
    assert (out / ".sbn-surgery.lock").exists()
    holder = _start(HOLDER, out, tmp_path=tmp_path)  # another process can take it now
    _kill9(holder)


@pytest.mark.timeout(60)
def test_the_lock_record_is_read_as_untrusted(tmp_path):
    """A lock file whose holder wrote junk (or anyone did): the refusal still is one line, with
    nothing of the file but checked fields."""
    from sbn_surgery.errors import CheckpointError
    from sbn_surgery.files import LOCK_NAME

    out = tmp_path / "run"
    holder = _start(HOLDER, out, tmp_path=tmp_path)
    try:
        for junk in (b"\xff\xfe not json", b'{"pid": "hunter2", "command": "a\\u001b[31mb"}',
                     b"[1, 2]", b'{"command": "' + b"x" * 10000 + b'"}'):
            (out / LOCK_NAME).write_bytes(junk)  # truncating it does not release the lock
            with pytest.raises(CheckpointError) as info:
                with run_lock(out):
                    pass
            text = str(info.value)
            assert "hunter2" not in text and "\x1b" not in text and len(text) < 1000, text
    finally:
        _kill9(holder)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("staged", [False, True], ids=["file", "staging-folder"])
def test_a_sweep_between_creating_and_locking_a_temporary_name_costs_no_write(tmp_path,
                                                                               monkeypatch,
                                                                               staged):
    """Another process sweeping the folder (a run starting there, a write of the same name) can
    find a temporary file or staging folder after it is created and before its writer locks it,
    and take it for a dead writer's: the writer then takes another name, locked while it writes
    (a later sweep leaves it), instead of writing where nothing holds it, or into a staging
    folder that is gone."""
    import fcntl

    import sbn_surgery.files as F

    real, swept = fcntl.flock, []

    def sweep_first(fd, op):
        if op == fcntl.LOCK_EX and not swept:  # the writer's own lock, the first time
            swept.append(F.remove_stale(tmp_path))  # as the other process would, just before
        return real(fd, op)

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"data")
        assert F.remove_stale(Path(tmp).parent) == []  # a sweep now leaves it: it is locked

    monkeypatch.setattr(F.fcntl, "flock", sweep_first)
    target = tmp_path / "out.bin"
    if staged:
        with F.staging_dir(target) as folder:
            F.atomic_write(folder / target.name, write)
            assert F.remove_stale(tmp_path) == []
            os.replace(folder / target.name, target)
    else:
        F.atomic_write(target, write)
    assert len(swept) == 1 and len(swept[0]) == 1  # the sweep did take the first name
    assert target.read_bytes() == b"data" and _own(tmp_path) == []
