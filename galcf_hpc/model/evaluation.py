"""The one counterfactual pass: classify a batch, reconstruct it, decode its counterfactuals
towards every target class in one batched decode, re-encode them, and measure them.

Training's validation, ``galcf-hpc explain``, the report, the catalog job and the judges'
evaluation all call :func:`explain_batch` and sum its results with :class:`Accumulator`; a
change to the counterfactual pass is made here once. It lives on the model's floor (it
needs only the model's methods and the metrics), so that training's validation can use it
without importing from the floors above.

Validity is recorded by the model itself (its re-encoding of x_cf is classified as the
target) and, separately, by every *judge* handed in: classifiers that nothing in training
optimised against (``galcf_hpc.judges``). The model's validity is necessary but never
sufficient (docs/method.md).
"""

import math
from dataclasses import dataclass, field

import torch

from ..metrics import classification_summary, confusion_matrix, luminance_share, msd, ssim

# per-counterfactual change metrics (float [B, T], NaN where target == pred)
CHANGE_METRICS = ("msd_rec", "ssim_rec", "msd_input", "ssim_input", "luminance_share", "background_msd", "center_msd")


def border_mask(size, fraction, device=None):
    """True on the outer ``fraction`` of the side on every edge (the sky around the galaxy)."""
    width = max(1, int(round(size * fraction)))
    mask = torch.ones(size, size, dtype=torch.bool, device=device)
    mask[width : size - width, width : size - width] = False
    return mask


@dataclass
class ExplainedBatch:
    """Everything :func:`explain_batch` computes for B galaxies and T targets.

    ``valid[name]`` is int8 [B, T]: 1 accepted as the target, 0 not, -1 where the target is
    the galaxy's own predicted class (no counterfactual). ``change[name]`` float [B, T] with
    NaN there. ``judge_pred[name]`` [B]: each judge's class for the input images.
    ``cf_images`` [B, T, 3, R, R] (x_cf, or x~ where target == pred) only with
    ``keep_images``. ``valid_overlay[name]`` (only with ``overlay``): each judge's verdict on
    the image the Figure-3 grid shows, x + (x_cf - x~), coded as ``valid``."""

    targets: list
    pred: torch.Tensor
    logits: torch.Tensor
    h: torch.Tensor
    z: torch.Tensor
    recon: torch.Tensor
    recon_msd: torch.Tensor
    recon_ssim: torch.Tensor
    mask: torch.Tensor
    valid: dict = field(default_factory=dict)
    change: dict = field(default_factory=dict)
    judge_pred: dict = field(default_factory=dict)
    judge_recon_pred: dict = field(default_factory=dict)
    h_cf: torch.Tensor = None
    cf_images: torch.Tensor = None
    valid_overlay: dict = field(default_factory=dict)


def padded_rows(rows, *tensors):
    """The tensors (first dimension n <= ``rows``) padded to exactly ``rows`` with copies of
    their last row. A convolution's result for one galaxy depends on the shape of the batch
    it is computed in (the kernel the library picks), not on the other galaxies in it, so a
    counterfactual decoded in a padded batch of a fixed size is bit-for-bit reproducible
    from its latent alone (``catalog render``)."""
    n = len(tensors[0])
    if n == rows:
        return tensors
    return tuple(torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])]) for t in tensors)


def counterfactual_cells(model, z, h, pred, targets, margin, placement, chunk, pad=False):
    """The counterfactuals of latents z (hidden h, predicted class pred) towards each of
    ``targets`` (a 1-d tensor of class indices) other than the galaxy's own class, ``chunk``
    at a time: yields (galaxy rows, target columns, x_cf as float, h_cf). With ``pad`` every
    decode runs on exactly ``chunk`` latents (:func:`padded_rows`), so each image is
    reproducible from its latent alone. The one place that decodes counterfactuals for
    explaining, the catalog and ``catalog render``."""
    rows, cols = (pred[:, None] != targets[None]).nonzero(as_tuple=True)
    for s in range(0, len(rows), chunk):
        r, c = rows[s : s + chunk], cols[s : s + chunk]
        latents = (z[r], h[r], pred[r], targets[c])
        x_cf, h_cf = model.counterfactual(*(padded_rows(chunk, *latents) if pad else latents), margin, placement)
        yield r, c, x_cf[: len(r)].float(), h_cf[: len(r)]


