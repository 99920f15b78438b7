"""timm's named data sets (WebDataset shards, tar archives, local Hugging Face datasets) and
timm's --aa / --reprob augmentation, on tiny data sets written from scikit-learn's digits."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sbn_surgery.data import build_loaders, calibration_batches, open_source
from sbn_surgery.errors import DataError
from conftest import free_port

N_TRAIN, N_VAL, SHARDS = 400, 100, 4
#: 8x8 gray images at their native size: timm's eval transform leaves every pixel as it is.
CFG = {"input_size": (1, 8, 8), "interpolation": "bilinear", "mean": (0.5,), "std": (0.5,),
       "crop_pct": 1.0, "crop_mode": "center"}


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(a, "L").save(b, format="PNG")
    return b.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[: N_TRAIN + N_VAL]
    labels = d.target.astype(np.int64)[: N_TRAIN + N_VAL]
    return (images[:N_TRAIN], labels[:N_TRAIN]), (images[N_TRAIN:], labels[N_TRAIN:])


def _write_wds(root: Path, train, val, num_classes=None) -> None:
    root.mkdir(parents=True)
    per = N_TRAIN // SHARDS
    names = []
    for s in range(SHARDS):
        names.append(f"train-{s:06d}.tar")
        with tarfile.open(root / names[-1], "w") as tf:
            for i in range(s * per, (s + 1) * per):
                _add(tf, f"{i:06d}.png", _png(train[0][i]))
                _add(tf, f"{i:06d}.cls", str(int(train[1][i])).encode())
    with tarfile.open(root / "validation-000000.tar", "w") as tf:
        for i in range(N_VAL):
            _add(tf, f"v{i:06d}.png", _png(val[0][i]))
            _add(tf, f"v{i:06d}.cls", str(int(val[1][i])).encode())
    info = {"name": "digits", "splits": {
        "train": {"name": "train", "num_samples": N_TRAIN, "filenames": names,
                  "shard_lengths": [per] * SHARDS},
        "validation": {"name": "validation", "num_samples": N_VAL,
                       "filenames": ["validation-000000.tar"], "shard_lengths": [N_VAL]}}}
    if num_classes is not None:
        info["num_classes"] = num_classes
    (root / "_info.json").write_text(json.dumps(info))


def _write_tar(root: Path, train, val) -> None:
    root.mkdir(parents=True)
    for name, (images, labels) in (("train", train), ("validation", val)):
        with tarfile.open(root / f"{name}.tar", "w") as tf:
            for i, (a, y) in enumerate(zip(images, labels)):
                _add(tf, f"{name}/{int(y)}/{i:05d}.png", _png(a))


def _write_hf(root: Path, train, val) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def split(images, labels):
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": _png(a), "path": None} for a in images],
             "label": labels.tolist()}, features=features)

    (root / "parquet" / "data").mkdir(parents=True)
    split(*train).to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    split(*val).to_parquet(str(root / "parquet" / "data" / "validation-00000-of-00001.parquet"))
    datasets.DatasetDict(train=split(*train), validation=split(*val)).save_to_disk(
        str(root / "saved"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train and val digits, and the same written as shards, a tar and Hugging Face datasets."""
    import datasets

    root = tmp_path_factory.mktemp("timm-data")
    train, val = _digits()
    _write_wds(root / "wds", train, val)
    _write_tar(root / "tar", train, val)
    old = datasets.config.HF_DATASETS_CACHE  # load_dataset's Arrow cache: into tmp, not $HOME
    datasets.config.HF_DATASETS_CACHE = root / "hf-cache"
    _write_hf(root / "Hf", train, val)  # capitals: timm 1.0.12's factory lower-cased the path
    yield dict(root=root, train=train, val=val)
    datasets.config.HF_DATASETS_CACHE = old


KINDS = {  # (source under the data root, --dataset)
    "wds": ("wds", "wds/digits"),
    "tar": ("tar", "tar"),
    "hfds-parquet": ("Hf", "hfds/parquet"),
    "hfds-saved": ("Hf/saved", "hfds/digits"),
}


def _open(data, kind):
    where, dataset = KINDS[kind]
    return open_source(data["root"] / where, dataset=dataset)


