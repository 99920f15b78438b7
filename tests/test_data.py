"""Data sources, preprocessing, deterministic order and augmentation, errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from sbn_surgery import data as D
from sbn_surgery.data import sources as S
from sbn_surgery.data import transforms as T
from sbn_surgery.errors import DataError

CFG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225)}


# ------------------------------------------------------------------------------- built-ins
def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    ds = D.open_source("digits")
    assert ds.num_classes == 10 and ds.kind == "tensor"
    assert len(ds.train) + len(ds.val) == 1797
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (1, 8, 8)
    # every class is ~20 % in val
    for c in range(10):
        n_tr = int((ds.train.labels == c).sum())
        n_va = int((ds.val.labels == c).sum())
        assert abs(n_va / (n_tr + n_va) - 0.2) < 0.02
    # the uint8 images are the sklearn images (0..16) rescaled; the split is a partition
    ref = load_digits()
    ref_u8 = {bytes(np.round(im * 255 / 16).astype(np.uint8).tobytes()) for im in ref.images}
    tr = {bytes(im.numpy().tobytes()) for im in ds.train.images}
    va = {bytes(im.numpy().tobytes()) for im in ds.val.images}
    assert tr <= ref_u8 and va <= ref_u8
    tr_idx, va_idx = S._stratified_split(torch.from_numpy(ref.target), 0.2)
    assert set(tr_idx.tolist()).isdisjoint(va_idx.tolist())
    assert sorted(tr_idx.tolist() + va_idx.tolist()) == list(range(1797))
    again = D.open_source("digits")
    assert torch.equal(again.val.labels, ds.val.labels)


def test_prepare_resizes_normalizes_and_repeats_gray():
    img = torch.full((2, 1, 8, 8), 51, dtype=torch.uint8)  # 0.2 everywhere
    x = T.prepare_batch(img, CFG)
    assert x.shape == (2, 3, 16, 16)
    for c in range(3):
        want = (0.2 - CFG["mean"][c]) / CFG["std"][c]
        assert torch.allclose(x[:, c], torch.full_like(x[:, c], want), atol=1e-5)
    one = dict(CFG, input_size=(1, 16, 16))
    rgb = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    rgb[:, 0] = 255  # pure red -> luminance 0.299
    y = T.prepare_batch(rgb, T.fit_channels(one))
    mean1 = sum(CFG["mean"]) / 3
    std1 = sum(CFG["std"]) / 3
    assert y.shape == (1, 1, 16, 16)
    assert torch.allclose(y, torch.full_like(y, (0.299 - mean1) / std1), atol=1e-4)


def test_shift_flip_matches_a_loop_reference():
    x = torch.rand(6, 2, 9, 11)
    gen = torch.Generator().manual_seed(3)
    got = T.shift_flip(x.clone(), gen, hflip=True)
    gen = torch.Generator().manual_seed(3)
    b, _, h, w = x.shape
    dy = torch.randint(-(h // 8), h // 8 + 1, (b,), generator=gen)
    dx = torch.randint(-(w // 8), w // 8 + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    for i in range(b):
        src = x[i].flip(-1) if flip[i] else x[i]
        ref = torch.zeros_like(src)
        for r in range(h):
            for c in range(w):
                sr, sc = r - int(dy[i]), c - int(dx[i])
                if 0 <= sr < h and 0 <= sc < w:
                    ref[:, r, c] = src[:, sr, sc]
        assert torch.equal(got[i], ref), i


def test_augmentation_defaults_and_switch():
    plain, _, _ = D.build_loaders("digits", CFG, 16, subset=64)
    assert not plain.augment  # built-in sources: off unless asked
    aug, _, _ = D.build_loaders("digits", CFG, 16, subset=64, augment=True)
    x, y = next(plain.iter_epoch(0))
    idx = torch.tensor(plain._batches(0)[0])
    assert torch.equal(x, T.prepare_batch(plain.split.images[idx], CFG))
    xa, ya = next(aug.iter_epoch(0))
    assert torch.equal(y, ya) and not torch.equal(x, xa)


def test_epochs_are_deterministic_and_resumable_mid_epoch():
    tr, va, n = D.build_loaders("synthetic", CFG, 32, subset=200, seed=5, augment=True)
    assert n == 10 and tr.total_samples == 200 and va.total_samples == 40
    full = list(tr.iter_epoch(1))
    again = list(tr.iter_epoch(1))
    tail = list(tr.iter_epoch(1, start=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[3:], tail))
    other = list(tr.iter_epoch(2))
    assert not torch.equal(full[0][1], other[0][1])  # a new order every epoch
    assert sorted(torch.cat([y for _, y in full]).tolist()) == \
        sorted(torch.cat([y for _, y in other]).tolist())
    # validation: fixed order, no augmentation, equal across epochs
    v1, v2 = list(va.iter_epoch(0)), list(va.iter_epoch(7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))


def test_subset_is_the_same_for_every_seed():
    a, _, _ = D.build_loaders("digits", CFG, 16, subset=100, seed=0)
    b, _, _ = D.build_loaders("digits", CFG, 16, subset=100, seed=9)
    assert torch.equal(a.split.images, b.split.images)
    assert len(a.split) == 100 and a.indices(0) != b.indices(0)  # same images, other order


def test_ranks_shard_the_training_set():
    ds = D.open_source("synthetic")
    loaders = [D.Loader(ds, ds.train, CFG, 16, train=True, seed=1, rank=r, world=2)
               for r in range(2)]
    idx = [ldr.indices(4) for ldr in loaders]
    assert len(idx[0]) == len(idx[1]) == len(ds.train) // 2
    assert set(idx[0]).isdisjoint(idx[1]) and set(idx[0]) | set(idx[1]) == set(range(len(ds.train)))
    assert len(loaders[0]) == len(loaders[1])
    vals = [D.Loader(ds, ds.val, CFG, 16, train=False, rank=r, world=2).indices(0)
            for r in range(2)]
    assert sorted(vals[0] + vals[1]) == list(range(len(ds.val)))


def test_calibration_batches():
    got = D.calibration_batches("digits", CFG, 8, 3)
    assert len(got) == 3 and all(b.shape == (8, 3, 16, 16) for b in got)
    assert torch.equal(got[1], D.calibration_batches("digits", CFG, 8, 3)[1])


# ------------------------------------------------------------------------------- fashion-mnist
def _idx(path, arr: np.ndarray, gz: bool = True) -> None:
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = head + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tr_img = rng.integers(0, 256, (12, 28, 28))
    tr_lab = rng.integers(0, 10, 12)
    _idx(tmp_path / "train-images-idx3-ubyte", tr_img)
    _idx(tmp_path / "train-labels-idx1-ubyte", tr_lab)
    _idx(tmp_path / "t10k-images-idx3-ubyte", tr_img[:5], gz=False)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", tr_lab[:5], gz=False)
    monkeypatch.setattr(S, "FASHION_MNIST_DIRS", [tmp_path])
    ds = D.open_source("fashion-mnist")
    assert ds.num_classes == 10 and len(ds.train) == 12 and len(ds.val) == 5
    assert np.array_equal(ds.train.images[:, 0].numpy(), tr_img)
    assert np.array_equal(ds.val.labels.numpy(), tr_lab[:5])


def test_fashion_mnist_truncated_file_is_a_data_error(tmp_path, monkeypatch):
    for stem in ("train", "t10k"):
        _idx(tmp_path / f"{stem}-images-idx3-ubyte", np.zeros((3, 28, 28)), gz=False)
        _idx(tmp_path / f"{stem}-labels-idx1-ubyte", np.zeros(3), gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    monkeypatch.setattr(S, "FASHION_MNIST_DIRS", [tmp_path])
    with pytest.raises(DataError, match="truncated"):
        D.open_source("fashion-mnist")


def test_fashion_mnist_missing_without_network(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class NoNet:
        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(S, "FASHION_MNIST_DIRS", [tmp_path / "none"])
    monkeypatch.setattr(S, "FASHION_MNIST_CACHE", tmp_path / "cache")
    monkeypatch.setattr(tvd, "FashionMNIST", NoNet)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        D.open_source("fashion-mnist")


# ------------------------------------------------------------------------------- ImageFolder
def _folder(root, classes=("cat", "dog"), per=3, splits=("train", "val"), size=(20, 12)):
    from PIL import Image

    rng = np.random.default_rng(1)
    for s in splits:
        for c in classes:
            (root / s / c).mkdir(parents=True, exist_ok=True)
            for i in range(per):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / s / c / f"{i}.png")
    return root


def test_image_folder_loaders(tmp_path):
    root = _folder(tmp_path / "ds")
    cfg = dict(CFG, crop_pct=0.875, crop_mode="center")
    tr, va, n = D.build_loaders(str(root), cfg, 4, seed=0)
    assert n == 2 and tr.classes == ["cat", "dog"] and tr.augment  # timm's train transform
    xs, ys = zip(*tr.iter_epoch(0))
    assert all(x.shape[1:] == (3, 16, 16) for x in xs)
    assert sorted(torch.cat(ys).tolist()) == [0, 0, 0, 1, 1, 1]
    # random augmentation, reproducible per (seed, epoch, batch), also from the middle
    again = list(tr.iter_epoch(0))
    assert all(torch.equal(a, b[0]) for a, b in zip(xs, again))
    assert torch.equal(list(tr.iter_epoch(0, start=1))[0][0], xs[1])
    vx = torch.cat([x for x, _ in va.iter_epoch(0)])
    assert vx.shape == (6, 3, 16, 16)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("no_val", "no val/"),
    ("empty", "no images"),
    ("classes", "class folders differ"),
])
def test_image_folder_errors(tmp_path, case, match):
    root = tmp_path / "ds"
    if case == "file":
        root.write_text("x")
    elif case == "no_val":
        _folder(root, splits=("train",))
    elif case == "empty":
        (root / "train" / "a").mkdir(parents=True)
        (root / "val" / "a").mkdir(parents=True)
    elif case == "classes":
        _folder(root, splits=("train",))
        _folder(root, classes=("cat", "cow"), splits=("val",))
    with pytest.raises(DataError, match=match):
        D.build_loaders(str(root), CFG, 4)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_naming_the_file(tmp_path, workers):
    root = _folder(tmp_path / "ds")
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(b"not a png")
    tr, _, _ = D.build_loaders(str(root), dict(CFG, crop_pct=0.875, crop_mode="center"), 6,
                               seed=0, workers=workers)
    with pytest.raises(DataError) as info:
        list(tr.iter_epoch(0))
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "remove or replace" in message
