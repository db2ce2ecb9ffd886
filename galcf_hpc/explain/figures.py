"""Counterfactual figures (the paper's Figure 3 layout), rendered with matplotlib's Agg.

An n x n grid for n selected classes: row i holds one galaxy of class i, column j the
counterfactual towards class j. The diagonal cell (i, i) shows the original galaxy.

The grids of the same galaxies (:func:`write_grids`): the counterfactuals as the paper shows
them (x + (x_cf - x~)), the decoded counterfactuals x_cf that the judges classify, the
*luminance* change (band mean of x_cf - x~: structure such as a bar or an arm) and the
*colour* change (what is left of x_cf - x~: flux moved between bands). A counterfactual
that only recolours its galaxy is blank in the luminance grid; docs/method.md explains why
that is not a morphological explanation.

The layout is fixed (cell size, gaps and margins in inches at a fixed dpi, no "tight"
bounding box), so :func:`grid_layout` tells exactly where each cell lands in the PNG.
Figures are written atomically (a reader never sees a half-written file).
"""

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.classes import CLASS_NAMES
from ..fileio import atomic_path
from ..metrics import luminance_share

DPI = 100
CELL_IN = 1.0  # side of one image cell, inches
GAP_IN = 0.04  # gap between cells
LEFT_IN = 1.15  # row labels
TOP_IN = 0.75  # column labels
TITLE_IN = 0.35  # extra top margin when there is a title
RIGHT_IN = 0.1
BOTTOM_IN = 0.1
COLORBAR_IN = 0.7  # extra right margin for the saliency colour bar
LABEL_WRAP = 14  # characters per label line
DIAGONAL_EDGE = "#1f77b4"
EMPTY_FACE = "#d9d9d9"


@dataclass(frozen=True)
class GridLayout:
    """Figure size (inches), dpi and each cell's rectangle in figure fractions."""

    n: int
    width_in: float
    height_in: float
    dpi: int
    left_in: float
    top_in: float
    right_in: float

    @property
    def size_px(self):
        """(width, height) of the saved PNG in pixels."""
        return round(self.width_in * self.dpi), round(self.height_in * self.dpi)

    def cell_rect(self, i, j):
        """(left, bottom, width, height) of cell (row i, column j), figure fractions."""
        x0 = self.left_in + j * (CELL_IN + GAP_IN)
        y_top = self.top_in + i * (CELL_IN + GAP_IN)
        return (
            x0 / self.width_in,
            1.0 - (y_top + CELL_IN) / self.height_in,
            CELL_IN / self.width_in,
            CELL_IN / self.height_in,
        )

    def cell_center_px(self, i, j):
        """(x, y) pixel centre of cell (i, j) in the PNG, y counted from the top."""
        x_in = self.left_in + j * (CELL_IN + GAP_IN) + CELL_IN / 2
        y_in = self.top_in + i * (CELL_IN + GAP_IN) + CELL_IN / 2
        return x_in * self.dpi, y_in * self.dpi


def grid_layout(n, title=None, colorbar=False):
    """The fixed layout used by :func:`counterfactual_grid` (and, with a colour bar,
    :func:`saliency_grid`) for ``n`` classes."""
    if n < 1:
        raise ValueError(f"a grid needs at least one class, got n={n}")
    top = TOP_IN + (TITLE_IN if title else 0.0)
    right = RIGHT_IN + (COLORBAR_IN if colorbar else 0.0)
    grid = n * CELL_IN + (n - 1) * GAP_IN
    return GridLayout(
        n=n,
        width_in=LEFT_IN + grid + right,
        height_in=top + grid + BOTTOM_IN,
        dpi=DPI,
        left_in=LEFT_IN,
        top_in=top,
        right_in=right,
    )


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().to("cpu").float().numpy()
    return np.array(x, dtype=np.float32)  # a copy: callers may blank the diagonal


def _check_finite(name, x):
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")


def _labels(class_names, n):
    names = list(class_names)
    if len(names) != n:
        raise ValueError(f"got {len(names)} class names for a {n} x {n} grid")
    out = []
    for name in names:
        if isinstance(name, (int, np.integer)):
            if not 0 <= int(name) < len(CLASS_NAMES):
                raise ValueError(f"class index {name} out of range 0-{len(CLASS_NAMES) - 1}")
            name = CLASS_NAMES[int(name)]
        out.append(textwrap.fill(str(name), LABEL_WRAP))
    return out


def _new_figure(layout):
    # Object-oriented API with an explicit Agg canvas: no global backend switch, no pyplot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(layout.width_in, layout.height_in), dpi=layout.dpi)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    return fig


