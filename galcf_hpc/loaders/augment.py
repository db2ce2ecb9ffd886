"""The paper's augmentation as pure tensor functions (shared by every loader back-end).

Training: rotate by an angle drawn uniformly from [-rotation_degrees, +rotation_degrees]
(bilinear, about the image centre, zeros outside), take the central ``crop_fraction`` of
the side (0.7 keeps the corners that a rotation brings in from outside the cutout out of
the crop: 0.7 < 1/sqrt(2)), resize to ``image_size`` with antialiasing, and return float32
CHW in [0, 1]. Without augmentation only the central crop and the resize run, so another
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


def rotate(images, angles_deg):
    """Rotate float [B, C, H, W] images about their centres, counter-clockwise as displayed
    (row 0 at the top) for positive angles; bilinear, zeros where the source is outside."""
    theta = torch.deg2rad(angles_deg.to(torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid maps each output position to the input position it samples; for a
    # counter-clockwise turn with y pointing down that is [[cos, -sin], [sin, cos]].
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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


def augment_batch(images, image_size, crop_fraction, angles=None):
    """uint8 [B, S, S, 3] -> float32 [B, 3, R, R] in [0, 1].

    ``angles`` (degrees, [B]) rotates before the crop; None means no rotation (the
    deterministic evaluation transform).
    """
    x = to_float_chw(images)
    if angles is not None:
        x = rotate(x, angles)
    x = crop_resize(x, crop_fraction, image_size)
    return x.clamp_(0.0, 1.0).contiguous()
