"""Ablations of the training objective, judged by the independent panel.

Each variant is the base config plus ``--set``-style overrides. It is trained in this
process (single rank; skipped when its run directory already has an eval.json) and then
explained on the test split with every placement asked for. Validity comes from the model
itself and from every judge of ``--judges`` (a run directory whose judges/ was trained with
`galcf-hpc judges train` on the same shards; the judges never see the variants' training).
One JSON line per (variant, placement) goes to OUT/ablation.jsonl and a Markdown table to
OUT/ablation.md.

    python benchmarks/ablation.py --config configs/smoke.yaml --judges runs/smoke \\
        --out runs/ablation --variant paper="loss.cf_consistency=0" \\
        --variant adversary="loss.z2_adversary=1.0" --placements boundary,translate
"""

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from galcf_hpc.config import load_config
from galcf_hpc.data.classes import CLASS_NAMES
from galcf_hpc.explain.passes import explanation_pass
from galcf_hpc.explain.run import load_run
from galcf_hpc.judges import load_judges
from galcf_hpc.train.loop import train

SHAPE_TARGETS = ("Round Smooth", "Cigar Shaped Smooth", "Edge-on without Bulge", "Edge-on with Bulge")


def judge_run(run_dir, judges, placement, limit=0, figure=None):
    """The variant's test split explained at ``placement`` (the same pass as `galcf-hpc
    explain`, at the precision the variant trained at); its summary, and ``figure`` drawn."""
    model, cfg, _ = load_run(run_dir)
    cpu = torch.device("cpu")
    done = explanation_pass(model, cfg, judges, cpu, limit=limit, placement=placement, figures=bool(figure))
    if figure and done.rows:
        from galcf_hpc.explain.figures import counterfactual_grid

        x, overlays, _, classes, _ = done.rows
        counterfactual_grid(figure, x, overlays, [CLASS_NAMES[c] for c in classes], title=figure.stem)
    return done.accumulator.summary(CLASS_NAMES)


def row(name, placement, s, judges):
    o = s["overall"]
    shape = [s["per_target"][t]["luminance_share"] for t in SHAPE_TARGETS if s["per_target"][t]["luminance_share"]]
    return {
        "variant": name,
        "placement": placement,
        "accuracy": s["accuracy"],
        "validity_model": o["validity_model"],
        **{f"validity_{j}": o[f"validity_{j}"] for j in judges},
        "validity_panel": o.get("validity_panel"),
        "ssim_rec": o["ssim_rec"],
        # what the decoder can show at all: each judge's accuracy on the reconstructions x~
        **{f"recon_{j}": s["judges_on_reconstructions"][j]["accuracy"] for j in judges},
        "luminance_share": o["luminance_share"],
        "luminance_share_shape": sum(shape) / len(shape) if shape else None,
        "per_target": {
            t: {k: v[k] for k in ("validity_model", "validity_panel", "luminance_share") if k in v}
            for t, v in s["per_target"].items()
        },
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="base config")
    p.add_argument("--judges", required=True, help="run directory holding judges/ (trained on the same shards)")
    p.add_argument("--out", required=True, help="directory of the variants' runs and the results")
    p.add_argument("--variant", action="append", default=[], help="NAME=key=value;key=value (repeatable)")
    p.add_argument("--set", action="append", default=[], help="override applied to every variant")
    p.add_argument("--placements", default="boundary", help="comma-separated: boundary, translate or alpha in [0, 1]")
    p.add_argument("--limit", type=int, default=0, help="galaxies of the test split to explain (0 = all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judges, note = load_judges(args.judges)
    if note:
        logging.warning("%s", note)
    for spec in args.variant:
        name, _, sets = spec.partition("=")
        overrides = [*args.set, *[s for s in sets.split(";") if s], f"run.out_dir={out / name}"]
        cfg = load_config(args.config, overrides)
        t0 = time.monotonic()
        if not (out / name / "eval.json").is_file():
            train(cfg, resume=True)
        seconds = time.monotonic() - t0
        for name_of_placement in args.placements.split(","):
            # a number alpha: part-way from the boundary placement (0) to the translated one (1)
            numeric = name_of_placement.replace(".", "", 1).isdigit()
            placement = float(name_of_placement) if numeric else name_of_placement
            s = judge_run(out / name, judges, placement, args.limit, out / f"grid_{name}_{placement}.png")
            r = row(name, placement, s, judges) | {"overrides": overrides, "train_seconds": seconds}
            with open(out / "ablation.jsonl", "a") as fh:
                fh.write(json.dumps(r) + "\n")
            logging.info("%s", json.dumps({k: v for k, v in r.items() if k != "per_target"}))
    write_table(out, list(judges))


def write_table(out, judges):
    rows = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines() if line.strip()]
    head = [
        "variant",
        "placement",
        "accuracy",
        "validity (model)",
        *[f"validity ({j})" for j in judges],
        "panel",
        "SSIM(x_cf, x~)",
        *[f"{j} on x~" for j in judges],
        "luminance share",
        "luminance share (shape targets)",
    ]

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    str(r["placement"]),
                    f(r["accuracy"]),
                    f(r["validity_model"]),
                    *[f(r.get(f"validity_{j}")) for j in judges],
                    f(r["validity_panel"]),
                    f(r["ssim_rec"]),
                    *[f(r.get(f"recon_{j}")) for j in judges],
                    f(r["luminance_share"]),
                    f(r["luminance_share_shape"]),
                ]
            )
            + " |"
        )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
