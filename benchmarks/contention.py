"""How `sbn-surgery quickstart` holds up on a busy machine: its wall time alone, and beside one and
two processes that spin a core each (``python -c "while True: pass"``), as on a laptop or shared
server. Prints one JSON object; the ratios to the idle time are the figures.

With C cores and B spinning processes, a fair share of the CPU makes a run that uses all C cores
(C + B) / C times slower at worst: 2x beside two spinners on 2 cores. Software whose threads wait
for each other by spinning loses far more, since the spinners steal the time a waiting thread
burns.

    python benchmarks/contention.py                  # idle, beside 1 and beside 2 busy processes
    python benchmarks/contention.py --repeats 3      # medians of 3 runs each

Run it on an otherwise idle machine: ``load_before`` in the JSON says how idle it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SPIN = "while True: pass"


def _run_quickstart(out_dir: str) -> float:
    cmd = [sys.executable, "-m", "sbn_surgery_cli", "quickstart", "--output", out_dir, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
        raise SystemExit(f"quickstart failed with exit code {proc.returncode}")
    return seconds


def _beside(busy: int, out_dir: str) -> float:
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0.0)  # the spinners are running before quickstart starts
        return _run_quickstart(out_dir)
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    ap.add_argument("--busy", type=int, nargs="+", default=[1, 2],
                    help="numbers of busy processes to run beside quickstart")
    args = ap.parse_args()
    load_before = os.getloadavg()
    times: dict[int, list[float]] = {0: [], **{b: [] for b in args.busy}}
    with tempfile.TemporaryDirectory() as tmp:
        _run_quickstart(os.path.join(tmp, "warm"))  # page cache, .pyc files
        for _ in range(args.repeats):  # interleaved, so a change in the background hits all
            for busy in times:
                times[busy].append(_beside(busy, os.path.join(tmp, f"busy{busy}")))
    idle = statistics.median(times[0])
    result = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
        "repeats": args.repeats,
        "idle_s": round(idle, 2),
        **{f"busy{b}_s": round(statistics.median(times[b]), 2) for b in args.busy},
        **{f"ratio_busy{b}": round(statistics.median(times[b]) / idle, 3) for b in args.busy},
        "runs_s": {str(b): [round(t, 2) for t in ts] for b, ts in times.items()},
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                           "SBN_SURGERY_THREADS") if k in os.environ},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