def _as_pairs(x: torch.Tensor, y: torch.Tensor) -> list[tuple[bytes, int]]:
    """(uint8 pixels, label) of each image of a batch normalized per CFG."""
    pixels = torch.round((x * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8).numpy()
    return [(p.tobytes(), int(t)) for p, t in zip(pixels[:, 0], y)]


def _source_pairs(split) -> Counter:
    images, labels = split
    return Counter((a.tobytes(), int(t)) for a, t in zip(images, labels))


def _epoch(loader, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iter_epoch(epoch, start)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(KINDS))
def test_timm_dataset_opens_and_replays(data, kind):
    ds = _open(data, kind)
    assert ds.num_classes == 10 and len(ds.train) == N_TRAIN and len(ds.val) == N_VAL
    train, val, classes = build_loaders(ds, CFG, 32, augment=False)
    assert classes == 10
    assert len(train) == -(-N_TRAIN // 32) and len(val) == -(-N_VAL // 32)
    # every image with its label, as in the source: the whole split, each sample once
    got_val = [p for x, y in val.iter_epoch(0) for p in _as_pairs(x, y)]
    assert Counter(got_val) == _source_pairs(data["val"])
    e0 = _epoch(train, 0)
    assert len(e0) == len(train)
    assert Counter(p for x, y in e0 for p in _as_pairs(x, y)) == _source_pairs(data["train"])
    assert all(x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
               for x, y in e0)
    # the same epoch twice: the same batches; another epoch: another order
    again = _epoch(train, 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    e1 = _epoch(train, 1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))
    # a resume from batch k yields the tail of the full epoch
    tail = _epoch(train, 0, start=5)
    assert len(tail) == len(e0) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(e0[5:], tail))


def test_folder_dataset_uses_timm_split_names(data, tmp_path):
    from PIL import Image

    train, val = data["train"], data["val"]
    for split, (images, labels) in (("training", train), ("valid", val)):
        for i, (a, y) in enumerate(zip(images[:60], labels[:60])):
            (tmp_path / split / str(int(y))).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a, "L").save(tmp_path / split / str(int(y)) / f"{i}.png")
    ds = open_source(tmp_path, dataset="folder")  # train -> training, validation -> valid
    assert len(ds.train) == 60 and len(ds.val) == 60 and ds.num_classes == 10
    _, val_loader, _ = build_loaders(ds, CFG, 16)
    got = Counter(p for x, y in val_loader.iter_epoch(0) for p in _as_pairs(x, y))
    assert got == _source_pairs((val[0][:60], val[1][:60]))
    with pytest.raises(DataError, match="no folder nope/"):
        open_source(tmp_path, dataset="imagefolder", val_split="nope")


def test_wds_subset_and_calibration(data):
    ds = _open(data, "wds")
    train, _, _ = build_loaders(ds, CFG, 16, subset=150, augment=False)
    assert train.total_samples == 150
    got = Counter(p for x, y in train.iter_epoch(0) for p in _as_pairs(x, y))
    # --subset N: the first N samples in file order, in every epoch
    assert got == _source_pairs((data["train"][0][:150], data["train"][1][:150]))
    again = Counter(p for x, y in train.iter_epoch(3) for p in _as_pairs(x, y))
    assert again == got
    # with --subset, calibration draws only from the images the run trains on
    small, _, _ = build_loaders(ds, CFG, 16, subset=20, augment=False)
    trained = {x.numpy().tobytes() for xb, _ in small.iter_epoch(0) for x in xb}
    calib = [x.numpy().tobytes() for b in calibration_batches(ds, CFG, 8, 3, subset=20) for x in b]
    assert len(calib) == 20 and set(calib) == trained
    for kind in ("wds", "hfds-saved"):
        batches = calibration_batches(_open(data, kind), CFG, 8, 3)
        assert [tuple(b.shape) for b in batches] == [(8, 1, 8, 8)] * 3
        assert all(torch.equal(a, b) for a, b in
                   zip(batches, calibration_batches(_open(data, kind), CFG, 8, 3)))