def counterfactual_images(model, z, h, pred, targets, margin, placement, rows):
    """Float images ``[B, T, 3, R, R]`` of B galaxies towards each of ``targets``: x_cf, and
    x~ where the target is the galaxy's own class, every decode on exactly ``rows`` latents
    (what :func:`explain_batch` keeps with ``keep_images`` and ``pad``)."""
    tgt = torch.as_tensor(list(targets), device=z.device, dtype=pred.dtype)
    images = decode_reconstructions(model, z, rows).float()[:, None].repeat(1, len(tgt), 1, 1, 1)
    for r, c, x_cf, _ in counterfactual_cells(model, z, h, pred, tgt, margin, placement, rows, pad=True):
        images[r, c] = x_cf
    return images


def decode_reconstructions(model, z, rows):
    """x~ = D(z) in batches of exactly ``rows`` (see :func:`padded_rows`)."""
    return torch.cat(
        [model.decoder(*padded_rows(rows, z[s : s + rows]))[: len(z[s : s + rows])] for s in range(0, len(z), rows)]
    )


def _change_metric(name, x_cf, recon, x, border):
    """One of ``CHANGE_METRICS`` for counterfactuals x_cf of reconstructions ``recon`` of
    inputs ``x``: [n]."""
    if name.endswith("_rec") or name.endswith("_input"):
        other = recon if name.endswith("_rec") else x
        return (msd if name.startswith("msd") else ssim)(x_cf, other)
    if name == "luminance_share":
        return luminance_share(x_cf - recon)
    diff2 = (x_cf - recon).pow(2).mean(1)  # background_msd, center_msd
    return diff2[:, border if name == "background_msd" else ~border].mean(1)


def _judge_predict(judge, images):
    with torch.autocast(images.device.type, enabled=False):
        return judge(images.float()).argmax(1)


@torch.no_grad()
def explain_batch(
    model,
    images,
    targets,
    margin,
    judges=None,
    border_fraction=0.25,
    keep_images=False,
    chunk=None,
    placement="boundary",
    metrics=CHANGE_METRICS,
    pad=False,
    judge_inputs=True,
    views=None,
    overlay=False,
):
    """Classify ``images`` [B, 3, R, R], reconstruct them and explain them towards each of
    ``targets`` (class indices), each counterfactual ``margin`` past the decision boundary
    with the given ``placement`` (model/counterfactual.py). ``judges``: {name: module mapping images to class logits},
    never the model itself. The counterfactuals of all galaxies and targets are decoded and
    re-encoded ``chunk`` at a time (default: B, the memory of one batch); with ``pad`` every
    decode (reconstructions too) runs on exactly ``chunk`` latents, so that each image is
    reproducible from its latent alone (:func:`padded_rows`). ``metrics``: the change
    metrics to compute (a subset of ``CHANGE_METRICS``; the others stay NaN);
    ``judge_inputs=False`` skips the judges' classes of the input images and of their
    reconstructions (``judge_pred`` and ``judge_recon_pred`` stay empty). ``views``: how many
    symmetric views the model classifies the galaxies and its re-encoded counterfactuals by
    (default ``model.classify_views``). ``overlay``: the judges also classify the image the
    grids show, x + (x_cf - x~) clipped to [0, 1] (``valid_overlay``). Returns an
    :class:`ExplainedBatch`."""
    judges = judges or {}
    unknown = set(metrics) - set(CHANGE_METRICS)
    if unknown:
        raise ValueError(f"unknown change metrics {sorted(unknown)}; known: {CHANGE_METRICS}")
    cls = model.classify(images, views)
    pred, h, z = cls.pred, cls.h, cls.z
    step = chunk or max(len(pred), 1)
    recon = (decode_reconstructions(model, z, step) if pad else model.decoder(z)).float()
    x = images.float()
    b, t_count = len(pred), len(targets)
    dev = images.device
    tgt = torch.as_tensor(list(targets), device=dev, dtype=pred.dtype)
    mask = pred[:, None] != tgt[None]
    names = ["model", *judges]
    valid = {n: torch.full((b, t_count), -1, dtype=torch.int8, device=dev) for n in names}
    shown = {n: torch.full((b, t_count), -1, dtype=torch.int8, device=dev) for n in judges} if overlay else {}
    change = {n: torch.full((b, t_count), float("nan"), device=dev) for n in CHANGE_METRICS}
    h_cf_all = h.float()[:, None].repeat(1, t_count, 1)
    cf_images = recon[:, None].repeat(1, t_count, 1, 1, 1) if keep_images else None
    border = border_mask(images.shape[-1], border_fraction, dev)
    for r, c, x_cf, h_cf in counterfactual_cells(model, z, h, pred, tgt, margin, placement, step, pad):
        target = tgt[c]
        h_cf_all[r, c] = h_cf.float()
        if keep_images:
            cf_images[r, c] = x_cf
        valid["model"][r, c] = (model.classify(x_cf, views).pred == target).to(torch.int8)
        for name, judge in judges.items():
            valid[name][r, c] = (_judge_predict(judge, x_cf) == target).to(torch.int8)
        if shown:
            overlaid = (x[r] + x_cf.float() - recon[r]).clamp(0, 1)
            for name, judge in judges.items():
                shown[name][r, c] = (_judge_predict(judge, overlaid) == target).to(torch.int8)
        for name in metrics:
            change[name][r, c] = _change_metric(name, x_cf, recon[r], x[r], border).float().to(dev)
    judge_pred = {name: _judge_predict(judge, x) for name, judge in judges.items()} if judge_inputs else {}
    judge_recon_pred = {name: _judge_predict(judge, recon) for name, judge in judges.items()} if judge_inputs else {}
    return ExplainedBatch(
        list(targets),
        pred,
        cls.logits.float(),
        h.float(),
        z.float(),
        recon,
        msd(recon, x).float(),
        ssim(recon, x).float(),
        mask,
        valid,
        change,
        judge_pred,
        judge_recon_pred,
        h_cf_all,
        cf_images,
        shown,
    )


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


