"""Report figures (matplotlib, Agg), each written atomically as PNG."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.classes import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from ..fileio import atomic_path  # noqa: E402

DPI = 90


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


def _colours():
    return plt.get_cmap("tab10")(np.arange(NUM_CLASSES))


def embedding_figure(path, emb, labels, scores):
    names = [n for n in ("z1", "h", "z2") if n in emb]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 5.6), squeeze=False)
    col = _colours()
    for ax, name in zip(axes[0], names):
        e = emb[name]
        for c in range(NUM_CLASSES):
            sel = labels == c
            if sel.any():
                ax.scatter(e[sel, 0], e[sel, 1], s=6, color=col[c], label=CLASS_NAMES[c], alpha=0.8, linewidths=0)
        s = scores[name]
        ax.set_title(f"{name} (dim {s['dim']}): silhouette {_fmt(s['original'])} / t-SNE {_fmt(s['tsne'])}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, lab, loc="lower center", ncol=5, fontsize=8, markerscale=3, frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.12, wspace=0.05)
    _save(fig, path)


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def confusion_figure(path, panels):
    """Row-normalised confusion matrices, one panel per classifier: {name: classification
    summary} (the model, then each judge)."""
    panels = list(panels.items())
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 5.8 * rows), squeeze=False)
    short = [n if len(n) <= 14 else n[:13] + "." for n in CLASS_NAMES]
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, c) in zip(axes.flat, panels):
        cm = np.asarray(c["confusion_matrix"], dtype=np.float64)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(NUM_CLASSES):
            for j in range(NUM_CLASSES):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "black",
                    )
        ax.set_xticks(range(NUM_CLASSES), short, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(NUM_CLASSES), short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: accuracy {_fmt(c['accuracy'])}, macro-F1 {_fmt(c['macro_f1'])}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def curves_figure(path, train, evals):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    skip = {"kind", "step", "epoch", "lr", "images_per_s", "elapsed_s", "grad_norm", "acc"}
    if train:
        steps = [r["step"] for r in train]
        for k in sorted({k for r in train for k in r} - skip):
            axes[0].plot(steps, [r.get(k, np.nan) for r in train], label=k, lw=1)
        axes[0].set_yscale("symlog", linthresh=0.1)
        axes[0].legend(fontsize=7, ncol=2)
        axes[1].plot(steps, [r.get("acc", np.nan) for r in train], label="train accuracy (batch)", lw=1, alpha=0.7)
    axes[0].set_title("loss terms (symlog)", fontsize=9)
    axes[0].set_xlabel("step")
    if evals:
        es = [r["step"] for r in evals]
        axes[1].plot(es, [r.get("accuracy", np.nan) for r in evals], "o-", label="eval accuracy")
        axes[1].plot(es, [r.get("macro_f1", np.nan) for r in evals], "s-", label="eval macro-F1", ms=3)
        axes[2].plot(es, [r.get("cf_validity", np.nan) for r in evals], "o-", label="cf validity (estimate)")
        axes[2].plot(es, [r.get("cf_ssim_rec", np.nan) for r in evals], "s-", label="SSIM(x_cf, x~)", ms=3)
    for ax, title in ((axes[1], "accuracy"), (axes[2], "counterfactuals (eval)")):
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def validity_figure(path, cf, judge_names, luminance_only=()):
    """Validity per target class: by the model (trained against) next to each judge (judged
    by), with the luminance share of the change on a second axis below."""
    names = list(cf["per_target"])
    series = [("model (trained against)", "validity_model")]
    series += [(f"{j} ({'luminance only' if j in luminance_only else 'colour'})", f"validity_{j}") for j in judge_names]
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, (ax, lum) = plt.subplots(2, 1, figsize=(11, 5.4), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for k, (label, key) in enumerate(series):
        values = [cf["per_target"][n][key] for n in names]
        ax.bar(
            x - 0.4 + width * (k + 0.5),
            [np.nan if v is None else v for v in values],
            width,
            label=label,
            hatch="//" if k == 0 else None,
            edgecolor="white" if k == 0 else None,
        )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validity")
    ax.set_title("counterfactual validity per target class: by the model and by each judge", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    shares = [cf["per_target"][n]["luminance_share"] for n in names]
    lum.bar(x, [np.nan if v is None else v for v in shares], 0.5, color="0.45")
    lum.set_ylim(0, 1.05)
    lum.set_ylabel("luminance share")
    lum.set_xticks(x, names, rotation=25, ha="right", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def galaxy_strip(path, images, captions):
    n = max(1, len(images))
    fig, axes = plt.subplots(1, n, figsize=(1.7 * n, 2.5), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, img, cap in zip(axes[0], images, captions):
        ax.imshow(np.clip(np.transpose(img, (1, 2, 0)), 0, 1))
        ax.set_title(cap, fontsize=6)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.72, bottom=0.02, wspace=0.08)
    _save(fig, path)


def thumbnail(path, image, size=96):
    """One galaxy ([3, R, R] in [0, 1]) as a PNG of about ``size`` px, enlarged by a whole
    factor without interpolation (the pixels the model saw)."""
    from PIL import Image

    rgb = np.round(np.clip(np.transpose(image, (1, 2, 0)), 0, 1) * 255).astype(np.uint8)
    factor = max(1, -(-size // rgb.shape[0]))
    with atomic_path(path) as tmp:
        Image.fromarray(np.kron(rgb, np.ones((factor, factor, 1), np.uint8))).save(tmp, format="PNG")
