"""How long the commands that only show things take to start: ``sbn-surgery --help``, ``recipes``,
``version``, a command's ``--help``, each a fresh process, timed by the wall clock from start to
exit. Beside them, the floor (``python -c pass``) and what every command paid before the imports
were made lazy (``python -c "import torch, timm"``). The settings run interleaved, round by
round, and the medians are reported; ``limit_s`` is the budget for ``sbn-surgery --help``.

    python benchmarks/startup.py                 # 9 rounds
    python benchmarks/startup.py --repeats 21

Prints one JSON object. ``load_before``/``load_after``: the load averages (1, 5, 15 min), to say
how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIMIT_S = 0.5


def _entry_point() -> list[str]:
    """The installed ``sbn-surgery`` script next to this interpreter, else on PATH, else
    ``python -m sbn_surgery_cli``."""
    beside = Path(sys.executable).with_name("sbn-surgery")
    found = str(beside) if beside.is_file() else shutil.which("sbn-surgery")
    return [found] if found else [sys.executable, "-m", "sbn_surgery_cli"]


def _settings() -> dict[str, list[str]]:
    cli = _entry_point()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "sbn-surgery --help": [*cli, "--help"],
        "sbn-surgery recipes": [*cli, "recipes"],
        "sbn-surgery version": [*cli, "version"],
        "sbn-surgery finetune --help": [*cli, "finetune", "--help"],
        "python -m sbn_surgery_cli --help": [sys.executable, "-m", "sbn_surgery_cli", "--help"],
        "import torch, timm": [sys.executable, "-c", "import torch, timm"],
    }


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
                          env={**os.environ, "COLUMNS": "80"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="rounds (each setting once a round)")
    args = ap.parse_args()
    settings = _settings()
    load_before = os.getloadavg()
    for cmd in settings.values():  # one untimed round: files into the page cache
        _time(cmd)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, cmd in settings.items():
            times[name].append(_time(cmd))
    medians = {name: round(statistics.median(t), 3) for name, t in times.items()}
    help_s = medians["sbn-surgery --help"]
    print(json.dumps({
        "entry_point": _entry_point()[0],
        "repeats": args.repeats,
        "median_s": medians,
        "min_s": {name: round(min(t), 3) for name, t in times.items()},
        "help_over_floor": round(help_s / medians["python -c pass"], 1),
        "torch_timm_over_help": round(medians["import torch, timm"] / help_s, 1),
        "limit_s": LIMIT_S,
        "help_within_limit": help_s <= LIMIT_S,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
