"""``galcf-hpc report``: collect a run's numbers (:mod:`.collect`: the explained split, and
the training split's mislabel candidates), draw the figures
(:mod:`.plots`, :mod:`galcf_hpc.explain.figures`), write report.json and galaxies.npz, and
render the page (:mod:`.render`). Everything lands next to the HTML file: RUN/report/ by
default, the folder of ``--out`` otherwise.
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..device import inference_autocast, resolve_device
from ..errors import DataError, UsageError
from ..explain.figures import write_grids
from ..explain.run import explanation_summary, load_run, write_explanation
from ..fileio import atomic_path, json_safe, write_json, write_text
from ..judges import load_judges
from . import collect, plots
from .render import render_html

log = logging.getLogger("galcf_hpc")

MIN_GALAXIES = 10  # the fewest galaxies a report is made of (silhouettes, t-SNE, outliers)


def _figures(fig_dir, grid_rows, collected, rep, embeddings, training, mislabels):
    """Every PNG of the page into ``fig_dir``; returns {figure: file name} (a list of names
    for the mislabel candidates' thumbnails, in rank order)."""
    figures = {}
    if grid_rows is not None:
        figures |= write_grids(fig_dir, *grid_rows)
    if embeddings:
        plots.embedding_figure(fig_dir / "tsne.png", embeddings, collected.arrays["labels"], rep["silhouette"])
        figures["tsne"] = "tsne.png"
    plots.confusion_figure(
        fig_dir / "confusion.png", {"model": rep["classification"]["model"], **rep["classification"]["judges"]}
    )
    figures["confusion"] = "confusion.png"
    if any(training):
        plots.curves_figure(fig_dir / "training_curves.png", *training)
        figures["training_curves"] = "training_curves.png"
    plots.validity_figure(
        fig_dir / "validity.png", rep["counterfactuals"], rep["judges"]["names"], rep["judges"]["luminance_only"]
    )
    figures["validity"] = "validity.png"
    for kind in ("far", "between"):
        plots.galaxy_strip(
            fig_dir / f"outliers_{kind}.png",
            collected.outliers.images(kind),
            [f"#{o['index']}\nlabel {o['label']}\npred {o['pred']}" for o in rep["outliers"][kind]],
        )
        figures[f"outliers_{kind}"] = f"outliers_{kind}.png"
    names = [f"mislabel/candidate-{r:03d}.png" for r in range(1, len(rep["mislabels"]["candidates"]) + 1)]
    (fig_dir / "mislabel").mkdir(exist_ok=True)
    for name, image in zip(names, mislabels.top.images()):
        plots.thumbnail(fig_dir / name, image)
    figures["mislabel_thumbnails"] = names
    return figures


def build_report(run_dir, catalog=None, out=None, max_galaxies=1000, device="auto", tsne=True, explain=False):
    """Write the report of ``run_dir`` (HTML, PNGs, report.json, galaxies.npz, all next to
    ``out``, default RUN/report/report.html); returns the report dict. ``explain``: also
    write what `galcf-hpc explain` writes (RUN/counterfactuals.json and the grids) from the
    same pass, which must then cover the galaxies explain covers (``max_galaxies`` equal to
    ``explain.max_galaxies``, or above the split's size when that is 0)."""
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"--run {run_dir}: no such run directory")
    if max_galaxies < MIN_GALAXIES:
        raise UsageError(f"--max-galaxies must be >= {MIN_GALAXIES}, got {max_galaxies}")
    out = Path(out) if out else run_dir / "report" / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: the report is an .html file")
    cat = collect.catalog_summary(catalog) if catalog else None  # a bad --catalog fails before the long part
    dev = resolve_device(device)
    model, cfg, ckpt = load_run(run_dir, device=dev)
    if cfg.train.threads > 0 and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    judges, note = load_judges(run_dir, dev)
    if note:
        log.warning("%s", note)

    # the Figure-3 galaxies are decoded once, for the report's grids and (explain) the run's
    collected = collect.collect(model, judges, cfg, max_galaxies, dev)
    rows = collected.rows
    with inference_autocast(dev, cfg.train):  # the model at the precision it trained at, as in the pass
        mislabels = collect.mislabel_pass(model, cfg, dev)
    if explain:
        # explain stops at explain.max_galaxies (0: never), in the same order of galaxies
        if not collected.complete and max_galaxies != cfg.explain.max_galaxies:
            raise UsageError(
                f"the report's pass stopped at {max_galaxies} galaxies of split {cfg.explain.split!r}, where "
                f"`galcf-hpc explain` stops at explain.max_galaxies ({cfg.explain.max_galaxies or 'the whole split'}): "
                "give max_galaxies equal to it (above the split's size for a whole split), or run `galcf-hpc explain`"
            )
        summary = explanation_summary(
            run_dir, ckpt, cfg.explain.split, cfg, collected.summary, judges, note, collected.precision
        )
        write_explanation(run_dir, summary, rows)
    scores, embeddings = collect.silhouettes(collected.arrays, tsne)
    training = collect.training_records(run_dir)
    rep = collect.report_numbers(
        run_dir,
        ckpt,
        cfg,
        collected,
        collect.panel_info(run_dir, judges, note),
        scores,
        collect.outlier_table(collected.arrays, collected.outliers, list(judges)),
        training,
        cat,
        max_galaxies,
        collect.mislabel_table(mislabels, *collect.true_labels(cfg)),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    rep["figures"] = _figures(out.parent, rows, collected, rep, embeddings, training, mislabels)
    rep["paths"] = {"html": str(out), "json": str(out.parent / "report.json"), "npz": str(out.parent / "galaxies.npz")}
    with atomic_path(rep["paths"]["npz"]) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: v for k, v in collected.arrays.items() if k not in ("z1", "z2")})
    rep["seconds"] = time.monotonic() - t0
    rep = json_safe(rep)  # report.json and the page show a class without galaxies alike
    write_json(rep["paths"]["json"], rep)
    write_text(out, render_html(rep))
    return rep
