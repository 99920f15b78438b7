"""Feature maps at the SBN sites, measured along a study: the paper's claims 2 and 3.

Every run of a study is measured at initialization (epoch 0) and after every epoch's
validation, on the same :data:`FEATURE_IMAGES` validation images (eval preprocessing, the first
of a fixed shuffle of the whole validation split, whatever ``--subset``), in batches of
:data:`FEATURE_BATCH`, with norm layers on batch statistics (the forward pass training sees;
:func:`sbn_surgery.diagnose.diagnose` on a copy of the model, so training is not touched).

Where: the output of every SBN layer, i.e. what the next layer sees. An arm without SBN
(``none``, ``none+remove-bn``) is measured at the same places: the sites that the first SBN
arm's recipe chooses, found by applying that recipe to a copy of the model and putting an
identity where each SBN would be (a ``replace`` site gets its original module back).

Per site: ``max_abs`` (max |x|), ``rms`` (sqrt of the mean of x^2), ``spectral_entropy`` (the
Shannon entropy of each (image, channel) map's normalized power spectrum over log(H*W): 1 for a
flat spectrum, 0 for one component) and ``top_freq_share`` (the share of a map's energy in its
largest component), both averaged over maps, as diagnose computes them. Per epoch, over sites:
the largest ``max_abs`` (the largest value the network holds at these places), and the mean of
the others (every site counts equally; the spectral figures over the sites whose maps have more
than one pixel).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FEATURE_IMAGES", "FEATURE_BATCH", "METRICS", "FIGURES", "probe_images",
           "site_paths", "with_identity_sites", "measure", "over_sites", "run_figures"]

#: Validation images every run is measured on, and the batch size of the measuring forward.
FEATURE_IMAGES = 256
FEATURE_BATCH = 64
#: The figures of a site (and of an epoch, over sites).
METRICS = ("max_abs", "rms", "spectral_entropy", "top_freq_share")
#: A run's figures, compared between arms: the epoch figures of its last epoch, max |x| at
#: initialization (epoch 0) and the largest max |x| over its training epochs (1..E).
FIGURES = METRICS + ("max_abs_init", "max_abs_peak")
#: The fixed shuffle of the validation split the images are the first of.
_SHUFFLE_SEED = 20230616


def probe_images(ds: Any, data_config: dict, count: int = FEATURE_IMAGES,
                 batch: int = FEATURE_BATCH) -> list[Tensor]:
    """``count`` validation images of ``ds`` (a :class:`~sbn_surgery.data.Dataset`), eval
    preprocessing, in batches of ``batch``: the first of a fixed shuffle of the split (the first
    of the stream for WebDataset shards). The last batch is dropped when it would hold one
    image (batch statistics need two)."""
    from itertools import islice

    from ..data import Loader
    from ..data.transforms import fit_channels

    cfg = fit_channels(data_config)
    if ds.kind == "wds":
        loader = Loader(ds, ds.val, cfg, batch, train=False)
        xs = [x for x, _ in islice(loader.iter_epoch(0), math.ceil(count / batch))]
        images = torch.cat(xs)[:count] if xs else torch.empty(0)
    else:
        n = min(int(count), len(ds.val))
        order = torch.randperm(len(ds.val), generator=torch.Generator().manual_seed(
            _SHUFFLE_SEED))[:n]
        split = ds.val.take(order) if ds.kind == "tensor" else \
            torch.utils.data.Subset(ds.val, order.tolist())
        loader = Loader(ds, split, cfg, n or 1, train=False)
        images = torch.cat([x for x, _ in loader.iter_epoch(0)])
    out = list(images.split(batch))
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return [x for x in out if len(x) >= 2]


def site_paths(model: nn.Module) -> list[str]:
    """The module paths of the SBN layers ``apply_recipe`` inserted in ``model``, in order."""
    from ..surgery import find_sbn

    return [s.module for s in find_sbn(model)]


def with_identity_sites(model: nn.Module, recipe: Any, input_size: Sequence[int]
                        ) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (which has no SBN) with ``recipe`` applied and every SBN turned into
    the identity, and the SBN paths: hooks there see the feature map at the places the recipe
    puts SBN, as the model without SBN computes it."""
    from ..diagnose import remove_batchnorm, restore_batchnorm
    from ..surgery import apply_recipe

    work = copy.deepcopy(model)
    no_bn = restore_batchnorm(work) > 0  # a +remove-bn arm: match the recipe's types as built
    plan = apply_recipe(work, recipe, input_size=tuple(int(v) for v in input_size), force=True)
    if no_bn:
        remove_batchnorm(work)  # the SBN hosts keep their hooks (see remove_batchnorm)
    for site in plan.sites:
        if site.position == "replace":  # the SBN stands at the module's path: put it back
            parent, _, leaf = site.module.rpartition(".")
            host = work.get_submodule(parent) if parent else work
            setattr(host, leaf, copy.deepcopy(model.get_submodule(site.target)))
        else:  # the host's hook calls host.sbn, whatever module it is
            work.get_submodule(site.module.rpartition(".")[0]).sbn = nn.Identity()
    return work, [s.module for s in plan.sites]


def measure(model: nn.Module, images: list[Tensor], epoch: int, *, recipe: Any = None,
            input_size: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """The figures of ``model`` at its SBN sites (or, without SBN, at ``recipe``'s sites, see
    :func:`with_identity_sites`) on ``images``: ``{"epoch", "sites": [...], <METRICS> over
    sites}``. The global RNG state is left as it was; ``model`` is not changed."""
    from ..diagnose import diagnose

    paths = site_paths(model)
    work = model
    if not paths:
        if recipe is None:
            raise ValueError("a model without SBN is measured at a recipe's sites; give recipe")
        work, paths = with_identity_sites(model, recipe, input_size or images[0].shape[1:])
    with torch.random.fork_rng(devices=[]):
        report = diagnose(work, images, points=paths, norm_stats="batch")
    sites = [{"module": r.module, "shape": list(r.shape),
              **{k: _finite(getattr(r, k)) for k in METRICS}} for r in report.layers]
    return {"epoch": int(epoch), "sites": sites, **over_sites(sites)}


def over_sites(sites: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """An epoch's figures over its sites: max of ``max_abs``, mean of the others. The spectral
    figures average the sites that have a spectrum (maps of more than one pixel); ``max_abs``
    and ``rms`` are None where a site's value is missing (non-finite). None without sites."""
    out: dict[str, Optional[float]] = {}
    for key in METRICS:
        values = [s.get(key) for s in sites]
        if key in ("spectral_entropy", "top_freq_share"):
            values = [v for v in values if v is not None]
        if not values or any(not isinstance(v, (int, float)) for v in values):
            out[key] = None
        elif key == "max_abs":
            out[key] = float(max(values))
        else:
            out[key] = float(sum(values) / len(values))
    return out


def _finite(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def run_figures(rows: dict[int, dict[str, Any]], epochs: int) -> dict[str, Optional[float]]:
    """A run's :data:`FIGURES` from its measures by epoch (None where an epoch is missing)."""
    last = rows.get(epochs) or {}
    out = {k: _finite(last.get(k)) for k in METRICS}
    out["max_abs_init"] = _finite((rows.get(0) or {}).get("max_abs"))
    peaks = [_finite((rows.get(e) or {}).get("max_abs")) for e in range(1, epochs + 1)]
    out["max_abs_peak"] = None if not peaks or None in peaks else max(peaks)
    return out