def _cell_axes(fig, layout, i, j, labels):
    ax = fig.add_axes(layout.cell_rect(i, j))
    ax.set_xticks([])
    ax.set_yticks([])
    if i == 0:
        ax.set_title(labels[j], fontsize=8, pad=3, va="bottom")
    if j == 0:
        ax.set_ylabel(labels[i], fontsize=8, rotation=0, ha="right", va="center", labelpad=4)
    if i == j:
        for spine in ax.spines.values():
            spine.set_edgecolor(DIAGONAL_EDGE)
            spine.set_linewidth(2.0)
    return ax


def _axis_captions(fig, layout, rows, cols):
    grid_top = 1.0 - (layout.top_in - 0.52) / layout.height_in
    grid_mid_x = (layout.left_in + (layout.n * CELL_IN + (layout.n - 1) * GAP_IN) / 2) / layout.width_in
    fig.text(grid_mid_x, grid_top, cols, ha="center", va="bottom", fontsize=9, style="italic")
    fig.text(
        0.05 / layout.width_in,
        1.0 - (layout.top_in - 0.1) / layout.height_in,
        rows,
        ha="left",
        va="bottom",
        fontsize=9,
        style="italic",
    )


def _save(fig, path):
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=fig.dpi, facecolor=fig.get_facecolor())


def _hwc(img):
    return np.transpose(img, (1, 2, 0))


def counterfactual_grid(path, originals, overlays, class_names, title=None):
    """Write the counterfactual grid (paper, Figure 3) to ``path`` (format from suffix).

    ``originals``: ``[n, 3, H, W]`` in [0, 1], galaxy i being of class i.
    ``overlays``: ``[n, n, 3, H, W]``, entry (i, j) = x_i + (x_cf - x~) towards class j;
    shown clipped to [0, 1]; diagonal entries are ignored (the original is shown there).
    ``class_names``: n names, or indices into the Galaxy10 class table.
    """
    originals = _to_numpy(originals)
    overlays = _to_numpy(overlays)
    if originals.ndim != 4 or originals.shape[1] != 3:
        raise ValueError(f"originals must be [n, 3, H, W], got {originals.shape}")
    n = originals.shape[0]
    if overlays.shape != (n, n) + originals.shape[1:]:
        raise ValueError(
            f"overlays must be [n, n, 3, H, W] = {(n, n) + originals.shape[1:]} to match originals, "
            f"got {overlays.shape}"
        )
    overlays[np.arange(n), np.arange(n)] = 0.0  # diagonal entries are ignored
    _check_finite("originals", originals)
    _check_finite("overlays", overlays)
    labels = _labels(class_names, n)
    layout = grid_layout(n, title=title)
    fig = _new_figure(layout)
    for i in range(n):
        for j in range(n):
            ax = _cell_axes(fig, layout, i, j, labels)
            img = originals[i] if i == j else overlays[i, j]
            ax.imshow(np.clip(_hwc(img), 0.0, 1.0), interpolation="antialiased")
    _axis_captions(fig, layout, "galaxy class", "counterfactual towards")
    if title:
        fig.suptitle(title, y=1.0 - 0.06 / layout.height_in, va="top", fontsize=11)
    _save(fig, path)


def _symmetric_range(values, n, vmax):
    """``vmax`` or the largest absolute off-diagonal value (never 0: the map needs a range)."""
    if vmax is None:
        vmax = float(np.abs(values[~np.eye(n, dtype=bool)]).max()) if n > 1 else 0.0
    vmax = float(vmax)
    return vmax if vmax > 0.0 else 1e-6


def _share_caption(ax, shares, i, j):
    if shares is not None and i != j and np.isfinite(shares[i, j]):
        ax.text(
            0.03,
            0.03,
            f"lum {shares[i, j]:.2f}",
            transform=ax.transAxes,
            fontsize=6,
            ha="left",
            va="bottom",
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
        )


def _change_input(name, change, bands_only=False):
    """[n, n, 3, H, W] (or [n, n, H, W] unless ``bands_only``) float copy, diagonal zeroed."""
    x = _to_numpy(change)
    ok = x.ndim == 5 and x.shape[2] == 3 or (x.ndim == 4 and not bands_only)
    if not ok or x.shape[0] != x.shape[1]:
        shapes = "[n, n, 3, H, W]" if bands_only else "[n, n, 3, H, W] or [n, n, H, W]"
        raise ValueError(f"{name} must be {shapes}, got {np.shape(change)}")
    n = x.shape[0]
    x[np.arange(n), np.arange(n)] = 0.0  # diagonal entries are ignored
    _check_finite(name, x)
    return x