# --------------------------------------------------------------------------------------------
# 2 gloo processes on WebDataset shards
# --------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = open_source(Path(root), dataset="wds/digits")
        train, val, _ = build_loaders(ds, CFG, 32, seed=7, distributed=True, augment=False)
        result = {"len_train": len(train), "len_val": len(val)}
        for name, loader, epoch in (("train0", train, 0), ("train1", train, 1),
                                    ("val", val, 0)):
            pairs = [p for x, y in loader.iter_epoch(epoch) for p in _as_pairs(x, y)]
            result[name] = [[p.hex(), t] for p, t in pairs]
            result["batches_" + name] = len(list(loader.iter_epoch(epoch)))
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_wds_two_gloo_processes_get_disjoint_shards(data, tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(data["root"] / "wds"), str(tmp_path)),
             nprocs=2, join=True)
    r = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert r[0]["len_train"] == r[1]["len_train"] == -(-N_TRAIN // 2 // 32)
    for name in ("train0", "train1", "val"):
        assert r[0]["batches_" + name] == r[1]["batches_" + name]
    assert r[0]["batches_train0"] == r[0]["len_train"]
    for name, source in (("train0", data["train"]), ("train1", data["train"]),
                         ("val", data["val"])):
        a = Counter((bytes.fromhex(p), t) for p, t in r[0][name])
        b = Counter((bytes.fromhex(p), t) for p, t in r[1][name])
        if name != "val":  # the images themselves: digits repeats none within a split of shards
            assert not set(a) & set(b), name
        assert a + b == _source_pairs(source), name
    # each rank reads whole shards: its 200 training samples come from 2 of the 4 shards
    per = N_TRAIN // SHARDS
    index = {(a.tobytes(), int(t)): i for i, (a, t) in enumerate(zip(*data["train"]))}
    for k in range(2):
        shards = {index[(bytes.fromhex(p), t)] // per for p, t in r[k]["train0"]}
        assert len(shards) == 2


# --------------------------------------------------------------------------------------------
# --aa and --reprob
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("source", ["digits", "wds"])
def test_aa_and_reprob_change_training_images_only(data, source):
    def loaders(**kw):
        ds = open_source("digits") if source == "digits" else _open(data, "wds")
        cfg = dict(CFG, input_size=(1, 32, 32)) if source == "digits" else CFG
        return build_loaders(ds, cfg, 16, seed=3, subset=64, **kw)[:2]

    plain_train, plain_val = loaders(augment=True)
    for kw in (dict(aa="rand-m9-mstd0.5"), dict(reprob=1.0)):
        train, val = loaders(**kw)
        assert train.augment
        b = next(iter(train.iter_epoch(2)))
        assert not torch.equal(b[0], next(iter(plain_train.iter_epoch(2)))[0]), kw
        assert torch.equal(b[1], next(iter(plain_train.iter_epoch(2)))[1])  # same samples
        same = next(iter(loaders(**kw)[0].iter_epoch(2)))  # a new loader, the same seeds
        assert torch.equal(b[0], same[0]), kw
        assert not torch.equal(b[0], next(iter(train.iter_epoch(3)))[0])
        for (x, y), (px, py) in zip(val.iter_epoch(0), plain_val.iter_epoch(0)):
            assert torch.equal(x, px) and torch.equal(y, py)


def test_reprob_erases_with_timm_noise_on_digits():
    ds = open_source("digits")
    cfg = dict(CFG, input_size=(1, 16, 16))
    plain, _, _ = build_loaders(ds, cfg, 32, subset=64, augment=True)
    erased, _, _ = build_loaders(ds, cfg, 32, subset=64, reprob=1.0)
    x, px = next(iter(erased.iter_epoch(0)))[0], next(iter(plain.iter_epoch(0)))[0]
    changed = (x != px).flatten(1).float().mean(1)
    # every image has one rectangle replaced (timm's 2% to 1/3 of the area, rounded to whole
    # pixels), the rest untouched
    assert bool(((changed > 0.0) & (changed < 0.45)).all()), changed
    for img, ref in zip(x[:, 0], px[:, 0]):
        rows, cols = torch.nonzero(img != ref, as_tuple=True)
        box = (img != ref)[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert bool(box.all())  # the changed pixels fill their bounding box


@pytest.mark.parametrize("aa", ["rand-m10-n3-mstd0-inc1", "v0"])
def test_policies_that_keep_no_bits_posterize_to_black(data, aa):
    """inc1 at magnitude 10 and v0's level-2 posterize ask for 0 bits, which recent Pillow
    refuses: every image of an epoch goes through (in-memory images and timm's transform of
    image files), and a 0-bit posterize is black."""
    from PIL import Image
    from timm.data import auto_augment

    from sbn_surgery.data.augment import keep_zero_bit_posterize

    for ds, cfg in ((open_source("digits"), dict(CFG, input_size=(1, 16, 16))),
                    (_open(data, "tar"), CFG)):
        train, _, _ = build_loaders(ds, cfg, 32, subset=128, seed=1, aa=aa)
        assert sum(len(y) for _, y in train.iter_epoch(0)) == 128
    ops = []
    policy = keep_zero_bit_posterize(auto_augment.auto_augment_transform(aa, {}) if aa == "v0"
                                     else auto_augment.rand_augment_transform(aa, {}))
    for op in (policy.ops if hasattr(policy, "ops") else sum(map(list, policy.policy), [])):
        if op.name.startswith("Posterize"):
            ops.append(op)
    img = Image.new("RGB", (8, 8), (200, 120, 60))
    assert ops and all(op.aug_fn is not auto_augment.posterize for op in ops)
    black = ops[0].aug_fn(img, 0)
    assert black.mode == "RGB" and black.getextrema() == ((0, 0),) * 3
    kept = ops[0].aug_fn(img, 2)  # 1 to 8 bits: timm's own op, unchanged
    assert kept.getpixel((0, 0)) == (192, 64, 0)


def test_bad_aa_and_reprob_are_data_errors():
    for bad in ("rand-m9-zz1", "banana", "randx"):  # what timm refuses
        with pytest.raises(DataError, match="--aa"):
            build_loaders("digits", CFG, 16, aa=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match="--reprob"):
            build_loaders("digits", CFG, 16, reprob=bad)
    with pytest.raises(DataError, match="augmentation turned off"):
        build_loaders("digits", CFG, 16, aa="rand-m9", augment=False)


# --------------------------------------------------------------------------------------------
# hostile input: one DataError each, no hang
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_truncated_shard_is_one_data_error(data, tmp_path):
    import shutil

    root = tmp_path / "wds"
    shutil.copytree(data["root"] / "wds", root)
    shard = root / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3 + 100])
    train, _, _ = build_loaders(open_source(root, dataset="wds/digits"), CFG, 32)
    with pytest.raises(DataError, match="train-000002.tar"):
        for _ in train.iter_epoch(0):
            pass


@pytest.mark.timeout(120)
def test_hostile_timm_sources_are_one_data_error(data, tmp_path):
    wds_root = data["root"] / "wds"
    with pytest.raises(DataError, match="do not exist"):
        open_source(wds_root, dataset="wds/digits", train_split="nothing-{000000..000003}.tar|8")
    with pytest.raises(DataError, match="number of samples"):  # a pattern without a count
        open_source(wds_root, dataset="wds/digits", train_split="train-{000000..000003}.tar",
                    val_split="validation-000000.tar")
    with pytest.raises(DataError, match="'nosuch'"):
        open_source(wds_root, dataset="wds/digits", val_split="nosuch")
    with pytest.raises(DataError, match="not a folder"):
        open_source(tmp_path / "absent", dataset="wds/digits")
    with pytest.raises(DataError, match="no local Hugging Face dataset"):
        open_source(tmp_path / "absent", dataset="hfds/absent")
    with pytest.raises(DataError, match="not one this tool reads"):
        open_source(wds_root, dataset="tfds/digits")
    with pytest.raises(DataError, match="split 'test'"):
        open_source(data["root"] / "Hf" / "saved", dataset="hfds/x", val_split="test")
    with pytest.raises(DataError, match="no nope.tar"):
        open_source(data["root"] / "tar", dataset="tar", train_split="nope")
    with pytest.raises(DataError, match="--train-split"):
        open_source("digits", train_split="train")


@pytest.mark.timeout(120)
def test_labels_out_of_range_and_missing_packages(data, tmp_path, monkeypatch):
    root = tmp_path / "wds"
    _write_wds(root, *_digits(), num_classes=5)  # the digits have labels up to 9
    train, _, _ = build_loaders(open_source(root, dataset="wds/digits"), CFG, 32)
    assert train.dataset.num_classes == 5
    with pytest.raises(DataError, match="outside 0..4"):
        for _ in train.iter_epoch(0):
            pass
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("webdataset", "datasets") else
                        real(name, *a))
    with pytest.raises(DataError, match="pip install webdataset"):
        open_source(root, dataset="wds/digits")
    with pytest.raises(DataError, match=r"sbn-surgery\[hfds\]"):
        open_source(data["root"] / "Hf", dataset="hfds/parquet")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["wds", "tar", "hfds-parquet"])
def test_loader_workers_change_nothing(data, kind, monkeypatch):
    """Workers decode and transform only: the batches (augmented ones too) and a resume from the
    middle do not depend on their number."""
    from sbn_surgery.data import loaders

    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)  # 2 workers also on a 1-CPU runner
    ds = _open(data, kind)
    one = build_loaders(ds, CFG, 32, seed=5, aa="rand-m9-mstd0.5")[0]
    two = build_loaders(ds, CFG, 32, seed=5, aa="rand-m9-mstd0.5", workers=2)[0]
    assert two.workers == 2
    a, b = _epoch(one, 1), _epoch(two, 1, start=3)
    assert len(b) == len(a) - 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a[3:], b))
