"""Shared fixtures, and helpers more than one test file uses (imported as
``from conftest import ...``)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from functools import lru_cache

import pytest

#: Printed at the start of every run (also under -q), so a CI log shows what the install resolved.
_REPORTED = ("pytest", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript",
             "numpy", "pydantic", "typer", "rich", "safetensors", "scikit-learn")


def pytest_sessionstart(session):
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    line = ", ".join(f"{n} {version(n)}" for n in _REPORTED)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"python {sys.version.split()[0]}: {line}")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread than on
    two threads that wait for each other (a module asks for it with ``usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``sbn-surgery ARGS...`` in-process through the real entry point (error handling
    included); returns exit code, stdout and stderr."""
    from sbn_surgery_cli.app import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["sbn-surgery", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def one_line_error(result, *fragments: str, notes: tuple[str, ...] = ()) -> str:
    """Exit 2, exactly one non-empty stderr line starting with 'error:' and holding every
    fragment, no traceback anywhere. ``result``: a :class:`CliResult` or a CompletedProcess.
    ``notes``: prefixes of the lines a run that started prints before failing (``calibration:``),
    allowed before the error line and only there. Returns the line."""
    code = getattr(result, "code", None)
    code = result.returncode if code is None else code
    assert code == 2, (code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in (result.stdout or "")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    while notes and len(lines) > 1 and lines[0].startswith(notes):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_through_aliases(levels: int, links: int = 20, indent: str = "") -> str:
    """Anchors each ``levels`` deep around an alias of the one before: ``links`` x ``levels``
    deep once expanded, though each anchor is shallow where it is first used (the last keys,
    which a check that remembers nodes it has seen reaches first)."""
    def nest(inner: str) -> str:
        return "[" * levels + inner + "]" * levels

    lines = [f"d0: &a0 {nest('1')}"]
    lines += [f"d{i}: &a{i} {nest(f'*a{i - 1}')}" for i in range(1, links)]
    lines += [f"s{i}: *a{i}" for i in reversed(range(links))]
    return "".join(f"{indent}{line}\n" for line in lines)


def randomize_norms(model, g) -> None:
    """Random BatchNorm affine parameters and running statistics from the generator ``g``, as a
    trained model has: identity init and export are then not tested on norms that are nearly
    the identity (or zero: timm zero-initializes the last norm of residual blocks)."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


#: Converted models for export and parity: name -> (input size, rules, model kwargs, another
#: input size). Each model has a channel-mode and a frequency-mode site at odd feature maps, and
#: together they cover each way SBN sits: after a BatchNorm2d (channel mode folds into it),
#: replacing one, between a BatchNormAct2d's norm and its activation (MobileNetV3 class; folds
#: into it), and before a norm (no fold).
ARCHS = {
    "resnet10t": ((3, 56, 60), [{"paths": ["layer1.0.bn2"], "sbn": {"stats": "channel"}},  # 14x15
                                {"paths": ["layer2.0.bn2"], "position": "replace",  # 7x8
                                 "sbn": {"stats": "frequency"}}], {}, (88, 72)),
    "lcnet_035": ((3, 112, 112), [{"paths": ["blocks.3.0.bn2"], "sbn": {"stats": "frequency"}},  # 7x7
                                  {"paths": ["blocks.3.1.bn2"], "sbn": {"stats": "channel"}}],  # 7x7
                  {}, (96, 128)),
    "regnetx_002": ((3, 112, 120), [{"paths": ["s2.b1.conv2.bn"], "sbn": {"stats": "frequency"}},  # 14x15
                                    {"paths": ["s3.b1.conv3.bn"], "sbn": {"stats": "channel"}}],  # 7x8
                    {}, (128, 96)),
    # a small classifier MLP (mlp_ratio) keeps the test fast; the features are VGG-11's
    "vgg11_bn": ((3, 56, 60), [{"paths": ["features.9"], "sbn": {"stats": "frequency"}},  # 14x15
                               {"paths": ["features.16"], "position": "before",  # 7x7
                                "sbn": {"stats": "channel"}}],
                 {"mlp_ratio": 0.01}, (64, 80)),
}


@pytest.fixture(scope="session")
def resnet10t_file(tmp_path_factory):
    """A converted resnet10t (recipe resnet, 10 classes, 3x32x32, standard init) on disk, once
    per session, for tests that only read it."""
    import sbn_surgery as sbn

    model, _ = sbn.convert("resnet10t", "resnet", num_classes=10, input_size=(3, 32, 32),
                           init="standard")
    path = tmp_path_factory.mktemp("resnet10t") / "r10.safetensors"
    sbn.save_converted(model, path)
    return path


@lru_cache(maxsize=None)
def _converted(name: str, stats, seed: int):
    import timm
    import torch

    from sbn_surgery import apply_recipe, calibrate
    from sbn_surgery.recipe import Recipe

    size, rules, kwargs, _ = ARCHS[name]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(seed)
    randomize_norms(model, g)
    if stats is not None:
        rules = [{**r, "sbn": {"stats": stats}} for r in rules]
    plan = apply_recipe(model, Recipe(name="test", rules=rules), input_size=size)
    calibrate(model, [torch.randn(4, *size, generator=g) for _ in range(2)])
    with torch.no_grad():
        for site in plan.sites:
            sbn = model.get_submodule(site.module)
            sbn.weight.uniform_(0.5, 1.5, generator=g)
            sbn.bias.normal_(0.0, 0.3, generator=g)
    return model.eval(), plan, size


def converted(name: str, stats=None, seed: int = 0):
    """A timm model of ARCHS (random init, random norms) with SBN at its sites, in the modes
    given there (or all in ``stats``), statistics calibrated on random images and random
    gamma/beta, so no SBN is close to the identity. A fresh copy each call."""
    model, plan, size = _converted(name, stats, seed)
    return copy.deepcopy(model), plan, size


#: The Hub repositories of the test cache (tests/hub_cache.py): timm's resnet10t.c3_in1k, and a
#: user's 10-class resnet10t stored as a pickle, with its own preprocessing and class names.
HUB_NAME = "resnet10t.c3_in1k"
#: A tag whose preprocessing is not ImageNet's default (mean = std = 0.5).
HUB_NAME_HALF = "mobilenetv4_conv_small_050.e3000_r224_in1k"
HUB_USER_REPO = "me/r10t-ten"
HUB_USER_CFG = {"input_size": [3, 48, 48], "mean": [0.3, 0.3, 0.3], "std": [0.2, 0.25, 0.3],
                "interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "center",
                "label_names": [f"digit{i}" for i in range(10)]}


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache in the Hub's layout, built once (see tests/hub_cache.py)."""
    from hub_cache import add_repo, hub_model, timm_config

    root = tmp_path_factory.mktemp("hf-cache")
    timm_model = hub_model(HUB_NAME, seed=0)
    add_repo(root, "timm/" + HUB_NAME, timm_model, config=timm_config(timm_model))
    half = hub_model(HUB_NAME_HALF, seed=1)
    add_repo(root, "timm/" + HUB_NAME_HALF, half, config=timm_config(half))
    user = hub_model("resnet10t", seed=2, num_classes=10)
    add_repo(root, HUB_USER_REPO, user, config=timm_config(user, **HUB_USER_CFG),
             weights="pytorch_model.bin")
    return root


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """HF_HUB_CACHE at the test cache, HF_HUB_OFFLINE=1, no other Hub setting in the way."""
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


@pytest.fixture
def no_fetch(monkeypatch):
    """Any attempt to reach the Hub or a weights URL fails the test."""
    import urllib.request

    import torch

    import sbn_surgery.hub as H

    def network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    for target, name in ((H, "_probe"), (H, "_download"), (torch.hub, "download_url_to_file"),
                         (urllib.request, "urlopen")):
        monkeypatch.setattr(target, name, network)
