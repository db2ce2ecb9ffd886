"""The paper's augmentation as pure tensor functions (shared by every loader back-end).

Training: rotate by an angle drawn uniformly from [-rotation_degrees, +rotation_degrees]
about the cutout's centre, take the central ``crop_fraction`` of the side (0.7 keeps the
corners that a rotation brings in from outside the cutout out of the crop: 0.7 < 1/sqrt(2))
and resize to ``image_size``; float32 CHW in [0, 1]. Rotation, crop and scale are one affine
map, so a training image is resampled once, at the model's input size (``warp_batch``): a
cutout larger than the crop's scale needs is first reduced as a whole with an antialiasing
(tent) filter to the side at which the crop is ``image_size`` pixels, then one bilinear
warp (rotation and crop, zeros outside) samples the output pixels. Its cost follows the
output, not the cutout: no full-size rotated intermediate.

Without augmentation only the central crop and the resize run (``crop_resize``), so another
back-end (DALI) can reproduce it exactly: crop side ``round(S * crop_fraction)``, anchor
``(S - side) // 2`` in both axes.

Angles are a hash of (seed, epoch, sample key), not draws from a stateful generator, so they
do not depend on batch composition, worker count or rank.
"""

import hashlib

import torch
import torch.nn.functional as F


def sample_angles(keys, seed, epoch, rotation_degrees):
    """Rotation angle in degrees for each sample key, uniform in [-deg, +deg]."""
    angles = []
    for key in keys:
        digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        angles.append((2 * u - 1) * rotation_degrees)
    return torch.tensor(angles, dtype=torch.float32)


def to_float_chw(images):
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""
    return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def crop_box(size, crop_fraction):
    """(anchor, side) of the central crop of a ``size`` x ``size`` image."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    side = max(1, int(round(size * crop_fraction)))
    return (size - side) // 2, side


def resize_weights(size, anchor, side, image_size, device=None):
    """[image_size, size] matrix resampling the pixel range [anchor, anchor + side) of an
    axis of length ``size`` to ``image_size`` pixels: a tent filter of radius max(1, scale)
    (bilinear, antialiased when shrinking), centred on each output pixel's position in the
    source, normalised to unit sum. Its taps may read pixels outside the box (the rest of the
    cutout), as the reference back-end's ``fn.resize`` with an absolute ROI does, so both
    back-ends agree to rounding; at the image border weights renormalise over what exists.
    """
    scale = side / image_size
    radius = max(1.0, scale)
    centres = anchor + (torch.arange(image_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5
    pixels = torch.arange(size, dtype=torch.float64, device=device)
    w = (1.0 - (pixels[None, :] - centres[:, None]).abs() / radius).clamp_(min=0.0)
    return (w / w.sum(1, keepdim=True)).to(torch.float32)


def crop_resize(images, crop_fraction, image_size):
    """Central square crop of float [B, C, S, S] images resized to ``image_size`` (see
    ``resize_weights``); one separable matrix product per axis."""
    size = images.shape[-1]
    anchor, side = crop_box(size, crop_fraction)
    w = resize_weights(size, anchor, side, image_size, images.device)
    return torch.einsum("rh,bchw,sw->bcrs", w, images, w)


def reduced_size(size, image_size, crop_fraction):
    """Side to which a ``size`` px cutout is reduced before the warp: the one at which the
    crop box spans ``image_size`` pixels, or ``size`` itself where the crop is enlarged
    (the bilinear warp then interpolates, as the resize would)."""
    _, side = crop_box(size, crop_fraction)
    return size if side <= image_size else max(1, int(round(size * image_size / side)))


def warp_matrices(angles_deg, size, image_size, crop_fraction):
    """[B, 2, 3] float64 maps from an output pixel's centre (x, y; pixel edges at integers,
    y down) to the point it samples in the reduced cutout (``reduced_size``), same
    convention. In the cutout's own coordinates output u samples ``c + M (a + u s - c)``:
    crop anchor ``a``, scale ``s = side / image_size``, centre ``c = size / 2`` and ``M``
    the counter-clockwise (as displayed) turn [[cos, -sin], [sin, cos]]; the reduction then
    scales by ``reduced / size``. The DALI back-end composes the same chain of transforms."""
    anchor, side = crop_box(size, crop_fraction)
    rho = reduced_size(size, image_size, crop_fraction) / size
    theta = torch.deg2rad(torch.as_tensor(angles_deg, dtype=torch.float64))
    cos, sin = torch.cos(theta), torch.sin(theta)
    turn = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    linear = turn * (rho * side / image_size)
    centre = size / 2.0
    offset = rho * (centre + turn @ torch.full((2,), anchor - centre, dtype=torch.float64))
    return torch.cat([linear, offset[..., None]], -1)


def _sampling_grid(theta, size):
    """``F.affine_grid(theta, [B, C, size, size], align_corners=False)``, written as two
    broadcast products: half the time of affine_grid's batched matrix product on a CPU."""
    v = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1
    grid = torch.empty(len(theta), size, size, 2, dtype=theta.dtype, device=theta.device)
    for k in range(2):
        a, b, c = (theta[:, k, j, None, None] for j in range(3))
        grid[..., k] = a * v + b * v[:, None] + c
    return grid


def warp_batch(images, image_size, crop_fraction, angles_deg):
    """uint8 [B, S, S, 3] -> float32 [B, 3, R, R] in [0, 1]: the training transform (module
    docstring) with one resampling at the output size. The reduction runs on the uint8
    cutout (antialiased bilinear, the same tent filter as ``resize_weights``), the warp on
    the reduced image with ``grid_sample`` (bilinear, zeros outside)."""
    size = images.shape[1]
    reduced = reduced_size(size, image_size, crop_fraction)
    x = images.permute(0, 3, 1, 2)  # NCHW view of the NHWC bytes (channels-last: the fast uint8 path)
    if reduced != size:
        x = F.interpolate(x, size=(reduced, reduced), mode="bilinear", antialias=True, align_corners=False)
    x = x.to(torch.float32).div_(255.0)
    m = warp_matrices(angles_deg, size, image_size, crop_fraction)
    # affine_grid works in [-1, 1] coordinates of output and input (align_corners=False):
    # u = (v + 1) R / 2 on the output side, n = 2 q / reduced - 1 on the input side
    linear = m[..., :2] * (image_size / reduced)
    offset = linear.sum(-1) + 2.0 * m[..., 2] / reduced - 1.0
    theta = torch.cat([linear, offset[..., None]], -1).to(torch.float32)
    out = F.grid_sample(
        x, _sampling_grid(theta, image_size), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.clamp_(0.0, 1.0).contiguous()


def augment_batch(images, image_size, crop_fraction, angles=None):
    """uint8 [B, S, S, 3] -> float32 [B, 3, R, R] in [0, 1].

    ``angles`` (degrees, [B]) rotates (``warp_batch``); None means no rotation: the
    deterministic evaluation transform (``crop_resize``).
    """
    if angles is not None:
        return warp_batch(images, image_size, crop_fraction, angles)
    x = crop_resize(to_float_chw(images), crop_fraction, image_size)
    return x.clamp_(0.0, 1.0).contiguous()