class Accumulator:
    """Sums of an explained split, batch by batch: confusion matrices (model and judges on
    the real images), reconstruction quality, and per target the counterfactual validity by
    the model and by each judge, the panel's agreement, and the change metrics."""

    def __init__(self, targets, num_classes, judge_names=()):
        self.targets = list(targets)
        self.num_classes = num_classes
        self.judges = list(judge_names)
        t = len(self.targets)
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.judge_cm = {n: torch.zeros_like(self.cm) for n in self.judges}
        self.judge_recon_cm = {n: torch.zeros_like(self.cm) for n in self.judges}
        self.n_galaxies = 0
        self.recon = {"msd": 0.0, "ssim": 0.0}
        self.sums = {k: torch.zeros(t, dtype=torch.float64) for k in self._keys()}
        # per metric: how many counterfactuals it is defined for (a galaxy that does not
        # change at all has no luminance share)
        self.counts = {k: torch.zeros(t, dtype=torch.float64) for k in self._keys()}

    def _keys(self):
        keys = ["validity_model", *CHANGE_METRICS]
        if self.judges:
            keys += [f"validity_{n}" for n in self.judges] + ["validity_panel", "panel_all", "panel_majority"]
            # the judges on the overlay x + (x_cf - x~) the grids show (None where not measured)
            keys += [f"overlay_validity_{n}" for n in self.judges] + ["overlay_validity_panel"]
        return keys

    def add(self, out, labels):
        """Add an :class:`ExplainedBatch` of galaxies with true ``labels`` (-1: unknown)."""
        labels = torch.as_tensor(labels).cpu()
        known = labels >= 0
        self.cm += confusion_matrix(labels[known], out.pred.cpu()[known], self.num_classes)
        for n in self.judges:
            self.judge_cm[n] += confusion_matrix(labels[known], out.judge_pred[n].cpu()[known], self.num_classes)
            self.judge_recon_cm[n] += confusion_matrix(
                labels[known], out.judge_recon_pred[n].cpu()[known], self.num_classes
            )
        self.n_galaxies += len(labels)
        self.recon["msd"] += float(out.recon_msd.double().sum())
        self.recon["ssim"] += float(out.recon_ssim.double().sum())
        m = out.mask.cpu()
        per = {"validity_model": out.valid["model"].cpu().double()}
        per.update({k: out.change[k].cpu().double() for k in CHANGE_METRICS})
        if self.judges:
            votes = torch.stack([out.valid[n].cpu().double() for n in self.judges])  # [J, B, T]
            for n, v in zip(self.judges, votes):
                per[f"validity_{n}"] = v
            per["validity_panel"] = votes.mean(0)
            per["panel_all"] = (votes == 1).all(0).double()
            per["panel_majority"] = ((votes == 1).double().mean(0) > 0.5).double()
            if out.valid_overlay:
                shown = torch.stack([out.valid_overlay[n].cpu().double() for n in self.judges])
                for n, v in zip(self.judges, shown):
                    per[f"overlay_validity_{n}"] = v
                per["overlay_validity_panel"] = shown.mean(0)
        for k, v in per.items():
            defined = m & v.isfinite()
            self.sums[k] += torch.where(defined, v, torch.zeros_like(v)).sum(0)
            self.counts[k] += defined.sum(0).double()

    def _means(self, idx=None):
        sel = slice(None) if idx is None else slice(idx, idx + 1)
        out = {"n": int(self.counts["validity_model"][sel].sum())}
        for k, v in self.sums.items():
            denom = float(self.counts[k][sel].sum())
            out[k] = _finite(float(v[sel].sum()) / denom) if denom else None
        return out

    def summary(self, class_names):
        """JSON-ready dict: classification (model and judges), reconstruction, overall and
        per-target counterfactual numbers."""
        n = max(self.n_galaxies, 1)
        return {
            "num_galaxies": self.n_galaxies,
            **{k: v for k, v in classification_summary(self.cm, class_names).items() if k != "num_galaxies"},
            "judges": {name: classification_summary(cm, class_names) for name, cm in self.judge_cm.items()},
            # the judges on the reconstructions x~ of the same galaxies: the ceiling of what
            # the decoder can show them (docs/method.md, "What the decoder can draw")
            "judges_on_reconstructions": {
                name: classification_summary(cm, class_names) for name, cm in self.judge_recon_cm.items()
            },
            "reconstruction": {"msd": self.recon["msd"] / n, "ssim": self.recon["ssim"] / n},
            "overall": self._means(),
            "per_target": {class_names[t]: self._means(i) for i, t in enumerate(self.targets)},
        }


