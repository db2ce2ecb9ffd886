"""Evaluation: classification metrics on a split (pure functions + one loop), and a quick
counterfactual-validity estimate so every epoch shows whether the decoder listens to z1."""

from dataclasses import dataclass

import torch

from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..explain.metrics import ssim
from ..train.objective import random_other_class


def confusion_matrix(labels, preds, num_classes=NUM_CLASSES):
    """Rows: true class, columns: predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(cm):
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else float("nan")


def per_class_accuracy(cm):
    support = cm.sum(1)
    return [float(cm[i, i] / support[i]) if support[i] > 0 else float("nan") for i in range(cm.shape[0])]


def macro_f1(cm):
    """Mean F1 over the classes present in the labels."""
    tp = cm.diagonal().double()
    precision = tp / cm.sum(0).double().clamp_min(1)
    recall = tp / cm.sum(1).double().clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = cm.sum(1) > 0
    return float(f1[present].mean()) if bool(present.any()) else float("nan")


@dataclass
class EvalResult:
    confusion: torch.Tensor
    cf_valid: int
    cf_count: int
    recon_mse: float
    cf_ssim_sum: float = 0.0

    @property
    def accuracy(self):
        return accuracy(self.confusion)

    @property
    def macro_f1(self):
        return macro_f1(self.confusion)

    @property
    def cf_validity(self):
        return self.cf_valid / self.cf_count if self.cf_count else float("nan")

    @property
    def cf_ssim(self):
        return self.cf_ssim_sum / self.cf_count if self.cf_count else float("nan")

    def summary(self):
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "cf_validity": self.cf_validity,
                "cf_ssim_rec": self.cf_ssim, "recon_mse": self.recon_mse}

    def to_json(self):
        per_class = per_class_accuracy(self.confusion)
        return {
            "accuracy": self.accuracy,
            "per_class_accuracy": {name: per_class[i] for i, name in enumerate(CLASS_NAMES)},
            "confusion_matrix": self.confusion.tolist(),
            "macro_f1": self.macro_f1,
            "num_galaxies": int(self.confusion.sum()),
            "cf_validity_estimate": self.cf_validity,
            "cf_validity_samples": self.cf_count,
            "cf_ssim_rec_estimate": self.cf_ssim,
            "recon_mse": self.recon_mse,
        }


@torch.no_grad()
def evaluate(model, loader, device, margin, cf_limit=256, seed=0):
    """Confusion matrix and reconstruction error over every galaxy the loader yields once
    (padding excluded), and the validity of counterfactuals towards random other classes
    for the first ``cf_limit`` of them."""
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    valid = count = 0
    ssim_sum = 0.0
    sq_err, n_pix = 0.0, 0
    for batch in loader:
        keep = batch.get("valid", torch.ones(len(batch["labels"]), dtype=torch.bool))
        images = batch["images"][keep].to(device)
        labels = batch["labels"][keep]
        if len(labels) == 0:
            continue
        pred, _, h, z = model.classify(images)
        cm += confusion_matrix(labels, pred.cpu())
        recon = model.decoder(z)
        sq_err += float((recon.float() - images.float()).pow(2).sum())
        n_pix += images.numel()
        take = min(len(labels), cf_limit - count)
        if take > 0:
            target = random_other_class(pred[:take].cpu(), NUM_CLASSES, generator=gen).to(device)
            x_cf, _ = model.counterfactual(z[:take], h[:take], pred[:take], target, margin)
            pred_cf = model.classify(x_cf)[0]
            valid += int((pred_cf == target).sum())
            ssim_sum += float(ssim(x_cf, recon[:take]).sum())
            count += take
    return EvalResult(cm, valid, count, sq_err / max(n_pix, 1), ssim_sum)
