"""What the built-in sources' PIL resize (``data.transforms.resize_like_pil``: one PIL call per
image and channel) costs a training step, beside the rest of the step.

For each setting (data source, model, input size, batch size) the script times, interleaved
round by round on the same batch indices: the resize alone, the whole batch preparation
(``prepare_batch`` with the training augmentation, the resize included) and one training step
(forward, cross-entropy, backward, SGD with momentum) on the prepared batch. It reports the
medians and the resize's share of a step's time (preparation plus step): what resizing
costs training throughput.

    python benchmarks/builtin_resize.py                # the settings below, 10 rounds
    python benchmarks/builtin_resize.py --repeats 20 --threads 1

Prints one JSON object; ``load_before``/``load_after``: the load averages (1, 5, 15 min).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

#: (data source, timm model, input size, batch size): the README's default fine-tuning run
#: (built-in sources train at 64x64, batch 64), the tests' small run, the 3-channel source.
SETTINGS = [
    ("fashion-mnist", "resnet18", (3, 64, 64), 64),
    ("digits", "resnet10t", (3, 32, 32), 32),
    ("synthetic", "resnet18", (3, 64, 64), 64),
]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _setting(source: str, name: str, size, batch: int, repeats: int) -> dict:
    import timm

    from sbn_surgery.data import open_source
    from sbn_surgery.data.transforms import data_config_for, prepare_batch, resize_like_pil

    ds = open_source(source)
    model = timm.create_model(name, num_classes=ds.num_classes)
    cfg = data_config_for(model, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = ds.train.images[:batch], ds.train.labels[:batch]
    gen = torch.Generator()

    def prepare():
        return prepare_batch(images, cfg, gen.manual_seed(0), ds.hflip)

    x = prepare()

    def step():
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times: dict[str, list[float]] = {"resize": [], "prepare": [], "step": []}
    for _ in range(repeats):
        times["resize"].append(_timed(lambda: resize_like_pil(images, size[1:], cfg["interpolation"])))
        times["prepare"].append(_timed(prepare))
        times["step"].append(_timed(step))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"source": source, "model": name, "input_size": list(size), "batch": batch,
            "native_size": list(images.shape[1:]), "interpolation": cfg["interpolation"],
            "resize_ms": med["resize"], "prepare_ms": med["prepare"], "step_ms": med["step"],
            "resize_share_of_step": med["resize"] / (med["prepare"] + med["step"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    rows = [_setting(*s, args.repeats) for s in SETTINGS]
    print(json.dumps({"repeats": args.repeats, "threads": torch.get_num_threads(),
                      "load_before": load_before, "load_after": list(os.getloadavg()),
                      "settings": rows}, indent=2))


if __name__ == "__main__":
    main()
