"""Collect every number of a run's report (classification, counterfactual metrics with the
model's and an independent classifier's validity, latent-space separation, outliers,
catalog summary) and render report.html + PNGs + report.json.

One pass over the explained split (``explain.split``, at most ``max_galaxies`` galaxies in
loader order) computes everything; a second pass over the same galaxies only fetches the
images of the listed outliers.
"""

import html
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..baseline.classifier import load_baseline, predict
from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..errors import CheckpointError, GalcfError
from ..explain.figures import counterfactual_grid, saliency_grid
from ..explain.run import _figure_rows, _grow_pool, border_mask, iter_counterfactuals, load_run
from ..fileio import atomic_path, write_json
from ..loaders import build_loader
from ..progress import Progress
from ..train.evaluate import accuracy, confusion_matrix, macro_f1, per_class_accuracy
from ..train.loop import resolve_device
from . import plots

log = logging.getLogger("galcf_hpc")

NUM_OUTLIERS = 8
CF_KEYS = ("validity_model", "validity_independent", "msd_rec", "ssim_rec")


def _finite(x):
    """JSON-safe float (None for NaN/inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _classification(labels, pred):
    cm = confusion_matrix(torch.as_tensor(labels), torch.as_tensor(pred))
    return {"num_galaxies": int(cm.sum()), "accuracy": _finite(accuracy(cm)), "macro_f1": _finite(macro_f1(cm)),
            "per_class_accuracy": {n: _finite(a) for n, a in zip(CLASS_NAMES, per_class_accuracy(cm))},
            "confusion_matrix": cm.tolist()}


def _iterate(cfg, split, limit):
    """(index of first galaxy, keys, images, labels) batches of at most ``limit`` galaxies."""
    loader = build_loader(cfg, split, 0, 1, train=False)
    n = 0
    try:
        for batch in loader:
            keep = batch["valid"]
            images, labels = batch["images"][keep], batch["labels"][keep]
            keys = [k for k, v in zip(batch["keys"], keep.tolist()) if v]
            take = min(len(labels), limit - n)
            if take <= 0:
                break
            yield n, keys[:take], images[:take], labels[:take]
            n += take
    finally:
        loader.close()


@torch.no_grad()
def collect(model, baseline, cfg, split, limit, device):
    """Per-galaxy arrays (numpy) and per-target counterfactual sums over ``split``."""
    margin = cfg.explain.margin
    border = border_mask(cfg.data.image_size, cfg.explain.background_fraction, device)
    rec = {k: [] for k in ("labels", "pred", "baseline_pred", "z1", "h", "z2", "distance")}
    keys = []
    valid_model, valid_indep = [], []
    sums = {t: {k: 0.0 for k in CF_KEYS} | {"n": 0} for t in range(NUM_CLASSES)}
    pool = {}
    bar = Progress(max(1, math.ceil(limit / cfg.explain.batch_size)), f"report {split}")
    for b, (start, bkeys, images, labels) in enumerate(_iterate(cfg, split, limit)):
        images, labels = images.to(device), labels.to(device)
        pred, _, h, z = model.classify(images)
        z1, z2 = model.split(z)
        recon = model.decoder(z)
        keys += bkeys
        rec["labels"].append(labels.cpu())
        rec["pred"].append(pred.cpu())
        rec["baseline_pred"].append(predict(baseline, images).cpu() if baseline is not None
                                    else torch.full_like(pred.cpu(), -1))
        rec["z1"].append(z1.float().cpu())
        rec["h"].append(h.float().cpu())
        rec["z2"].append(z2.float().cpu())
        rec["distance"].append(torch.cdist(h.float(), model.means.float()).cpu())
        vm = torch.full((len(labels), NUM_CLASSES), -1, dtype=torch.int8)
        vi = vm.clone()
        for t, sel, x_cf, m in iter_counterfactuals(model, images, recon, z, h, pred, range(NUM_CLASSES), margin,
                                                    border):
            s = sums[t]
            s["n"] += int(sel.sum())
            s["validity_model"] += float(m["validity"].sum())
            s["msd_rec"] += float(m["msd_rec"].double().sum())
            s["ssim_rec"] += float(m["ssim_rec"].double().sum())
            vm[sel.cpu(), t] = m["validity"].to(torch.int8).cpu()
            if baseline is not None:
                ok = predict(baseline, x_cf) == t
                s["validity_independent"] += float(ok.sum())
                vi[sel.cpu(), t] = ok.to(torch.int8).cpu()
        valid_model.append(vm)
        valid_indep.append(vi)
        pool = _grow_pool(pool, images, labels, pred, z, h)
        bar(b + 1)
    if not keys:
        raise GalcfError(f"split {split!r} of {cfg.data.shards} holds no galaxies to report on")
    arrays = {k: torch.cat(v).numpy() for k, v in rec.items()}
    arrays["validity_model"] = torch.cat(valid_model).numpy()
    arrays["validity_independent"] = torch.cat(valid_indep).numpy()
    arrays["keys"] = np.array(keys)
    return arrays, sums, pool


def _cf_table(sums, have_baseline):
    def means(s):
        n = s["n"]
        out = {"n": n}
        for k in CF_KEYS:
            out[k] = _finite(s[k] / n) if n else None
        if not have_baseline:
            out["validity_independent"] = None
        return out

    total = {k: sum(s[k] for s in sums.values()) for k in CF_KEYS} | {"n": sum(s["n"] for s in sums.values())}
    return {"overall": means(total), "per_target": {CLASS_NAMES[t]: means(s) for t, s in sums.items()}}


def _silhouettes(arrays, labels, do_tsne, seed=0):
    """Silhouette score by true class of z1, h and z2, in the original space and in a 2-D
    t-SNE embedding; returns (scores, embeddings)."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    n, n_labels = len(labels), len(set(labels.tolist()))
    scores, emb = {}, {}
    ok = 2 <= n_labels <= n - 1
    for name in ("z1", "h", "z2"):
        x = arrays[name].astype(np.float64)
        entry = {"dim": int(x.shape[1]), "original": _finite(silhouette_score(x, labels)) if ok else None,
                 "tsne": None}
        if do_tsne and n >= 10:
            perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
            e = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                     random_state=seed).fit_transform(x)
            emb[name] = e
            entry["tsne"] = _finite(silhouette_score(e, labels)) if ok else None
            entry["tsne_perplexity"] = perplexity
        scores[name] = entry
    return scores, emb


