"""What a study keeps in its output directory besides the runs: ``study.json`` (its options,
so a second invocation with other options is refused) and ``<arm>/init.json`` (the arm's
feature-map RMS growth at initialization). Written atomically; read as untrusted JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..files import LOCK_NAME, atomic_write
from ..errors import SbnSurgeryError

STUDY_FILE = "study.json"
INIT_FILE = "init.json"
PLOT_FILE = "study.png"
FORMAT = 1


class StudyError(SbnSurgeryError):
    """The study's output directory holds something else, or another study."""


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp: Path) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, write)


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


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The finished epochs of a run (finetune's ``metrics.jsonl``), [] when there is none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else None
            if isinstance(row, dict):
                rows.append(row)
    except (OSError, UnicodeDecodeError, ValueError):
        return []  # unreadable: the run is resumed (or repeated), which rewrites it
    return rows


def read_growth(arm_dir: Path) -> Optional[dict[str, Any]]:
    path = arm_dir / INIT_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    return data if isinstance(data, dict) and "rms_growth" in data else None
