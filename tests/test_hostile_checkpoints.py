"""Untrusted checkpoints and converted files: every damaged, edited or hostile file is one red
line and exit 2, in bounded time and memory, with no file changed and no payload run."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
from conftest import one_line_error
from safetensors import safe_open
from safetensors.torch import save_file

import sbn_surgery as sbn

SMALL = ["--input-size", "3", "32", "32"]
NAME = "resnet10t"
CLI = Path(sys.executable).with_name("sbn-surgery")


def _files(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` and its bytes (links, FIFOs and devices not read)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p)] = b"<not read>"
        else:
            out[str(p)] = p.read_bytes()
    return out


@contextmanager
def _bounded_memory(headroom: int = 1536 << 20):
    """Lower this process's address-space limit to what it uses now plus ``headroom``: an
    allocation of many GB fails at once instead of swapping the machine."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    model, _ = sbn.convert(NAME, "resnet", num_classes=10, input_size=(3, 32, 32))
    path = folder / "good.safetensors"
    sbn.save_converted(model, path)
    return path


@pytest.fixture
def guarded(tmp_path):
    """A folder with a good output already in place (the commands below write over it)."""
    (tmp_path / "out.safetensors").write_bytes(b"a good file from before")
    return tmp_path


def _checked(run_cli, folder: Path, *args):
    """Run the CLI; no file in ``folder`` (inputs, the good output) may change."""
    before = _files(folder)
    result = run_cli(*args)
    assert _files(folder) == before
    return result


def _convert(run_cli, folder: Path, ckpt, *extra):
    return _checked(run_cli, folder, "convert", NAME, "--checkpoint", ckpt,
                    "-o", folder / "out.safetensors", *SMALL, *extra)


# ---------------------------------------------------------------------------------------------
# plain checkpoints (convert --checkpoint)
# ---------------------------------------------------------------------------------------------
def _good_safetensors(path: Path) -> bytes:
    m = timm.create_model(NAME, pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    return path.read_bytes()


BROKEN = {
    "empty.safetensors": lambda p: b"",
    "short.safetensors": lambda p: b"\x01\x02\x03",
    "truncated.safetensors": lambda p: _good_safetensors(p)[:5000],
    "random.safetensors": lambda p: os.urandom(4096),
    "huge-header.safetensors": lambda p: (2**62).to_bytes(8, "little") + b"{}" + bytes(64),
    "bad-json-header.safetensors": lambda p: (10).to_bytes(8, "little") + b"{not json}",
    "empty.pth": lambda p: b"",
    "random.pth": lambda p: os.urandom(4096),
    "truncated.pth": lambda p: _pth_bytes(p)[:3000],
    "list.pth": lambda p: _pth_bytes(p, obj=[torch.zeros(3)]),
}


def _pth_bytes(path: Path, obj=None) -> bytes:
    torch.save(obj if obj is not None else timm.create_model(NAME).state_dict(), path)
    return path.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_damaged_checkpoint_is_one_line(run_cli, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BROKEN[name](tmp_path / f"src-{name}"))
    before = _files(tmp_path)
    one_line_error(_convert(run_cli, tmp_path, path), str(path))
    assert _files(tmp_path) == before and not (tmp_path / "out.safetensors").exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.timeout(60)
def test_pickle_payload_is_refused_and_never_runs(run_cli, guarded):
    marker = guarded / "PWNED"
    path = guarded / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    one_line_error(_convert(run_cli, guarded, path), f"refused to load {path}", "system")
    assert not marker.exists()
    one_line_error(_checked(run_cli, guarded, "diagnose", NAME, "--checkpoint", path, *SMALL),
              "refused to load")
    assert not marker.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_regular_files_are_refused_without_reading(run_cli, guarded, kind, suffix):
    path = guarded / f"weights{suffix}"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    one_line_error(_convert(run_cli, guarded, path), "not a regular file")


@pytest.mark.timeout(60)
def test_directory_without_weights(run_cli, guarded):
    (guarded / "snap").mkdir()
    (guarded / "snap" / "config.json").write_text('{"architecture": "resnet10t"}')
    one_line_error(_convert(run_cli, guarded, guarded / "snap"), "holds no model.safetensors or "
              "pytorch_model.bin")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config, fragment", [
    ("{not json", "is not valid JSON"),
    ('["a"]', "is not a JSON object"),
    ('{"architecture": ["../../etc"]}', "'architecture' is not a model name"),
    ('{"num_classes": 1e30}', "'num_classes' is not a class count"),
])
def test_hostile_snapshot_config(run_cli, guarded, config, fragment):
    snap = guarded / "snap"
    snap.mkdir()
    _good_safetensors(snap / "model.safetensors")
    (snap / "config.json").write_text(config)
    one_line_error(_convert(run_cli, guarded, snap), fragment)