def _outliers(arrays, k=NUM_OUTLIERS):
    """Galaxies whose h is far from every class mean, and those between two means."""
    d = arrays["distance"]
    order = np.argsort(d, axis=1)
    rows = np.arange(len(d))
    d1, d2 = d[rows, order[:, 0]], d[rows, order[:, 1]]
    margin = d2 - d1

    def entry(i):
        return {"index": int(i), "key": str(arrays["keys"][i]), "label": CLASS_NAMES[int(arrays["labels"][i])],
                "pred": CLASS_NAMES[int(arrays["pred"][i])],
                "baseline_pred": CLASS_NAMES[int(arrays["baseline_pred"][i])] if arrays["baseline_pred"][i] >= 0
                else None,
                "nearest": CLASS_NAMES[int(order[i, 0])], "second": CLASS_NAMES[int(order[i, 1])],
                "min_distance": float(d1[i]), "margin": float(margin[i])}

    far = np.argsort(-d1, kind="stable")[:k]
    between = np.argsort(margin, kind="stable")[:k]
    return {"far": [entry(i) for i in far], "between": [entry(i) for i in between],
            "definitions": {"far": "largest distance of h to the nearest class mean (unlike every class)",
                            "between": "smallest difference between the distances to the two nearest class means"}}


def _fetch_images(cfg, split, limit, indices):
    want, got = set(indices), {}
    for start, _, images, _ in _iterate(cfg, split, limit):
        for i in range(len(images)):
            if start + i in want:
                got[start + i] = images[i].numpy()
        if len(got) == len(want):
            break
    return got


def _training_summary(run_dir):
    path = run_dir / "metrics.jsonl"
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


