"""Every number of a run's report: one pass over the explained split (``explain.split``, at
most ``max_galaxies`` galaxies in loader order) with the counterfactual pass of
:mod:`galcf_hpc.model.evaluation`, the run's judges as the panel, then latent-space
separation, outliers, training records and the catalog summary; and one classification
pass over the training split for the mislabel candidates, measured against the true labels
where the shards' source catalog records them (``data synth --label-noise``).

"Trained against" and "judged by" stay apart here as everywhere: ``validity_model`` is the
model's own verdict on its counterfactuals, ``validity_<judge>`` the verdict of a classifier
nothing in training optimised against.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..data.galaxy10 import TRUE_LABELS_KEY, open_catalog
from ..errors import DataError
from ..explain.passes import explanation_pass, valid_batches
from ..explain.run import DEFINITIONS
from ..fileio import file_sha256
from ..judges import DEFAULT_PANEL, judges_dir
from ..metrics import class_probabilities, mislabel_score, precision_at_k, roc_auc
from ..model.evaluation import FigurePool
from ..progress import Progress

NUM_OUTLIERS = 8
NUM_MISLABEL_CANDIDATES = 50
MISLABEL_SPLIT = "train"  # where wrong labels do harm: the model learns from them
CATALOG_FILE = "catalog.h5"
PRED_FILL = -32768  # the catalog's fill value of 'pred': a galaxy no part file provides


class Lowest:
    """The ``k`` galaxies with the lowest score, kept with their images while a split streams
    by, so no second pass over the data is needed. Ties go to the galaxy seen first; NaN
    scores are never kept."""

    def __init__(self, k):
        self.k = k
        self.kept = []  # (score, index, image [3, R, R] numpy), best first

    def add(self, start, score, images):
        """Galaxies ``start``.. with ``score`` [B] and ``images`` [B, 3, R, R]."""
        new = [(s, start + i, None) for i, s in enumerate(score.float().cpu().tolist()) if not math.isnan(s)]
        best = sorted(self.kept + new, key=lambda c: c[:2])[: self.k]
        self.kept = [(s, i, images[i - start].float().cpu().numpy() if img is None else img) for s, i, img in best]

    def indices(self):
        return [i for _, i, _ in self.kept]

    def images(self):
        return [img for _, _, img in self.kept]


class OutlierPool:
    """The ``k`` galaxies whose h is farthest from its nearest class mean ("far") and the
    ``k`` closest to a tie between the two nearest means ("between")."""

    def __init__(self, k=NUM_OUTLIERS):
        self.pools = {"far": Lowest(k), "between": Lowest(k)}

    def add(self, start, distance, images):
        """Galaxies ``start``.. with class-mean ``distance`` [B, C] and ``images`` [B, 3, R, R]."""
        d = distance.float().cpu().sort(1).values
        for kind, score in (("far", -d[:, 0]), ("between", d[:, 1] - d[:, 0])):
            self.pools[kind].add(start, score, images)

    def indices(self, kind):
        return self.pools[kind].indices()

    def images(self, kind):
        return self.pools[kind].images()


@dataclass
class Collected:
    """The pass over the split: the :class:`~galcf_hpc.model.evaluation.Accumulator`
    summary, per-galaxy arrays (numpy, N galaxies, T = every class as target), the galaxies
    of the Figure-3 grid and the outliers."""

    summary: dict
    arrays: dict
    pool: FigurePool
    outliers: OutlierPool
    rows: tuple | None = None  # the Figure-3 grids' rows (FigurePool.rows), decoded at the model's precision
    complete: bool = True  # every galaxy of the split (not cut at the report's limit)
    precision: str = "fp32"  # of the model in the pass (the judges classify in fp32)


@torch.no_grad()
def collect(model, judges, cfg, limit, device):
    """One :func:`~galcf_hpc.explain.passes.explanation_pass` over ``cfg.explain.split`` (at
    most ``limit`` galaxies), keeping every galaxy's row; ``judges`` {name: module} is the
    panel (never the model)."""
    split = cfg.explain.split
    outliers = OutlierPool()
    per_judge = [f"{kind}_{name}" for name in judges for kind in ("pred", "validity")]
    rows = {
        k: [] for k in ("labels", "pred", "h", "z1", "z2", "distance", "validity_model", "luminance_share", *per_judge)
    }
    keys = []

    def keep_rows(bkeys, images, labels, out):
        distance = torch.cdist(out.h, model.means.float())
        outliers.add(len(keys), distance, images)
        keys.extend(bkeys)
        z1, z2 = model.split(out.z)
        batch = {
            "labels": labels,
            "pred": out.pred,
            "h": out.h,
            "z1": z1,
            "z2": z2,
            "distance": distance,
            "validity_model": out.valid["model"],
            "luminance_share": out.change["luminance_share"],
        }
        for name in judges:
            batch[f"pred_{name}"] = out.judge_pred[name]
            batch[f"validity_{name}"] = out.valid[name]
        for k, v in batch.items():
            rows[k].append(v.cpu())

    done = explanation_pass(model, cfg, judges, device, split, limit, on_batch=keep_rows, label=f"report {split}")
    arrays = {k: torch.cat(v).numpy() for k, v in rows.items()}
    arrays["keys"] = np.array(keys)
    summary = done.accumulator.summary(CLASS_NAMES)
    return Collected(summary, arrays, done.pool, outliers, done.rows, done.complete, done.precision)


@dataclass
class Mislabels:
    """The classification pass over the training split: per-galaxy arrays (keys, labels,
    pred, prob [N, C], score) and the highest-scoring galaxies with their images."""

    arrays: dict
    top: Lowest


@torch.no_grad()
def mislabel_pass(model, cfg, device, k=NUM_MISLABEL_CANDIDATES, split=MISLABEL_SPLIT):
    """Every galaxy of ``split`` classified by the model alone (encoder, flow, class means:
    ``model.classify``, nothing decoded) and scored with
    :func:`galcf_hpc.metrics.mislabel_score`; keeps the images of the ``k`` highest positive
    scores."""
    top = Lowest(k)
    rows = {"labels": [], "pred": [], "prob": [], "score": []}
    keys = []
    bar = Progress(1, f"report {split} (mislabel candidates)")
    for bkeys, images, labels in valid_batches(cfg, split, progress=bar):
        images = images.to(device)
        c = model.classify(images)
        score = mislabel_score(torch.cdist(c.h, model.means.float()), labels.to(c.h.device))
        # candidates are galaxies the model disagrees with (score > 0), highest first
        top.add(len(keys), torch.where(score > 0, -score, torch.full_like(score, math.nan)), images)
        keys += bkeys
        batch = {"labels": labels, "pred": c.pred, "prob": class_probabilities(c.logits), "score": score}
        for name, v in batch.items():
            rows[name].append(v.cpu())
    if not keys:
        raise DataError(f"split {split!r} of {cfg.data.shards} holds no galaxies to look for mislabels in")
    arrays = {name: torch.cat(v).numpy() for name, v in rows.items()}
    arrays["keys"] = np.array(keys)
    return Mislabels(arrays, top)


def _source_rows(keys):
    """Row of each sample key in the shards' source catalog (``g<source index>``,
    :func:`galcf_hpc.data.shards.sample_key`), or None where a key has another form."""
    if not all(len(k) > 1 and k[0] == "g" and k[1:].isdigit() for k in keys):
        return None
    return np.array([int(k[1:]) for k in keys], dtype=np.int64)


def true_labels(cfg):
    """(true labels of the shards' source catalog by row, None; or None, why not).

    The shards record their source's file name, sha256 and number of galaxies
    (``splits.json``); the file is looked for at ``data.source`` and next to and inside
    ``data.shards``, and its true labels are used only if its sha256 is the recorded one.
    ``ans_true`` (written by ``data synth --label-noise``) holds the labels before the
    planted noise."""
    shards = Path(cfg.data.shards)
    summary = _read_json(shards / "splits.json")
    if cfg.data.loader == "synthetic" or not summary or "source" not in summary:
        return None, f"{shards} records no source catalog (no splits.json), so no true labels are known"
    source = summary["source"]
    candidates = list(dict.fromkeys([Path(cfg.data.source), shards.parent / source["file"], shards / source["file"]]))
    without = None
    for path in candidates:
        try:
            with open_catalog(path) as cat:
                n, truth = cat.n, cat.true_labels
        except DataError:  # not there, or not a catalog
            continue
        if n != source["num_galaxies"]:
            continue
        if truth is None:  # known without hashing it: a 2.5 GB Galaxy10 file takes a while
            without = without or path
        elif file_sha256(path) == source["sha256"]:
            return truth, None
    if without is not None:
        return None, (
            f"{without}, the shards' source, records no true labels (no '{TRUE_LABELS_KEY}'; it was not made "
            "with `galcf-hpc data synth --label-noise P`), so the ranking cannot be checked against them"
        )
    return None, (
        f"the shards' source {source['file']} (sha256 {source['sha256'][:12]}...) is at none of "
        f"{', '.join(str(p) for p in candidates)}; put it there (or set data.source) to check the ranking "
        "against its true labels"
    )


def mislabel_table(mislabels, truth, note, split=MISLABEL_SPLIT):
    """The report's mislabel candidates: the top galaxies of ``mislabels`` with their labels,
    classes, probabilities and scores, and, with ``truth`` (true labels by source row), how
    well the score finds the wrong labels: ROC AUC and the precision among the top k (k = the
    number of wrong labels), next to chance."""
    a = mislabels.arrays
    labels, pred, prob, score = a["labels"], a["pred"], a["prob"], a["score"]
    n = len(labels)
    rows = _source_rows(a["keys"].tolist())
    if truth is not None and rows is None:
        truth, note = None, "the sample keys are not g<source index>, so they cannot be matched to true labels"
    if truth is not None and rows.max() >= len(truth):
        truth, note = None, f"a sample key points past the {len(truth)} rows of the source catalog"
    true = truth[rows] if truth is not None else None

    def entry(rank, i):
        return {
            "rank": rank,
            "index": int(i),
            "key": str(a["keys"][i]),
            "label": CLASS_NAMES[int(labels[i])],
            "pred": CLASS_NAMES[int(pred[i])],
            "prob_label": float(prob[i, int(labels[i])]),
            "prob_pred": float(prob[i, int(pred[i])]),
            "score": float(score[i]),
            "true_label": CLASS_NAMES[int(true[i])] if true is not None else None,
            "label_wrong": bool(true[i] != labels[i]) if true is not None else None,
        }

    evaluation = None
    if true is not None:
        wrong = true != labels
        n_wrong = int(wrong.sum())
        evaluation = {
            "num_wrong": n_wrong,
            "chance": n_wrong / n,
            "roc_auc": roc_auc(score, wrong),
            "k": n_wrong,
            "precision_at_k": precision_at_k(score, wrong, n_wrong) if n_wrong else None,
            "accuracy_true": float((pred == true).mean()),
            "wrong_predicted_true": float((pred[wrong] == true[wrong]).mean()) if n_wrong else None,
        }
    return {
        "split": split,
        "num_galaxies": n,
        "accuracy_catalogue": float((pred == labels).mean()),
        "num_disagreeing": int((score > 0).sum()),
        "candidates": [entry(r + 1, i) for r, i in enumerate(mislabels.top.indices())],
        "evaluation": evaluation,
        "note": note,
    }


def silhouettes(arrays, do_tsne, seed=0):
    """Silhouette score by true class of z1, h and z2, in the original space and in a 2-D
    t-SNE embedding; returns (scores, embeddings)."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    labels = arrays["labels"]
    n, n_labels = len(labels), len(set(labels.tolist()))
    scores, emb = {}, {}
    ok = 2 <= n_labels <= n - 1
    for name in ("z1", "h", "z2"):
        x = arrays[name].astype(np.float64)
        entry = {"dim": int(x.shape[1]), "original": float(silhouette_score(x, labels)) if ok else None, "tsne": None}
        if do_tsne and n >= 10:
            perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
            e = TSNE(
                n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
            ).fit_transform(x)
            emb[name] = e
            entry["tsne"] = float(silhouette_score(e, labels)) if ok else None
            entry["tsne_perplexity"] = perplexity
        scores[name] = entry
    return scores, emb


def outlier_table(arrays, outliers, judge_names):
    """The outliers of :class:`OutlierPool` with their labels, the model's and each judge's
    class, and their distances."""
    d = arrays["distance"]
    order = np.argsort(d, axis=1)

    def entry(i):
        d1, d2 = float(d[i, order[i, 0]]), float(d[i, order[i, 1]])
        return {
            "index": i,
            "key": str(arrays["keys"][i]),
            "label": CLASS_NAMES[int(arrays["labels"][i])],
            "pred": CLASS_NAMES[int(arrays["pred"][i])],
            "judges": {n: CLASS_NAMES[int(arrays[f"pred_{n}"][i])] for n in judge_names},
            "nearest": CLASS_NAMES[int(order[i, 0])],
            "second": CLASS_NAMES[int(order[i, 1])],
            "min_distance": d1,
            "margin": d2 - d1,
        }

    return {
        "far": [entry(i) for i in outliers.indices("far")],
        "between": [entry(i) for i in outliers.indices("between")],
        "definitions": {
            "far": "largest distance of h to the nearest class mean (unlike every class)",
            "between": "smallest difference between the distances to the two nearest class means",
        },
    }


def training_records(run_dir):
    """(train records, eval records) of RUN/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], []
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        (evals if r.get("kind") == "eval" else train).append(r)
    return train, evals


def _read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def panel_info(run_dir, judges, note):
    """Who judges: the loaded judges, which of them see luminance only, which of the default
    panel are missing, and what each judge's own eval.json says about it."""
    trained = {}
    for name in judges:
        ev = _read_json(judges_dir(run_dir) / name / "eval.json") or {}
        trained[name] = {
            "model": ev.get("model"),
            "settings": ev.get("settings"),
            "eval": {k: ev.get(k) for k in ("split", "accuracy", "macro_f1", "num_galaxies")} if ev else None,
        }
    return {
        "names": list(judges),
        "luminance_only": [n for n, j in judges.items() if j.input == "luminance"],
        "missing": [s.name for s in DEFAULT_PANEL if s.name not in judges],
        "note": note,
        "path": str(judges_dir(run_dir)),
        "trained": trained,
    }


def _catalog_part_problems(f, folder):
    """Problems with the part files that the virtual datasets of an open catalog read from:
    missing (HDF5 then returns fill values, or, looking last in the current directory, the
    rows of another catalog that happens to be there), outside the catalog's folder,
    unreadable, or computed for another catalog (checkpoint or input recorded in the part
    differs from catalog.h5's). The catalog job's own ``catalog verify`` checks more; this is
    what the report needs before it reads through the virtual datasets."""
    import h5py

    problems = []
    if os.environ.get("HDF5_VDS_PREFIX"):
        problems.append(
            f"the environment variable HDF5_VDS_PREFIX is set ({os.environ['HDF5_VDS_PREFIX']!r}): HDF5 "
            "would look for part files there first; unset it"
        )
    names = set()
    for ds in f.values():
        if getattr(ds, "is_virtual", False):
            names.update(src.file_name for src in ds.virtual_sources() if src.file_name != ".")
    for name in sorted(names):
        path = Path(folder) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name} is outside the catalog's folder")
        elif not path.is_file():
            problems.append(f"{path} is missing")
        else:
            try:
                with h5py.File(path, "r") as part:
                    for key in ("checkpoint_sha256", "input_fingerprint"):
                        if key in part.attrs and key in f.attrs and part.attrs[key] != f.attrs[key]:
                            problems.append(
                                f"{path} belongs to another catalog: its {key} {part.attrs[key]!r} is not "
                                f"catalog.h5's {f.attrs[key]!r}"
                            )
            except OSError as exc:
                problems.append(f"{path} cannot be opened ({exc})")
    return problems


