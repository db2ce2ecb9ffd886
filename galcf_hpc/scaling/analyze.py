"""``galcf-hpc scaling analyze``: results.jsonl files -> DIR/scaling.md, DIR/scaling.csv and
PNG plots (images/s vs GPUs, efficiency vs GPUs, data-time share), grouped by (mode,
engine, loader).

Efficiency is relative to the smallest run of a group (N0 GPUs, normally 1):
weak ``X_N / ((N/N0) X_N0)`` (X = images/s), strong ``T_N0 N0 / (N T_N)`` with T the time per
global batch (= global batch / X). Several records with the same world size in a group (a
re-run) -> the newest is used and the others are counted in the table's note.
"""

import csv
import json
from pathlib import Path

from ..errors import DataError

REQUIRED = (
    "mode",
    "engine",
    "loader",
    "world_size",
    "nodes",
    "micro_batch",
    "global_batch",
    "images_per_s",
    "images_per_s_min",
    "images_per_s_max",
    "step_s",
    "data_s",
    "compute_s",
)


def load_results(paths):
    """Records of ``scaling run`` from JSON-lines files; blank lines are skipped, anything
    else that is not such a record is an error naming the file and line."""
    records = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"results file {path} not found (written by `galcf-hpc scaling run --out`)")
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{no}: not a JSON line ({exc.msg} at column {exc.colno}); a job killed "
                    "while writing leaves a partial line: delete it"
                ) from None
            if not isinstance(rec, dict) or rec.get("kind") != "scaling":
                raise DataError(f'{path}:{no}: not a `galcf-hpc scaling run` record (no "kind": "scaling")')
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                raise DataError(f"{path}:{no}: record lacks {', '.join(missing)}")
            if not rec["images_per_s"] > 0 or rec["world_size"] < 1:
                raise DataError(
                    f"{path}:{no}: images_per_s {rec['images_per_s']} / world_size {rec['world_size']} out of range"
                )
            rec["_source"] = f"{path}:{no}"
            records.append(rec)
    if not records:
        raise DataError(f"no records in {', '.join(map(str, paths))}")
    return records


def efficiency(mode, n, x, n0, x0, global_batch=None, global_batch0=None):
    """Weak: X_N / ((N/N0) X_N0). Strong: T_N0 N0 / (N T_N), T = global batch / X."""
    if mode == "weak":
        return x / (n / n0 * x0)
    t, t0 = global_batch / x, global_batch0 / x0
    return t0 * n0 / (n * t)


def table(records):
    """One row per (mode, engine, loader, world size), sorted; efficiency within the group."""
    groups, dropped = {}, 0
    for r in records:  # later lines win: files are appended to in time order
        key = (r["mode"], r["engine"], r["loader"])
        g = groups.setdefault(key, {})
        dropped += r["world_size"] in g
        g[r["world_size"]] = r
    rows = []
    for key in sorted(groups):
        g = groups[key]
        n0 = min(g)
        ref = g[n0]
        for n in sorted(g):
            r = g[n]
            if key[0] == "strong" and r["global_batch"] != ref["global_batch"]:
                raise DataError(
                    f"{r['_source']}: strong-scaling global batch {r['global_batch']} differs from "
                    f"{ref['global_batch']} of {ref['_source']}; analyze them separately"
                )
            share = r["data_s"] / (r["data_s"] + r["compute_s"]) if r["data_s"] + r["compute_s"] > 0 else 0.0
            rows.append(
                {
                    "mode": key[0],
                    "engine": key[1],
                    "loader": key[2],
                    "gpus": n,
                    "nodes": r["nodes"],
                    "micro_batch": r["micro_batch"],
                    "global_batch": r["global_batch"],
                    "images_per_s": r["images_per_s"],
                    "images_per_s_min": r["images_per_s_min"],
                    "images_per_s_max": r["images_per_s_max"],
                    "step_s": r["step_s"],
                    "data_s": r["data_s"],
                    "compute_s": r["compute_s"],
                    "data_share": share,
                    "allreduce_grad_s": r.get("allreduce_grad_s"),
                    "peak_memory_mb": (r.get("peak_memory_bytes") or 0) / 2**20,
                    "efficiency": efficiency(
                        key[0], n, r["images_per_s"], n0, ref["images_per_s"], r["global_batch"], ref["global_batch"]
                    ),
                    "devices": "; ".join(r.get("devices", [])),
                    "source": r["_source"],
                }
            )
    return rows, dropped


def analyze(paths, out):
    rows, dropped = table(load_results(paths))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "scaling.md", out / "scaling.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Scaling results",
        "",
        f"From {', '.join(map(str, paths))}. Efficiency relative to the smallest run of each group: weak "
        "X_N / ((N/N0) X_N0), strong T_N0 N0 / (N T_N) (T = time per global batch). images/s: median over "
        "repeats (min-max in brackets); data/compute: per step (median over repeats, mean over ranks).",
        "",
    ]
    if dropped:
        lines += [f"{dropped} older record(s) with a repeated world size were superseded by newer ones.", ""]
    lines += [
        "| mode | engine | loader | GPUs | nodes | micro-batch | global batch | images/s | step (ms) | data (ms) "
        "| compute (ms) | data share | grad all-reduce (ms) | peak memory (MB) | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ar = f"{r['allreduce_grad_s'] * 1e3:.2f}" if r["allreduce_grad_s"] is not None else "-"
        lines.append(
            f"| {r['mode']} | {r['engine']} | {r['loader']} | {r['gpus']} | {r['nodes']} | "
            f"{r['micro_batch']} | {r['global_batch']} | {r['images_per_s']:.1f} "
            f"({r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}) | {r['step_s'] * 1e3:.2f} | "
            f"{r['data_s'] * 1e3:.2f} | {r['compute_s'] * 1e3:.2f} | {r['data_share']:.1%} | {ar} | "
            f"{r['peak_memory_mb']:.0f} | {r['efficiency']:.3f} |"
        )
    md.write_text("\n".join(lines) + "\n")
    pngs = _plots(rows, out)
    return [md, csv_path, *pngs]


def _plots(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["engine"], r["loader"]), []).append(r)
    specs = [
        ("scaling_throughput.png", "images_per_s", "images/s", True),
        ("scaling_efficiency.png", "efficiency", "efficiency", False),
        ("scaling_data_share.png", "data_share", "data-time share of a step", False),
    ]
    paths = []
    for name, key, label, log in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (mode, engine, loader), rs in sorted(groups.items()):
            gpus = [r["gpus"] for r in rs]
            ax.plot(gpus, [r[key] for r in rs], marker="o", label=f"{mode} {engine}/{loader}")
            if key == "images_per_s" and mode == "weak":
                ax.plot(gpus, [rs[0]["images_per_s"] * g / gpus[0] for g in gpus], ls=":", color="grey")
        ax.set(xscale="log", xlabel="GPUs (ranks)", ylabel=label)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(1.05, max(r[key] for r in rows) * 1.05))
        ax.set_xticks(sorted({r["gpus"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths
