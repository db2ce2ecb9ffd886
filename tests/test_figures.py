"""Counterfactual, luminance-change and colour-change grids: valid PNGs, predictable layout, right
cell content."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from galcf_hpc.explain.figures import (
    EMPTY_FACE,
    GRIDS,
    colour_grid,
    counterfactual_grid,
    grid_layout,
    saliency_grid,
    write_grids,
)

TOL = 2.5 / 255  # PNG quantisation


def _pixel(img, layout, i, j):
    x, y = layout.cell_center_px(i, j)
    return img[int(y), int(x), :3]


def _only(directory, name):
    assert sorted(p.name for p in directory.iterdir()) == [name]


def _constant_images(n, size=12):
    """Originals with distinct constant colours; overlays with others, out of range too."""
    rng = np.random.default_rng(0)
    orig_colors = rng.uniform(0.1, 0.9, (n, 3))
    over_colors = rng.uniform(-0.3, 1.3, (n, n, 3))  # exercises the [0, 1] clipping
    for i in range(n):
        over_colors[i, i] = (0.0, 1.0, 0.0)  # must never be shown: diagonal shows originals
    originals = np.broadcast_to(orig_colors[:, :, None, None], (n, 3, size, size)).copy()
    overlays = np.broadcast_to(over_colors[:, :, :, None, None], (n, n, 3, size, size)).copy()
    overlays[0, 0] = np.nan  # diagonal entries are ignored, even when not finite
    return originals, overlays, orig_colors, np.clip(over_colors, 0, 1)


@pytest.mark.parametrize("title", [None, "Counterfactuals"])
def test_counterfactual_grid_cells(tmp_path, title):
    n = 3
    originals, overlays, orig_colors, over_colors = _constant_images(n)
    path = tmp_path / "cf.png"
    counterfactual_grid(path, originals, overlays, ["Disturbed", "Round Smooth", "Barred Spiral"], title=title)
    _only(tmp_path, "cf.png")
    img = imread(path)
    layout = grid_layout(n, title=title)
    width, height = layout.size_px
    assert img.shape[:2] == (height, width)
    assert 300 <= width <= 1500 and 300 <= height <= 1500
    for i in range(n):
        for j in range(n):
            expected = orig_colors[i] if i == j else over_colors[i, j]
            np.testing.assert_allclose(_pixel(img, layout, i, j), expected, atol=TOL, err_msg=f"cell {i},{j}")


def test_counterfactual_grid_accepts_tensors_and_class_indices(tmp_path):
    n = 2
    originals, overlays, orig_colors, over_colors = _constant_images(n, size=20)
    path = tmp_path / "sub" / "grid.png"
    counterfactual_grid(path, torch.tensor(originals), torch.tensor(overlays), [4, 9])
    _only(path.parent, "grid.png")
    img = imread(path)
    layout = grid_layout(n)
    np.testing.assert_allclose(_pixel(img, layout, 1, 1), orig_colors[1], atol=TOL)
    np.testing.assert_allclose(_pixel(img, layout, 1, 0), over_colors[1, 0], atol=TOL)


def test_layout_grows_with_n():
    small, large = grid_layout(2), grid_layout(10)
    assert small.size_px[0] < large.size_px[0] and small.size_px[1] < large.size_px[1]
    assert grid_layout(3, title="t").size_px[1] > grid_layout(3).size_px[1]
    left, bottom, w, h = large.cell_rect(9, 9)
    assert 0 < left and left + w <= 1 and 0 < bottom and bottom + h <= 1


def test_counterfactual_grid_input_errors(tmp_path):
    originals, overlays, _, _ = _constant_images(3)
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="overlays"):
        counterfactual_grid(path, originals, overlays[:2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="class names"):
        counterfactual_grid(path, originals, overlays, ["a", "b"])
    with pytest.raises(ValueError, match="originals"):
        counterfactual_grid(path, originals[:, :1], overlays, ["a", "b", "c"])
    nan = overlays.copy()
    nan[0, 1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        counterfactual_grid(path, originals, nan, ["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []


def test_saliency_grid_colours(tmp_path):
    n = 3
    size = 10
    sal = np.zeros((n, n, 3, size, size), dtype=np.float32)
    sal[0, 1] = 0.4  # brighter in the counterfactual -> red
    sal[1, 0] = -0.4  # darker -> blue
    sal[2, 2] = 50.0  # diagonal: ignored, and must not set the colour range
    sal[1, 1] = np.nan
    path = tmp_path / "sal.png"
    saliency_grid(path, sal, ["Merging", "Cigar Shaped Smooth", "Edge-on with Bulge"])
    _only(tmp_path, "sal.png")
    img = imread(path)
    layout = grid_layout(n, colorbar=True)
    assert img.shape[:2] == layout.size_px[::-1]
    red = _pixel(img, layout, 0, 1)
    blue = _pixel(img, layout, 1, 0)
    zero = _pixel(img, layout, 2, 0)
    assert red[0] > 0.3 and red[2] < 0.2  # saturated end of RdBu_r: dark red
    assert blue[2] > 0.3 and blue[0] < 0.1  # dark blue
    assert np.all(zero > 0.9)  # centre of the diverging map: white
    grey = int(EMPTY_FACE[1:3], 16) / 255
    for i in range(n):
        np.testing.assert_allclose(_pixel(img, layout, i, i), [grey] * 3, atol=TOL)


def _recolour_and_brighten(n=3, size=10):
    """Cell (0, 1) only recolours (flux moved from band 2 to band 0, band mean unchanged);
    cell (1, 0) only brightens (the same change in every band); the rest is unchanged."""
    change = np.zeros((n, n, 3, size, size), dtype=np.float32)
    change[0, 1, 0], change[0, 1, 2] = 0.3, -0.3
    change[1, 0] = 0.3
    change[2, 2] = 50.0  # diagonal: ignored
    return change


def test_luminance_grid_does_not_see_a_pure_recolouring(tmp_path):
    change = _recolour_and_brighten()
    path = tmp_path / "lum.png"
    saliency_grid(path, change, ["Merging", "Round Smooth", "Cigar Shaped Smooth"])
    img, layout = imread(path), grid_layout(3, colorbar=True)
    assert np.all(_pixel(img, layout, 0, 1) > 0.9)  # recolouring: white, no luminance change
    brighter = _pixel(img, layout, 1, 0)
    assert brighter[0] > 0.3 and brighter[2] < 0.2  # brightening: red


def test_colour_grid_shows_what_the_luminance_grid_cannot(tmp_path):
    change = _recolour_and_brighten()
    path = tmp_path / "colour.png"
    colour_grid(path, torch.tensor(change), [0, 1, 2])
    _only(tmp_path, "colour.png")
    img = imread(path)
    layout = grid_layout(3, title="colour change")  # the grid's own explanation as its title
    assert img.shape[:2] == layout.size_px[::-1]
    np.testing.assert_allclose(_pixel(img, layout, 0, 1), [1.0, 0.5, 0.0], atol=TOL)  # band 0 up, band 2 down
    np.testing.assert_allclose(_pixel(img, layout, 1, 0), [0.5] * 3, atol=TOL)  # brightening: no colour change
    np.testing.assert_allclose(_pixel(img, layout, 2, 0), [0.5] * 3, atol=TOL)
    grey = int(EMPTY_FACE[1:3], 16) / 255
    np.testing.assert_allclose(_pixel(img, layout, 2, 2), [grey] * 3, atol=TOL)
    with pytest.raises(ValueError, match="change"):
        colour_grid(path, change.mean(axis=2), [0, 1, 2])


def test_write_grids_draws_all_three(tmp_path):
    """Without reconstructions: the overlay grid and the two grids of the change."""
    originals, overlays, _, _ = _constant_images(3)
    overlays[0, 0] = 0.0
    names = write_grids(tmp_path / "figs", originals, overlays, _recolour_and_brighten(), [0, 4, 9])
    assert names == {k: v for k, v in GRIDS.items() if k != "decoded_grid"}
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(names.values())
    for name in names.values():
        assert imread(tmp_path / "figs" / name).shape[0] > 300


def test_decoded_grid_shows_the_counterfactuals_the_judges_classify(tmp_path):
    """Given x~, the decoded grid shows x_cf = x~ + (x_cf - x~) off the diagonal and x~ on it
    (not the original, not the diagonal's change)."""
    originals, overlays, _, _ = _constant_images(3, size=10)
    change = _recolour_and_brighten()
    recon_colours = np.array([[0.5, 0.4, 0.6], [0.2, 0.3, 0.4], [0.6, 0.6, 0.2]])
    recon = np.broadcast_to(recon_colours[:, :, None, None], (3, 3, 10, 10)).copy()
    names = write_grids(tmp_path, originals, overlays, change, [0, 4, 9], recon=torch.tensor(recon))
    assert names == GRIDS
    img, layout = imread(tmp_path / GRIDS["decoded_grid"]), grid_layout(3)
    for i in range(3):
        np.testing.assert_allclose(_pixel(img, layout, i, i), recon_colours[i], atol=TOL)
    np.testing.assert_allclose(_pixel(img, layout, 0, 1), recon_colours[0] + [0.3, 0.0, -0.3], atol=TOL)
    np.testing.assert_allclose(_pixel(img, layout, 1, 0), recon_colours[1] + 0.3, atol=TOL)
    np.testing.assert_allclose(_pixel(img, layout, 2, 0), recon_colours[2], atol=TOL)
