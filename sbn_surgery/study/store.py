"""What a study keeps in its output directory besides the runs: ``study.json`` (its options,
so a second invocation with other options is refused; once the study is done also every run's
feature-map measures and their paired differences), ``<arm>/init.json`` (the arm's feature-map
RMS growth at initialization) and each run's ``features.json`` (its measures per epoch, see
:mod:`.features`). A finished run keeps what the report and a later ``--from-study`` need
(``best.safetensors``, metrics, measures): its optimizer state, last and EMA weights go
(:func:`tidy_run`). Written atomically; read as untrusted JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..files import LOCK_NAME, atomic_write_bytes
from ..errors import SbnSurgeryError

STUDY_FILE = "study.json"
INIT_FILE = "init.json"
PLOT_FILE = "study.png"
FEATURES_PLOT_FILE = "study_features.png"
FEATURES_FILE = "features.json"
#: What a finished run no longer needs: a study is never extended (--epochs is one of its options).
SPENT_FILES = ("state.pt", "last.safetensors", "ema.safetensors")
FORMAT = 2  # 2: feature-map measures per run and epoch


class StudyError(SbnSurgeryError):
    """The study's output directory holds something else, or another study."""


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StudyError(f"cannot read {path} ({type(exc).__name__}); it is not a study file "
                         "of sbn-surgery: choose another --output") from None


def check_output(out: Path, options: dict[str, Any]) -> bool:
    """Refuse an --output that is a file, holds other files, or holds a study with other
    options whose runs began. Returns whether the study exists already (with these options)."""
    path = out / STUDY_FILE
    if out.exists() and not out.is_dir():
        raise StudyError(f"--output {out} is a file; give a directory for the study")
    if not path.exists():
        if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
            raise StudyError(f"--output {out} holds files but no {STUDY_FILE}: it is not a study "
                             "directory; choose an empty or new directory")
        return False
    stored = _read_json(path)
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise StudyError(f"{path} is not a study file of this version (format "
                         f"{stored.get('format') if isinstance(stored, dict) else '?'}, expected "
                         f"{FORMAT}); choose another --output")
    old = stored.get("options") or {}
    diffs = [f"{k} {options.get(k)!r} (stored: {old.get(k)!r})"
             for k in sorted(set(old) | set(options)) if old.get(k) != options.get(k)]
    if diffs and not any(p.is_dir() for p in out.iterdir()):
        return False  # no run began (e.g. a typo in --data failed first): start it afresh
    if diffs:
        raise StudyError(f"{out} holds a study with other options: " + "; ".join(diffs)
                         + ". Repeat the stored options to continue it, or choose another "
                         "--output")
    return True


def save_options(out: Path, options: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STUDY_FILE, {"format": FORMAT, "options": options})


def save_results(out: Path, options: dict[str, Any], features: dict[str, Any]) -> None:
    """study.json once the study is done: its options and the measures of every run."""
    write_json(out / STUDY_FILE, {"format": FORMAT, "options": options, "features": features})


def read_study(out: Path) -> dict[str, Any]:
    """Another study's study.json (``--from-study``), checked to be one of this version."""
    path = out / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"--from-study {out}: no {STUDY_FILE} there; give the --output "
                         "directory of a finished study")
    stored = _read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("options"), dict):
        raise StudyError(f"{path} is not a study file of sbn-surgery; give the --output "
                         "directory of a finished study")
    return stored


#: What the report reads of every finished epoch of a run: numbers, ``images`` and
#: ``train_time_s`` where given (finetune writes them all).
_EPOCH_NUMBERS, _EPOCH_OPTIONAL = ("top1", "val_loss"), ("images", "train_time_s")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _epoch_row(row: Any) -> bool:
    """Whether ``row`` is a finished epoch as the report reads it."""
    return isinstance(row, dict) and all(_is_number(row.get(k)) for k in _EPOCH_NUMBERS) and \
        all(_is_number(row[k]) for k in _EPOCH_OPTIONAL if k in row)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The finished epochs of a run (finetune's ``metrics.jsonl``), [] when there is none, or
    when the file is unreadable or a line is not an epoch record (the run is then resumed, or
    repeated, which rewrites it)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    return rows if all(_epoch_row(r) for r in rows) else []


def read_features(run_dir: Path) -> dict[int, dict[str, Any]]:
    """A run's measures by epoch ({} when there are none, or the file is unreadable: the
    measures of a run that is still to train are taken again)."""
    path = run_dir / FEATURES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    rows = data.get("epochs") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return {}
    return {int(r["epoch"]): r for r in rows
            if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] >= 0}


def read_features_about(run_dir: Path) -> dict[str, Any]:
    """How a run was measured (its features.json without the epochs); {} when unreadable."""
    try:
        data = json.loads((run_dir / FEATURES_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k != "epochs"} if isinstance(data, dict) else {}


def write_features(run_dir: Path, rows: dict[int, dict[str, Any]], about: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FEATURES_FILE, {**about, "epochs": [rows[e] for e in sorted(rows)]})


def tidy_run(run_dir: Path) -> int:
    """Delete a finished run's optimizer state, last and EMA weights; returns bytes freed."""
    freed = 0
    for name in SPENT_FILES:
        path = run_dir / name
        if path.is_file() and (run_dir / "best.safetensors").is_file():
            freed += path.stat().st_size
            path.unlink()
    return freed


def read_growth(arm_dir: Path) -> Optional[dict[str, Any]]:
    path = arm_dir / INIT_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    return data if isinstance(data, dict) and "rms_growth" in data else None
