"""The package makes torch's OpenMP threads wait passively (see sbn_surgery/_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, sys; {first}; print(os.environ.get('OMP_WAIT_POLICY', '-'))"


def _policy(first: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(first=first)],
                          env={**base, **env}, capture_output=True, text=True, timeout=120,
                          check=True)
    return proc.stdout.strip()


@pytest.mark.parametrize("first, env, want", [
    ("import sbn_surgery", {}, "PASSIVE"),
    ("import sbn_surgery_cli.app", {}, "PASSIVE"),
    ("import sbn_surgery", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's choice stays
    ("import torch; import sbn_surgery", {}, "-"),  # too late to matter: left alone
], ids=["library", "cli", "user-set", "torch-first"])
def test_wait_policy(first, env, want):
    assert _policy(first, **env) == want