def saliency_grid(path, saliency, class_names, vmax=None, shares=None):
    """Write the luminance-change grid (band mean of x_cf - x~) to ``path``.

    Same layout as :func:`counterfactual_grid`; ``saliency`` is ``[n, n, 3, H, W]`` (or an
    already averaged ``[n, n, H, W]``) with entry (i, j) towards class j; the diagonal is
    left empty. A diverging colour map with a range symmetric about zero, [-vmax, vmax]
    (default: the largest absolute off-diagonal value): red = brighter in the
    counterfactual, blue = darker. The band mean is the luminance part of the change, so a
    pure recolouring is white here (see :func:`colour_grid`). ``shares`` [n, n]: each
    cell's luminance share, printed in its corner.
    """
    sal = _change_input("saliency", saliency)
    if sal.ndim == 5:
        sal = sal.mean(axis=2)
    n = sal.shape[0]
    labels = _labels(class_names, n)
    vmax = _symmetric_range(sal, n, vmax)
    layout = grid_layout(n, colorbar=True)
    fig = _new_figure(layout)
    image = None
    for i in range(n):
        for j in range(n):
            ax = _cell_axes(fig, layout, i, j, labels)
            if i == j:
                ax.set_facecolor(EMPTY_FACE)
                continue
            image = ax.imshow(sal[i, j], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="antialiased")
            _share_caption(ax, shares, i, j)
    _axis_captions(fig, layout, "galaxy class", "counterfactual towards")
    if image is not None:
        grid_h = n * CELL_IN + (n - 1) * GAP_IN
        x0 = (layout.width_in - layout.right_in + 0.12) / layout.width_in
        cax = fig.add_axes((x0, BOTTOM_IN / layout.height_in, 0.12 / layout.width_in, grid_h / layout.height_in))
        bar = fig.colorbar(image, cax=cax)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("luminance change: band mean of x_cf - x~", fontsize=8)
    _save(fig, path)


def colour_grid(path, change, class_names, vmax=None, shares=None):
    """Write the colour-change grid to ``path``: x_cf - x~ ``[n, n, 3, H, W]`` minus its
    band mean (the part :func:`saliency_grid` cannot show: flux moved between bands at
    constant total), bands shown as R, G, B around neutral grey: ``0.5 + 0.5 * c / vmax``,
    with ``vmax`` the largest absolute off-diagonal value by default. Grey = no colour
    change. Same layout; the diagonal is left empty; ``shares`` as in :func:`saliency_grid`.
    """
    change = _change_input("change", change, bands_only=True)
    chroma = change - change.mean(axis=2, keepdims=True)
    n = chroma.shape[0]
    labels = _labels(class_names, n)
    vmax = _symmetric_range(chroma, n, vmax)
    title = f"colour change (grey: none, full scale \u00b1{vmax:.2g})"
    layout = grid_layout(n, title=title)
    fig = _new_figure(layout)
    for i in range(n):
        for j in range(n):
            ax = _cell_axes(fig, layout, i, j, labels)
            if i == j:
                ax.set_facecolor(EMPTY_FACE)
                continue
            ax.imshow(np.clip(0.5 + 0.5 * _hwc(chroma[i, j]) / vmax, 0.0, 1.0), interpolation="antialiased")
            _share_caption(ax, shares, i, j)
    _axis_captions(fig, layout, "galaxy class", "counterfactual towards")
    fig.suptitle(title, y=1.0 - 0.06 / layout.height_in, va="top", fontsize=9)
    _save(fig, path)


GRIDS = {
    "counterfactual_grid": "counterfactual_grid.png",
    "decoded_grid": "decoded_grid.png",
    "saliency_grid": "saliency_grid.png",
    "colour_grid": "colour_grid.png",
}


def write_grids(out_dir, originals, overlays, change, classes, recon=None):
    """The grids of the same galaxies into ``out_dir`` (names in :data:`GRIDS`):
    counterfactuals (``overlays`` x + (x_cf - x~)), luminance change and colour change of
    ``change`` = x_cf - x~ [n, n, 3, H, W], every cell captioned with its luminance share,
    and, given the reconstructions ``recon`` [n, 3, H, W], the decoded counterfactuals
    x_cf = x~ + change themselves (x~ on the diagonal): the images the judges classify.
    ``classes``: class indices of the rows; returns {figure: file name} of those written."""
    change = _change_input("change", change, bands_only=True)
    n = change.shape[0]
    shares = luminance_share(change.reshape(n * n, *change.shape[2:])).numpy().reshape(n, n)
    out_dir = Path(out_dir)
    written = ["counterfactual_grid", "saliency_grid", "colour_grid"]
    counterfactual_grid(out_dir / GRIDS["counterfactual_grid"], originals, overlays, classes)
    if recon is not None:
        recon = _to_numpy(recon)
        counterfactual_grid(out_dir / GRIDS["decoded_grid"], recon, recon[:, None] + change, classes)
        written.append("decoded_grid")
    saliency_grid(out_dir / GRIDS["saliency_grid"], change, classes, shares=shares)
    colour_grid(out_dir / GRIDS["colour_grid"], change, classes, shares=shares)
    return {k: v for k, v in GRIDS.items() if k in written}
