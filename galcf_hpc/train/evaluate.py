"""Validation during training: classification over every galaxy of a split, and a quick
counterfactual estimate (the one pass of :mod:`galcf_hpc.model.evaluation`) on its first
galaxies, so every epoch shows whether the decoder listens to z1."""

import math
from dataclasses import dataclass

import torch

from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..metrics import classification_summary, confusion_matrix
from ..model.evaluation import Accumulator, explain_batch


@dataclass
class EvalResult:
    classification: dict
    counterfactuals: dict
    recon_mse: float

    @property
    def accuracy(self):
        return self.classification["accuracy"]

    @property
    def macro_f1(self):
        return self.classification["macro_f1"]

    @property
    def cf_count(self):
        return self.counterfactuals["n"]

    @property
    def cf_validity(self):
        v = self.counterfactuals["validity_model"]
        return float("nan") if v is None else v

    @property
    def cf_ssim(self):
        v = self.counterfactuals["ssim_rec"]
        return float("nan") if v is None else v

    def summary(self):
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "cf_validity": self.cf_validity,
            "cf_ssim_rec": self.cf_ssim,
            "recon_mse": self.recon_mse,
        }

    def to_json(self):
        return {
            **self.classification,
            "cf_validity_estimate": self.cf_validity,
            "cf_validity_samples": self.cf_count,
            "cf_ssim_rec_estimate": self.cf_ssim,
            "recon_mse": self.recon_mse,
        }


@torch.no_grad()
def evaluate(model, loader, device, margin, cf_limit=256, views=None):
    """Confusion matrix and reconstruction error over every galaxy the loader yields once
    (padding excluded), and about ``cf_limit`` counterfactuals: the first galaxies towards
    every class other than their own. ``views``: symmetric views per galaxy the model
    classifies by (default ``model.classify_views``)."""
    model.eval()
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    acc = Accumulator(range(NUM_CLASSES), NUM_CLASSES)
    cf_galaxies = math.ceil(cf_limit / (NUM_CLASSES - 1))
    sq_err, n_pix = 0.0, 0
    for batch in loader:
        keep = batch.get("valid", torch.ones(len(batch["labels"]), dtype=torch.bool))
        images = batch["images"][keep.to(batch["images"].device)].to(device)
        labels = batch["labels"][keep.to(batch["labels"].device)].cpu()
        if len(labels) == 0:
            continue
        take = min(len(labels), cf_galaxies - acc.n_galaxies)
        if take > 0:
            out = explain_batch(model, images[:take], range(NUM_CLASSES), margin, views=views)
            acc.add(out, labels[:take])
        cls = model.classify(images, views)
        cm += confusion_matrix(labels, cls.pred, NUM_CLASSES)
        recon = model.decoder(cls.z).float()
        sq_err += float((recon - images.float()).pow(2).sum())
        n_pix += images.numel()
    return EvalResult(
        classification_summary(cm, CLASS_NAMES), acc.summary(CLASS_NAMES)["overall"], sq_err / max(n_pix, 1)
    )