@pytest.mark.timeout(60)
def test_checkpoint_of_another_architecture_names_the_keys(run_cli, guarded):
    path = guarded / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    one_line_error(_convert(run_cli, guarded, path, "--num-classes", "10"), "does not fit model ResNet",
              "missing key(s): conv1.0.weight")


@pytest.mark.timeout(60)
def test_a_prefix_on_some_keys_only_is_not_merged(run_cli, guarded):
    """Stripping ``module.`` per key would let ``module.fc.weight`` overwrite ``fc.weight``."""
    state = dict(timm.create_model(NAME, num_classes=10).state_dict())
    state["module.fc.weight"] = torch.zeros_like(state["fc.weight"])
    path = guarded / "dup.pth"
    torch.save(state, path)
    one_line_error(_convert(run_cli, guarded, path, "--num-classes", "10"),
              "1 unexpected key(s): module.fc.weight")


# ---------------------------------------------------------------------------------------------
# converted files: edited metadata, absurd sizes, paths, recipes
# ---------------------------------------------------------------------------------------------
def _edited(src: Path, dst: Path, drop=(), **changes) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in drop:
        meta.pop(key)
    meta.update(changes)
    save_file(tensors, dst, metadata=meta)
    return dst


EDITS = [
    (dict(model_kwargs="{not json"), "'model_kwargs' is not valid JSON"),
    (dict(model_kwargs="[1, 2]"), "'model_kwargs' is invalid"),
    (dict(num_classes='"abc"'), "'num_classes' is invalid"),
    (dict(num_classes="abc"), "'num_classes' is not valid JSON"),
    (dict(num_classes=str(10**9)), "'num_classes' is invalid"),
    (dict(input_size="[3, 100000, 100000]"), "'input_size' is invalid"),
    (dict(model_name="../../etc/passwd"), "'model_name' is invalid"),
    (dict(model_name="resnet18"), "does not fit its tensors"),
    (dict(model_kwargs='{"checkpoint_path": "/etc/passwd"}'), "'checkpoint_path' is refused"),
    (dict(model_kwargs='{"pretrained": true}'), "'pretrained' is refused"),
    (dict(model_kwargs='{"pretrained_cfg_overlay": {"file": "/etc/passwd"}}'), "invalid"),
    (dict(model_kwargs='{"width_factor": 4}'), "does not take these arguments"),
    (dict(model_kwargs='{"base_width": 7}'), "does not take these arguments"),
    (dict(recipe="name: [unclosed"), "embedded recipe"),
    (dict(recipe="x" * (300 * 1024)), "'recipe' is invalid"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, fragment", EDITS, ids=[str(i) for i in range(len(EDITS))])
def test_edited_metadata_is_one_line(run_cli, converted, guarded, change, fragment):
    path = _edited(converted, guarded / "edited.safetensors", **change)
    one_line_error(_checked(run_cli, guarded, "diagnose", path, "--json"), fragment)
    one_line_error(_checked(run_cli, guarded, "export", path, "-o", guarded / "out.safetensors"),
              fragment)


@pytest.mark.timeout(60)
def test_missing_model_name(run_cli, converted, guarded):
    path = _edited(converted, guarded / "edited.safetensors", drop=("model_name",))
    one_line_error(_checked(run_cli, guarded, "diagnose", path), "'model_name' is invalid: Field required")


@pytest.mark.timeout(60)
def test_recipe_alias_bomb_is_refused_quickly(run_cli, converted, guarded):
    bomb = "x0: &l0 [r, r, r, r, r, r, r, r, r, r]\n" + "".join(
        f"x{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 9))
    path = _edited(converted, guarded / "bomb.safetensors",
                   recipe=bomb + "name: b\nmodels: [*l8]\nrules: [*l8]\n")
    # the alias limit refuses it before anything expands (no clock: the timeout bounds it)
    one_line_error(_checked(run_cli, guarded, "diagnose", path), "embedded recipe",
                   "expands to more than")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("change", [
    dict(num_classes=str(10**6)),  # within the schema's bound: 2 GB of head, refused by shape
    dict(model_kwargs='{"stem_width": 200000}'),  # a 360 GB stem
])
def test_absurd_sizes_are_refused_before_allocating(run_cli, converted, guarded, change):
    path = _edited(converted, guarded / "huge.safetensors", **change)
    with _bounded_memory():
        result = _checked(run_cli, guarded, "diagnose", path)
    text = one_line_error(result, "does not fit its tensors")
    assert "MemoryError" not in text and "allocate" not in text


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_absurd_class_count_in_a_child_process_stays_small(converted, tmp_path):
    """The same through the installed command, under a 4 GiB address-space limit, measuring
    the child's peak resident memory."""
    path = _edited(converted, tmp_path / "huge.safetensors", num_classes=str(10**6),
                   model_kwargs='{"stem_width": 64}')

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([str(CLI), "diagnose", str(path)], stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not all children's
    text = err.read_text()
    assert os.waitstatus_to_exitcode(status) == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert "does not fit its tensors" in lines[0]
    assert usage.ru_maxrss * 1024 < 3 << 30, usage.ru_maxrss


# ---------------------------------------------------------------------------------------------
# state.pt on --resume
# ---------------------------------------------------------------------------------------------
STATES = {
    "wrong-structure": lambda p: torch.save({"format": 2, "options": {}}, p),
    "wrong-type": lambda p: torch.save({"format": 2, "options": {}, "epoch": "3", "step": 0,
                                        "model": {}, "optimizer": {}, "scheduler": {},
                                        "history": [], "best_top1": 0.0,
                                        "best_epoch": 0, "ranks": []}, p),
    "mid-epoch-without-ranks": lambda p: torch.save(
        {"format": 2, "options": {}, "epoch": 0, "step": 3, "model": {}, "optimizer": {},
         "scheduler": {}, "history": [], "best_top1": 0.0, "best_epoch": 0,
         "ranks": [{}]}, p),
    "bad-optimizer": lambda p: torch.save(dict(_real_state(p), optimizer={"state": []}), p),
    "other-model": lambda p: torch.save(dict(_real_state(p), model={"fc.weight": torch.zeros(3)}), p),
    "bad-ema": lambda p: torch.save(dict(_real_state(p), ema={"fc.weight": 3}), p),
    "not-torch": lambda p: p.write_text("epoch: 3\n"),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(_pth_bytes(p, obj={"format": 2, "x": torch.zeros(9)})[:200]),
    "other-format": lambda p: torch.save([1, 2], p),
    "fifo": lambda p: os.mkfifo(p),
}
def _real_state(path: Path) -> dict:
    """A well-formed state (weights from the run's last.safetensors beside it)."""
    from safetensors.torch import load_file

    return {"format": 2, "options": {}, "epoch": 1, "step": 0,
            "model": load_file(str(path.parent / "last.safetensors")),
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            "history": [], "best_top1": 0.5, "best_epoch": 1, "ranks": []}


STATE_FRAGMENTS = {
    "bad-optimizer": "'optimizer' is not an optimizer state",
    "bad-ema": "'ema' is not a state dict of tensors",
    "other-model": "its 'model' does not fit last.safetensors",
    "wrong-structure": "the key 'epoch' is missing", "wrong-type": "'epoch' is a str, not a int",
    "mid-epoch-without-ranks": "ranks[0] lacks", "not-torch": "cannot read",
    "empty": "is empty", "truncated": "cannot read", "other-format": "not a state file",
    "fifo": "not a regular file",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(STATES))
def test_bad_state_file_on_resume(run_cli, converted, tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(converted.read_bytes())
    STATES[kind](run / "state.pt")
    before = _files(tmp_path)
    result = run_cli("finetune", NAME, "--data", "synthetic", "-o", run, "--resume")
    one_line_error(result, str(run / "state.pt"), STATE_FRAGMENTS[kind])
    assert _files(tmp_path) == before


@pytest.mark.timeout(60)
def test_a_well_formed_state_passes(converted, tmp_path):
    """The control for the cases above: only what they break is wrong with them."""
    from sbn_surgery.train import outputs as O

    (tmp_path / "last.safetensors").write_bytes(converted.read_bytes())
    torch.save(dict(_real_state(tmp_path / "state.pt"), format=O.STATE_FORMAT), tmp_path / "state.pt")
    assert O.load_state(tmp_path)["best_top1"] == 0.5