def _strings(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _catalog_means(validity, lum, sel=slice(None)):
    """Validity by the model and each judge, and the mean luminance share, of catalog columns."""
    counted = validity["model"][:, sel] >= 0
    out = {"n": int(counted.sum())}
    for name, v in validity.items():
        col = v[:, sel]
        out[f"validity_{name}"] = float((col == 1).sum() / (col >= 0).sum()) if (col >= 0).any() else None
    if lum is not None:
        shares = lum[:, sel][counted & np.isfinite(lum[:, sel])]
        out["luminance_share"] = float(shares.mean()) if shares.size else None
    return out


def catalog_summary(cat_dir):
    """Counts per predicted class, and validity by the model and by each judge the catalog
    job ran (and the luminance share, where recorded) per target, of DIR/catalog.h5. Refuses
    a catalog whose virtual datasets miss a part file, read one that is damaged or of another
    catalog, or hold galaxies without a prediction: its numbers would be computed over other
    galaxies than it says."""
    import h5py

    path = Path(cat_dir) / CATALOG_FILE
    if not path.is_file():
        raise DataError(
            f"--catalog {cat_dir}: no {CATALOG_FILE} there; run `galcf-hpc catalog run ... --out {cat_dir}`"
        )
    fix = (
        f"check it with `galcf-hpc catalog verify {cat_dir}` and rerun `galcf-hpc catalog run` with the "
        "same arguments to recompute the missing or bad parts"
    )
    try:
        with h5py.File(path, "r") as f:
            bad = _catalog_part_problems(f, path.parent)
            if bad:
                raise DataError(
                    f"--catalog {cat_dir}: {len(bad)} part file(s) of {path} are missing or unusable (first: "
                    f"{bad[0]}), so the summary would count the wrong galaxies; {fix}"
                )
            for key in ("num_galaxies", "target_names"):
                if key not in f.attrs:
                    raise DataError(f"--catalog {cat_dir}: {path} has no attribute '{key}'; {fix}")
            judge_names = _strings(f.attrs.get("judge_names", []))
            for key in ("pred", "label", "validity", *(f"validity_{j}" for j in judge_names)):
                if key not in f:
                    raise DataError(f"--catalog {cat_dir}: {path} has no dataset '{key}'; {fix}")
            n = int(f.attrs["num_galaxies"])
            pred = f["pred"][:].astype(np.int64)
            label = f["label"][:].astype(np.int64)
            validity = {"model": f["validity"][:], **{j: f[f"validity_{j}"][:] for j in judge_names}}
            lum = f["luminance_share"][:] if "luminance_share" in f else None
            targets = _strings(f.attrs["target_names"])
    except OSError as exc:  # catalog.h5 itself, or a part that broke while it was read
        raise DataError(f"--catalog {cat_dir}: {path} cannot be read ({exc}); {fix}") from None
    holes = np.flatnonzero(pred == PRED_FILL)
    if len(pred) != n or len(holes):
        raise DataError(
            f"--catalog {cat_dir}: {path} says it holds {n} galaxies but {len(pred) - len(holes)} "
            f"have a prediction{f' (first without: index {holes[0]})' if len(holes) else ''}; {fix}"
        )
    labelled = label >= 0
    return {
        "path": str(path),
        "num_galaxies": n,
        "judge_names": judge_names,
        "pred_counts": {CLASS_NAMES[c]: int((pred == c).sum()) for c in range(NUM_CLASSES)},
        "overall": _catalog_means(validity, lum),
        "per_target": {name: _catalog_means(validity, lum, slice(j, j + 1)) for j, name in enumerate(targets)},
        "accuracy": float((pred[labelled] == label[labelled]).mean()) if labelled.any() else None,
    }


REPORT_DEFINITIONS = {
    **DEFINITIONS,
    "classification": "the model and each judge on the real (not counterfactual) images of the split",
    "silhouette": "sklearn silhouette_score by true class (Euclidean), in the latent space itself and in its 2-D "
    "t-SNE embedding",
    "mislabel_score": "distance of h to the mean of the catalogue label's class minus the distance to the nearest "
    "class mean (0 where the model agrees with the label); the training split is ranked by it, highest first",
    "mislabel_roc_auc": "ROC AUC of the mislabel score for 'catalogue label differs from the true label' (chance "
    "0.5); precision_at_k: share of wrong labels among the k highest scores, k = number of wrong labels (chance: "
    "their share)",
}


def report_numbers(
    run_dir, ckpt, cfg, collected, panel, silhouette, outliers, training, catalog, max_galaxies, mislabels=None
):
    """The report's JSON-ready dict (``figures``, ``paths`` and ``seconds`` are filled in by
    the caller); ``mislabels``: :func:`mislabel_table`'s dict."""
    s = collected.summary
    sep = {k: silhouette[k]["original"] for k in silhouette}
    train_recs, eval_recs = training
    return {
        "version": __version__,
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "split": cfg.explain.split,
        "num_galaxies": s["num_galaxies"],
        "max_galaxies": max_galaxies,
        "margin": cfg.explain.margin,
        "placement": cfg.explain.placement,
        "precision": collected.precision,
        "classification": {
            "model": {
                k: s[k] for k in ("num_galaxies", "accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix")
            },
            "judges": s["judges"],
            "judges_on_reconstructions": s["judges_on_reconstructions"],
        },
        "judges": panel,
        "counterfactuals": {"overall": s["overall"], "per_target": s["per_target"]},
        "reconstruction": s["reconstruction"],
        "train_eval": _read_json(Path(run_dir) / "eval.json"),
        "silhouette": silhouette,
        "h_separates_better_than_z2": (sep["h"] > sep["z2"]) if None not in (sep["h"], sep["z2"]) else None,
        "outliers": outliers,
        "mislabels": mislabels,
        "training": {
            "final_eval": eval_recs[-1] if eval_recs else None,
            "num_train_records": len(train_recs),
            "num_eval_records": len(eval_recs),
        },
        "catalog": catalog,
        "definitions": REPORT_DEFINITIONS,
    }