def catalog_summary(cat_dir):
    """Counts per predicted class and validity per target of DIR/catalog.h5."""
    import h5py

    path = Path(cat_dir) / "catalog.h5"
    if not path.is_file():
        raise GalcfError(f"--catalog {cat_dir}: no catalog.h5 there; run `galcf-hpc catalog run ... --out {cat_dir}`")
    with h5py.File(path, "r") as f:
        pred = f["pred"][:].astype(np.int64)
        label = f["label"][:].astype(np.int64)
        validity = f["validity"][:]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["target_names"]]
        n = int(f.attrs["num_galaxies"])
    counts = {CLASS_NAMES[c]: int((pred == c).sum()) for c in range(NUM_CLASSES)}
    per_target = {}
    for j, name in enumerate(names):
        col = validity[:, j]
        m = int((col >= 0).sum())
        per_target[name] = {"n": m, "validity": _finite((col == 1).sum() / m) if m else None}
    counted = validity >= 0
    labelled = label >= 0
    return {"path": str(path), "num_galaxies": n, "pred_counts": counts, "per_target": per_target,
            "overall_validity": _finite((validity == 1).sum() / counted.sum()) if counted.any() else None,
            "accuracy": _finite((pred[labelled] == label[labelled]).mean()) if labelled.any() else None}


def build_report(run_dir, catalog=None, out=None, max_galaxies=1000, device="auto", tsne=True):
    """Write the report of ``run_dir``; returns the report dict (also in RUN/report/report.json)."""
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GalcfError(f"--run {run_dir}: no such run directory")
    if max_galaxies < 10:
        raise GalcfError(f"--max-galaxies must be >= 10, got {max_galaxies}")
    out = Path(out) if out else run_dir / "report" / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise GalcfError(f"--out {out}: the report is an .html file")
    fig_dir = out.parent
    fig_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report").mkdir(exist_ok=True)
    cat = catalog_summary(catalog) if catalog else None  # bad --catalog fails before the long part
    dev = resolve_device(device)
    model, cfg, ckpt = load_run(run_dir, device=dev)
    if cfg.train.threads > 0 and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    split = cfg.explain.split

    base_path = run_dir / "baseline" / "model.pt"
    baseline, base_eval, base_note = None, None, None
    try:
        baseline, bstate = load_baseline(base_path, dev)
        if (run_dir / "baseline" / "eval.json").is_file():
            base_eval = json.loads((run_dir / "baseline" / "eval.json").read_text())
    except CheckpointError as exc:
        base_note = (f"{exc}. Independent validity and the baseline's accuracy are missing from this report; "
                     f"train the baseline with `galcf-hpc baseline train --config {run_dir / 'config.yaml'}` and "
                     f"rerun `galcf-hpc report --run {run_dir}`.")
        log.warning("%s", base_note)

    arrays, sums, pool = collect(model, baseline, cfg, split, max_galaxies, dev)
    labels = arrays["labels"]
    n = len(labels)
    classification = {"model": _classification(labels, arrays["pred"]),
                      "baseline": _classification(labels, arrays["baseline_pred"]) if baseline is not None else None}
    cf = _cf_table(sums, baseline is not None)
    scores, emb = _silhouettes(arrays, labels, tsne)
    outl = _outliers(arrays)
    train_recs, eval_recs = _training_summary(run_dir)

    figures = {}
    if pool:
        x, overlays, sal, classes = _figure_rows(model, pool, cfg.explain.margin)
        names = [CLASS_NAMES[c] for c in classes]
        counterfactual_grid(fig_dir / "counterfactual_grid.png", x.cpu(), overlays.cpu(), names)
        saliency_grid(fig_dir / "saliency_grid.png", sal.cpu(), names)
        figures["counterfactual_grid"] = "counterfactual_grid.png"
        figures["saliency_grid"] = "saliency_grid.png"
    if emb:
        plots.embedding_figure(fig_dir / "tsne.png", emb, labels, scores)
        figures["tsne"] = "tsne.png"
    plots.confusion_figure(fig_dir / "confusion.png", classification)
    figures["confusion"] = "confusion.png"
    if train_recs or eval_recs:
        plots.curves_figure(fig_dir / "training_curves.png", train_recs, eval_recs)
        figures["training_curves"] = "training_curves.png"
    plots.validity_figure(fig_dir / "validity.png", cf)
    figures["validity"] = "validity.png"
    idx = sorted({o["index"] for kind in ("far", "between") for o in outl[kind]})
    images = _fetch_images(cfg, split, max_galaxies, idx)
    for kind in ("far", "between"):
        plots.galaxy_strip(fig_dir / f"outliers_{kind}.png", [images[o["index"]] for o in outl[kind]],
                           [f"#{o['index']}\nlabel {o['label']}\npred {o['pred']}" for o in outl[kind]])
        figures[f"outliers_{kind}"] = f"outliers_{kind}.png"

    np.savez_compressed(run_dir / "report" / "galaxies.npz", **{k: v for k, v in arrays.items()
                                                                 if k not in ("z1", "z2")})
    sep = {k: scores[k]["original"] for k in scores}
    report = {
        "version": __version__, "run": str(run_dir), "checkpoint": str(ckpt), "split": split,
        "num_galaxies": n, "max_galaxies": max_galaxies, "margin": cfg.explain.margin,
        "classification": classification,
        "train_eval": json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None,
        "baseline": {"available": baseline is not None, "note": base_note, "path": str(base_path),
                     "settings": base_eval.get("settings") if base_eval else None,
                     "eval": {k: base_eval.get(k) for k in ("split", "accuracy", "macro_f1", "num_galaxies")}
                     if base_eval else None},
        "counterfactuals": cf,
        "silhouette": scores,
        "h_separates_better_than_z2": (sep["h"] > sep["z2"]) if None not in (sep["h"], sep["z2"]) else None,
        "outliers": outl,
        "training": {"final_eval": eval_recs[-1] if eval_recs else None, "num_train_records": len(train_recs),
                     "num_eval_records": len(eval_recs)},
        "catalog": cat,
        "figures": figures,
        "html": str(out),
        "definitions": {
            "validity_model": "re-encoded counterfactual x_cf classified as the target by the model",
            "validity_independent": "the independent baseline CNN classifies x_cf as the target",
            "msd_rec/ssim_rec": "x_cf vs the reconstruction x~",
            "silhouette": "sklearn silhouette_score by true class (Euclidean), in the latent space itself "
                          "and in its 2-D t-SNE embedding",
        },
        "seconds": None,
    }
    report["seconds"] = time.monotonic() - t0
    write_json(run_dir / "report" / "report.json", report)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(render_html(report), encoding="utf-8")
    return report