class FigurePool:
    """One galaxy per true class for the Figure-3 grid, preferring a correctly classified one."""

    def __init__(self):
        self.pool = {}

    def add(self, images, labels, out):
        for i in range(len(labels)):
            c, correct = int(labels[i]), bool(out.pred[i] == labels[i])
            if c >= 0 and (c not in self.pool or (correct and not self.pool[c]["correct"])):
                self.pool[c] = {
                    "correct": correct,
                    "images": images[i],
                    "pred": out.pred[i],
                    "z": out.z[i],
                    "h": out.h[i],
                }

    def __bool__(self):
        return bool(self.pool)

    @torch.no_grad()
    def rows(self, model, margin, placement="boundary"):
        """(originals [K, 3, R, R], overlays x + (x_cf - x~) [K, K, 3, R, R], saliency x_cf - x~
        [K, K, 3, R, R], classes, reconstructions x~ [K, 3, R, R]) for the K pooled galaxies
        towards each pooled class: the arguments of :func:`galcf_hpc.explain.figures.write_grids`."""
        classes = sorted(self.pool)
        x, z, h, pred = (torch.stack([self.pool[c][k] for c in classes]) for k in ("images", "z", "h", "pred"))
        recon = model.decoder(z.to(next(model.parameters()).dtype)).float()
        overlays, saliency = [], []
        for t in classes:
            x_cf, _ = model.counterfactual(z, h, pred, torch.full_like(pred, t), margin, placement)
            overlays.append((x.float() + (x_cf.float() - recon)).clamp(0, 1))
            saliency.append(x_cf.float() - recon)
        return x, torch.stack(overlays, 1), torch.stack(saliency, 1), classes, recon
