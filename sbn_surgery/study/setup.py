"""What every run of a study shares: the data, the input size, the calibration and measuring
images, each arm's model at initialization, and the feature-map measures of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .arms import Arm, build_arm_model
from .features import FEATURE_BATCH, measure

#: Where ``--from-study`` finds each seed's starting weights: the ``none`` arm's best epoch.
FROM_STUDY_CHECKPOINT = "none/seed{seed}/best.safetensors"


def from_study_checkpoint(source: Path, seed: int) -> Path:
    return Path(source) / FROM_STUDY_CHECKPOINT.format(seed=seed)


class StudySetup:
    """Data, input size, calibration and measuring images: found once, and only if a model is
    built. ``reference``: the recipe whose sites an arm without SBN is measured at (the first
    SBN arm's; None: no measures). ``from_study``: seed k's arms start from that study's
    ``none/seed<k>/best.safetensors`` instead of ``--checkpoint``."""

    def __init__(self, model: str, data: str, given: dict[str, Any], reference: Any = None,
                 from_study: Optional[Path] = None) -> None:
        self.model, self.data, self.given = model, data, given
        self.reference, self.from_study = reference, from_study
        self._ready: Optional[tuple] = None
        self._images: Optional[list] = None

    def get(self) -> tuple[int, tuple[int, int, int], list]:
        """(classes, input size, calibration batches)."""
        if self._ready is None:
            from ..data import calibration_batches, data_config_for, default_input_size, open_source
            from ..models import create_model, input_size_of
            from ..train.model import CALIBRATION_BATCHES
            from ..train.options import DEFAULTS

            g = self.given
            ds = open_source(self.data, **{k: g.get(k) for k in ("dataset", "train_split",
                                                                 "val_split")})
            in_chans = int((g.get("model_kwargs") or {}).get("in_chans", 3))
            n_cls = g.get("num_classes") or ds.num_classes
            probe = create_model(self.model, num_classes=n_cls, model_kwargs=self.kwargs(),
                                 checkpoint=g.get("checkpoint"),
                                 pretrained=bool(g.get("pretrained")), with_weights=False)
            size = (tuple(int(v) for v in g["input_size"]) if g.get("input_size") else
                    default_input_size(ds, input_size_of(probe), in_chans))
            cfg = data_config_for(probe, size, in_chans, g)  # timm's --mean, --std, ... if given
            batch = min(g.get("batch_size") or DEFAULTS["batch_size"], 32)
            calib = calibration_batches(ds, cfg, batch, CALIBRATION_BATCHES)
            self._ready = (n_cls, size, calib)
            self._source = (ds, cfg)
        return self._ready

    def images(self) -> list:
        """The validation images every run is measured on (see :mod:`.features`)."""
        if self._images is None:
            from .features import probe_images

            self.get()
            self._images = probe_images(*self._source)
        return self._images

    def about(self) -> dict[str, Any]:
        """What a run's features.json says of how it was measured."""
        images = self.images()
        return {"images": sum(len(x) for x in images), "batch": FEATURE_BATCH,
                "norm_stats": "batch", "split": "val",
                "reference_recipe": getattr(self.reference, "name", None)}

    def kwargs(self) -> dict[str, Any]:
        """timm create_model arguments: --model-kwargs plus --drop/--drop-path."""
        from ..train.model import model_kwargs_of

        g = self.given
        return model_kwargs_of(g.get("model_kwargs"), g.get("drop"), g.get("drop_path"))

    def checkpoint(self, seed: int) -> Optional[str]:
        if self.from_study is not None:
            return str(from_study_checkpoint(self.from_study, seed))
        return self.given.get("checkpoint")

    def build(self, arm: Arm, seed: int):
        n_cls, size, calib = self.get()
        return build_arm_model(arm, self.model, seed=seed, num_classes=n_cls,
                               checkpoint=self.checkpoint(seed),
                               pretrained=bool(self.given.get("pretrained")),
                               model_kwargs=self.kwargs(),
                               input_size=size, calibration=calib,
                               force=bool(self.given.get("force")))

    def growth(self, net) -> Optional[float]:
        from ..diagnose import diagnose

        return diagnose(net, self.get()[2]).growth()

    def measure(self, net, epoch: int) -> dict[str, Any]:
        """The feature-map figures of ``net`` (an arm's model) after ``epoch`` epochs."""
        return measure(net, self.images(), epoch, recipe=self.reference,
                       input_size=self.get()[1])  # the recipe only where net has no SBN