# ---------------------------------------------------------------- HTML ---------------------------

CSS = """body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd}
.note{background:#fff4d6;border:1px solid #e0c060;padding:.5em}.small{color:#666;font-size:.85em}"""


def _f(x, digits=3):
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"
    return html.escape(str(x))


def _table(head, rows, left=1):
    out = ["<table><tr>" + "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else f"<th>{html.escape(h)}</th>"
                                   for i, h in enumerate(head)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _img(rep, name, alt):
    src = rep["figures"].get(name)
    if not src:
        return ""
    return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'


def render_html(rep):
    e = html.escape
    m, b = rep["classification"]["model"], rep["classification"]["baseline"]
    cf = rep["counterfactuals"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>galcf-hpc report: {e(rep['run'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>galcf-hpc report</h1><p class='small'>run <code>{e(rep['run'])}</code>, checkpoint "
             f"<code>{e(rep['checkpoint'])}</code>, split <b>{e(rep['split'])}</b> ({rep['num_galaxies']} galaxies), "
             f"margin {rep['margin']}, galcf-hpc {e(rep['version'])}</p>"]
    if rep["baseline"]["note"]:
        parts.append(f"<p class='note'>{e(rep['baseline']['note'])}</p>")
    o = cf["overall"]
    parts.append("<h2>Summary</h2>" + _table(
        ["", "model", "independent baseline CNN"],
        [["accuracy", _f(m["accuracy"]), _f(b["accuracy"]) if b else "&ndash;"],
         ["macro-F1", _f(m["macro_f1"]), _f(b["macro_f1"]) if b else "&ndash;"],
         ["counterfactual validity", _f(o["validity_model"]), _f(o["validity_independent"])],
         ["SSIM(x_cf, x~)", _f(o["ssim_rec"]), ""], ["MSD(x_cf, x~)", _f(o["msd_rec"], 5), ""]]))
    parts.append("<p class='small'>Validity by the model: the re-encoded counterfactual is assigned the target. "
                 "Independent validity: a separately trained plain CNN (no shared code or weights) classifies the "
                 "counterfactual as the target.</p>")

    parts.append("<h2>Counterfactuals (Figure 3)</h2><p>Row: a galaxy of that class (diagonal: the original); "
                 "column: its counterfactual towards that class, shown as x + (x_cf &minus; x~).</p>"
                 + _img(rep, "counterfactual_grid", "counterfactual grid")
                 + "<p>Saliency x_cf &minus; x~ (red: brighter in the counterfactual).</p>"
                 + _img(rep, "saliency_grid", "saliency grid"))

    rows = [[e(name), str(v["n"]), _f(v["validity_model"]), _f(v["validity_independent"]), _f(v["ssim_rec"]),
             _f(v["msd_rec"], 5)] for name, v in cf["per_target"].items()]
    rows.append(["<b>overall</b>", str(o["n"]), _f(o["validity_model"]), _f(o["validity_independent"]),
                 _f(o["ssim_rec"]), _f(o["msd_rec"], 5)])
    parts.append("<h2>Counterfactual metrics per target class</h2>"
                 + _table(["target", "n", "validity (model)", "validity (independent)", "SSIM(x_cf, x~)",
                           "MSD(x_cf, x~)"], rows) + _img(rep, "validity", "validity per target"))

    parts.append("<h2>Classification</h2>")
    rows = [[e(name), _f(acc), _f(b["per_class_accuracy"][name]) if b else "&ndash;"]
            for name, acc in m["per_class_accuracy"].items()]
    parts.append(_table(["class", "model accuracy", "baseline accuracy"], rows)
                 + f"<p>macro-F1: model {_f(m['macro_f1'])}, baseline {_f(b['macro_f1']) if b else '&ndash;'}</p>"
                 + _img(rep, "confusion", "confusion matrices"))
    bs = rep["baseline"]
    if bs["settings"]:
        parts.append(f"<p class='small'>Baseline: {e(json.dumps(bs['settings']))}; its own eval.json: "
                     f"{e(json.dumps(bs['eval']))}</p>")

    s = rep["silhouette"]
    rows = [[name, str(v["dim"]), _f(v["original"]), _f(v["tsne"])] for name, v in s.items()]
    verdict = {True: "h separates the classes better than z2, as the paper expects.",
               False: "h does <b>not</b> separate the classes better than z2 here (the paper expects it to).",
               None: "(not enough classes to compare)"}[rep["h_separates_better_than_z2"]]
    parts.append("<h2>Latent spaces (Figure 4)</h2>"
                 "<p>Silhouette score by true class (higher: classes better separated).</p>"
                 + _table(["latent", "dim", "silhouette (original space)", "silhouette (2-D t-SNE)"], rows)
                 + f"<p>{verdict}</p>" + _img(rep, "tsne", "t-SNE of z1, h and z2"))

    parts.append("<h2>Training</h2>" + _img(rep, "training_curves", "training curves"))
    fe = rep["training"]["final_eval"]
    if fe:
        parts.append(f"<p>Last evaluation (epoch {fe.get('epoch', -1) + 1}, {e(str(fe.get('split')))}): accuracy "
                     f"{_f(fe.get('accuracy'))}, macro-F1 {_f(fe.get('macro_f1'))}, counterfactual validity estimate "
                     f"{_f(fe.get('cf_validity'))}</p>")

    parts.append("<h2>Possible mislabels and ambiguous galaxies</h2>")
    for kind, title in (("far", "h far from every class mean"), ("between", "h between two class means")):
        rows = [[str(r["index"]), e(r["key"]), e(r["label"]), e(r["pred"]), e(r["baseline_pred"] or "–"),
                 e(r["nearest"]), e(r["second"]), _f(r["min_distance"]), _f(r["margin"])]
                for r in rep["outliers"][kind]]
        parts.append(f"<h3>{title}</h3><p class='small'>{e(rep['outliers']['definitions'][kind])}</p>"
                     + _img(rep, f"outliers_{kind}", title)
                     + _table(["#", "key", "label", "model", "baseline", "nearest mean", "second", "min distance",
                               "margin"], rows, left=7))

    c = rep["catalog"]
    if c:
        rows = [[e(name), str(v)] for name, v in c["pred_counts"].items()]
        vrows = [[e(name), str(v["n"]), _f(v["validity"])] for name, v in c["per_target"].items()]
        parts.append(f"<h2>Catalog</h2><p><code>{e(c['path'])}</code>: {c['num_galaxies']} galaxies, overall "
                     f"validity {_f(c['overall_validity'])}, accuracy (labelled) {_f(c['accuracy'])}</p>"
                     + _table(["predicted class", "galaxies"], rows) + _table(["target", "n", "validity"], vrows))
    parts.append(f"<p class='small'>All numbers: report.json. Generated in {rep['seconds']:.0f} s.</p></body></html>")
    return "\n".join(parts)

