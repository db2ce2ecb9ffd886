"""A second galaxy renderer: analytic surface-brightness models in plain numpy.

It exists to test classifiers on galaxies they have never seen, drawn by code that shares
nothing with the GalSim generator (:mod:`galcf_hpc.data.synth`): no GalSim, no import from
it, and different modelling choices throughout. A classifier that learned morphology
should recognise these galaxies; one that learned the other generator's pixels will not.

Models (sizes in arcsec, position angles uniform, centres offset by ~1"):

* Round / In-between Round / Cigar Shaped Smooth: one Sersic ellipsoid each, n 2.5-5 /
  1.5-4 / 0.8-2.5, axis ratio 0.85-1 / 0.5-0.8 / 0.2-0.45, red;
* spirals: Sersic bulge + exponential disc (inclined, apparent axis ratio >= 0.45); the
  arms are a multiplicative m = 2 (sometimes 3) logarithmic-spiral modulation of the disc
  light, evaluated in the disc plane, with pitch 10-15 deg (tight), 25-35 deg (loose, plus
  blue knots along the arms) or 15-25 deg (barred); the arm part of the disc light is bluer
  than the rest of the disc;
* Barred Spiral: a boxy Ferrers bar (generalised ellipse, exponent 2.5-3.5) in the disc
  plane, the arms starting at the bar ends;
* edge-on discs: the line-of-sight integral of an exponential disc along the major axis
  times a sech^2 vertical profile (scale height 0.06-0.13 of the scale length without bulge,
  0.1-0.2 with), viewed 84-90 deg; "with bulge" adds a Sersic bulge of 20-50 % of the light
  and, for half of them, a dust lane that dims g more than z;
* Disturbed: a lopsided (m = 1) disc with an irregular m = 2-3 modulation, an off-centre
  nucleus and several blue clumps away from the centre;
* Merging: two overlapping galaxies (flux ratio 1:1-1:4, 4-12" apart) and a curved tidal
  tail of fading blobs, sometimes a second one.

Every component is a normalised profile times an r-band flux and a (g/r, 1, z/r) colour,
summed on a grid supersampled 2-4x per pixel and averaged down to pixels. Each band is
then convolved with its own pixel-integrated PSF (Moffat beta 2.5-4.5 or Gaussian, FWHM
1.0-1.7" in r, broader in g, narrower in z) by FFT, gets Gaussian sky noise, and the three
bands go to RGB with an asinh stretch of the band mean (Lupton et al. 2004 style: the colour
of a pixel is kept, its brightness compressed; z -> R, r -> G, g -> B).

The field of view is a Galaxy10 cutout's (256 px of 0.262"), so ``pxscale = 0.262 * 256 /
size``. Galaxy ``i`` depends only on ``(seed, i)`` and its label.
"""

import math
from functools import lru_cache

import numpy as np

from .classes import CLASS_NAMES, NUM_CLASSES
from .classes import class_fractions as galaxy10_fractions

FIELD_ARCSEC = 0.262 * 256  # side of a Galaxy10 DECaLS cutout
GENERATOR = "analytic"

# colours as (g/r, 1, z/r) flux ratios; each galaxy perturbs them by a few per cent
_RED = (0.52, 1.0, 1.62)  # bulges, ellipticals
_DISC = (0.74, 1.0, 1.26)
_BLUE = (1.05, 1.0, 0.84)  # arms, knots, star-forming clumps, tails
# RGB display: per-band scales (z -> R, r -> G, g -> B), asinh softening and stretch
_DISPLAY_SCALE = (0.8, 1.0, 1.3)
_ASINH_Q = 8.0
_ASINH_ALPHA = 0.08
# sky noise (surface brightness units) per band g, r, z at 64 px; larger for finer pixels
_NOISE = (0.9, 1.0, 1.5)
_REF_PXSCALE = FIELD_ARCSEC / 64


# ------------------------------------------------------------------ profiles --------------


def _sersic_b(n):
    """b_n of a Sersic profile (half the light inside r_e), asymptotic expansion in 1/n."""
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)


def _sersic(r, r_e, n):
    return np.exp(-_sersic_b(n) * ((r / r_e) ** (1.0 / n) - 1.0))


def _sech2(t):
    e = np.exp(-2.0 * np.abs(t))
    return 4.0 * e / (1.0 + e) ** 2


@lru_cache(maxsize=1)
def _edge_on_table():
    """Light of a face-on exponential disc (scale length 1) summed along lines of sight
    that pass at distance s from the centre, for s on a grid: the major-axis profile of an
    edge-on disc (computed here by summation, no Bessel function needed)."""
    s = np.linspace(0.0, 30.0, 601)
    t = np.linspace(0.0, 40.0, 1601)
    f = np.exp(-np.sqrt(s[:, None] ** 2 + t[None, :] ** 2)).sum(1) * (t[1] - t[0]) * 2
    return s, f / f[0]


def _edge_on_major(s):
    table_s, table_f = _edge_on_table()
    return np.interp(np.abs(s), table_s, table_f, right=0.0)


class _Canvas:
    """g, r, z surface brightness on a grid supersampled ``sub`` times per pixel."""

    def __init__(self, size, pxscale, sub):
        self.size, self.sub, self.pxscale = size, sub, pxscale
        step = pxscale / sub
        c = (np.arange(size * sub) + 0.5) * step - size * pxscale / 2
        self.x, self.y = c[None, :], c[:, None]  # arcsec from the centre; y grows downwards
        self.bands = np.zeros((3, size * sub, size * sub))

    def frame(self, x0, y0, pa):
        """Coordinates along (u) and across (v) an axis at position angle ``pa`` through (x0, y0)."""
        dx, dy = self.x - x0, self.y - y0
        c, s = math.cos(pa), math.sin(pa)
        return dx * c + dy * s, -dx * s + dy * c

    def add(self, profile, flux, colour):
        """Add ``profile`` scaled to total r-band ``flux`` with colour (g/r, 1, z/r)."""
        profile = np.broadcast_to(profile, self.bands.shape[1:])
        total = profile.sum()
        if flux > 0 and total > 0:
            self.add_raw(profile * (flux / total), colour)

    def add_raw(self, sb, colour):
        for b in range(3):
            self.bands[b] += colour[b] * sb

    def attenuate(self, depth, tau):
        """Multiply each band by exp(-tau_band * depth)."""
        for b in range(3):
            self.bands[b] *= np.exp(-tau[b] * depth)

    def pixels(self):
        """Mean surface brightness per pixel: [3, size, size]."""
        s, n = self.sub, self.size
        return self.bands.reshape(3, n, s, n, s).mean(axis=(2, 4))


def _tint(rng, colour, spread=0.06):
    g, _, z = colour
    return np.array([g * math.exp(rng.normal(0, spread)), 1.0, z * math.exp(rng.normal(0, spread))])


def _blob(canvas, x0, y0, sigma, flux, colour):
    canvas.add(np.exp(-((canvas.x - x0) ** 2 + (canvas.y - y0) ** 2) / (2 * sigma * sigma)), flux, colour)


def _disc_q(rng, q_min):
    """Apparent axis ratio of a thin disc seen at a random inclination, at least ``q_min``."""
    cos_i = rng.uniform(q_min, 1.0)
    return math.sqrt(cos_i**2 * (1 - 0.15**2) + 0.15**2)


# ------------------------------------------------------------------ the ten classes ------


def _smooth(canvas, rng, g, n_range, q_range):
    u, v = canvas.frame(g.x0, g.y0, g.pa)
    q = rng.uniform(*q_range)
    n = rng.uniform(*n_range)
    r_e = g.scale * rng.uniform(2.5, 5.0) * (1.0 + 0.4 * (1 - q))  # elongated ones are longer
    canvas.add(_sersic(np.sqrt(u * u + (v / q) ** 2), r_e, n), g.flux, _tint(rng, _RED))


def _bulge(canvas, rng, g, flux, r_e, q=None, n=None, x0=None, y0=None):
    u, v = canvas.frame(g.x0 if x0 is None else x0, g.y0 if y0 is None else y0, g.pa)
    q = rng.uniform(0.7, 1.0) if q is None else q
    n = rng.uniform(1.5, 4.0) if n is None else n
    canvas.add(_sersic(np.sqrt(u * u + (v / q) ** 2), r_e, n), flux, _tint(rng, _RED))


def _spiral(canvas, rng, g, pitch_range, bulge_range, barred=False, knots=0):
    h = g.scale * rng.uniform(2.8, 4.5)
    q = _disc_q(rng, 0.45)
    bt = rng.uniform(*bulge_range)
    u, v = canvas.frame(g.x0, g.y0, g.pa)
    vp = v / q  # disc-plane coordinates
    r = np.sqrt(u * u + vp * vp)
    theta = np.arctan2(vp, u)
    disc = np.exp(-r / h)
    disc_sb = disc * (g.flux * (1 - bt) / disc.sum())

    bar_angle = rng.uniform(0, math.pi)
    if barred:
        a_bar = h * rng.uniform(1.0, 1.8)
        q_bar, c_bar, n_f = rng.uniform(0.2, 0.35), rng.uniform(2.5, 3.5), rng.uniform(1.0, 2.0)
        cb, sb = math.cos(bar_angle), math.sin(bar_angle)
        ub, vb = u * cb + vp * sb, -u * sb + vp * cb
        m = (np.abs(ub / a_bar) ** c_bar + np.abs(vb / (q_bar * a_bar)) ** c_bar) ** (1 / c_bar)
        bar = np.clip(1 - m * m, 0, None) ** n_f
        canvas.add(bar, g.flux * rng.uniform(0.15, 0.3), _tint(rng, (0.6, 1.0, 1.45)))
        r_in = a_bar
    else:
        r_in = h * rng.uniform(0.5, 0.9)

    arms = 3 if (not barred and rng.uniform() < 0.25) else 2
    tan_p = math.tan(math.radians(rng.uniform(*pitch_range)))
    # arm phase: arms leave the bar ends (or a random angle) at radius r_in and wind outwards
    psi = arms * (theta - np.log(np.maximum(r, 1e-3) / r_in) / tan_p - bar_angle)
    k = rng.uniform(2.0, 5.0)  # arm sharpness
    w = ((1 + np.cos(psi)) / 2) ** k
    mean_w = math.exp(math.lgamma(k + 0.5) - math.lgamma(k + 1)) / math.sqrt(math.pi)
    amp = rng.uniform(0.45, 0.8) * (1 - np.exp(-((r / r_in) ** 2)))
    canvas.add_raw(disc_sb * (1 - amp), _tint(rng, _DISC))
    canvas.add_raw(disc_sb * amp * w / mean_w, _tint(rng, _BLUE))
    _bulge(canvas, rng, g, g.flux * bt, h * rng.uniform(0.25, 0.45), q=min(1.0, q + 0.2))

    for _ in range(knots):  # star-forming knots on the arms
        rr = rng.uniform(r_in, 3.0 * h)
        arm = rng.integers(arms)
        th = np.log(rr / r_in) / tan_p + bar_angle + 2 * math.pi * arm / arms + rng.normal(0, 0.1)
        xp, yp = rr * math.cos(th), rr * math.sin(th) * q
        c, s = math.cos(g.pa), math.sin(g.pa)
        x, y = g.x0 + xp * c - yp * s, g.y0 + xp * s + yp * c
        _blob(canvas, x, y, rng.uniform(0.3, 0.7), g.flux * rng.uniform(0.005, 0.02), _tint(rng, _BLUE))


def _edge_on(canvas, rng, g, with_bulge):
    h = g.scale * rng.uniform(3.0, 5.0)
    ratio = rng.uniform(0.1, 0.2) if with_bulge else rng.uniform(0.06, 0.13)
    cos_i = math.cos(math.radians(rng.uniform(84, 90)))
    z0 = math.hypot(ratio * h, 0.5 * h * cos_i)
    u, v = canvas.frame(g.x0, g.y0, g.pa)
    bt = rng.uniform(0.3, 0.55) if with_bulge else rng.uniform(0.0, 0.03)
    canvas.add(_edge_on_major(u / h) * _sech2(v / z0), g.flux * (1 - bt), _tint(rng, _DISC))
    if bt > 0:
        r_e = h * (rng.uniform(0.35, 0.6) if with_bulge else 0.2)
        _bulge(canvas, rng, g, g.flux * bt, r_e, q=rng.uniform(0.6, 0.9), n=rng.uniform(1.0, 2.5))
    if with_bulge and rng.uniform() < 0.5:  # dust lane in the mid-plane, offset by the tilt
        offset = rng.uniform(-0.5, 0.5) * z0
        depth = np.exp(-(((v - offset) / (0.4 * z0)) ** 2)) * np.exp(-((u / (2.5 * h)) ** 2))
        tau = rng.uniform(0.6, 1.5)
        canvas.attenuate(depth, (1.4 * tau, tau, 0.6 * tau))


def _disturbed(canvas, rng, g):
    h = g.scale * rng.uniform(2.5, 4.5)
    q = _disc_q(rng, 0.4)
    u, v = canvas.frame(g.x0, g.y0, g.pa)
    vp = v / q
    r = np.sqrt(u * u + vp * vp)
    theta = np.arctan2(vp, u)
    lopsided = 1 + rng.uniform(0.4, 0.9) * np.minimum(r / h, 3) * np.cos(theta - rng.uniform(0, 2 * math.pi))
    m = rng.integers(2, 4)
    wobble = 1 + rng.uniform(0.2, 0.5) * np.cos(m * theta - np.log1p(r / h) * rng.uniform(-3, 3) - rng.uniform(0, 6))
    canvas.add(np.exp(-r / h) * np.clip(lopsided, 0, None) * wobble, g.flux * 0.7, _tint(rng, _DISC))
    # a nucleus away from the disc centre
    off = h * rng.uniform(0.3, 0.8)
    a = rng.uniform(0, 2 * math.pi)
    _bulge(canvas, rng, g, g.flux * 0.1, h * 0.3, x0=g.x0 + off * math.cos(a), y0=g.y0 + off * math.sin(a))
    for _ in range(rng.integers(3, 8)):  # clumps, mostly off-centre
        rr, a = h * rng.uniform(0.8, 2.8), rng.uniform(0, 2 * math.pi)
        _blob(
            canvas,
            g.x0 + rr * math.cos(a),
            g.y0 + rr * math.sin(a),
            rng.uniform(0.5, 1.5) * g.scale,
            g.flux * rng.uniform(0.02, 0.06),
            _tint(rng, _BLUE, 0.1),
        )


def _member(canvas, rng, x0, y0, scale, flux):
    """One galaxy of a merger: a bulge and a disc, or an elliptical."""
    pa = rng.uniform(0, math.pi)
    u, v = canvas.frame(x0, y0, pa)
    q = rng.uniform(0.4, 1.0)
    r = np.sqrt(u * u + (v / q) ** 2)
    if rng.uniform() < 0.6:
        h = scale * rng.uniform(2.0, 3.5)
        bt = rng.uniform(0.1, 0.5)
        canvas.add(np.exp(-r / h), flux * (1 - bt), _tint(rng, _DISC))
        canvas.add(_sersic(r, 0.35 * h, rng.uniform(1.5, 4)), flux * bt, _tint(rng, _RED))
    else:
        canvas.add(_sersic(r, scale * rng.uniform(1.5, 3.5), rng.uniform(1.5, 4)), flux, _tint(rng, _RED))


def _merging(canvas, rng, g):
    ratio = rng.uniform(1, 4)
    sep = rng.uniform(4.0, 12.0) * g.scale
    a = rng.uniform(0, 2 * math.pi)
    f1 = g.flux * ratio / (1 + ratio)
    x1, y1 = g.x0 - 0.3 * sep * math.cos(a), g.y0 - 0.3 * sep * math.sin(a)
    x2, y2 = x1 + sep * math.cos(a), y1 + sep * math.sin(a)
    _member(canvas, rng, x1, y1, g.scale, f1)
    _member(canvas, rng, x2, y2, g.scale * rng.uniform(0.6, 1.0), g.flux - f1)
    for start, (xs, ys), away in ((0, (x1, y1), a + math.pi), (1, (x2, y2), a)):
        if start == 1 and rng.uniform() < 0.5:
            continue
        # tidal tail: blobs along a curving arc leaving the galaxy away from its partner
        length = rng.uniform(1.2, 2.5) * sep
        bend = rng.choice((-1, 1)) * rng.uniform(0.6, 1.4)
        tail_flux = g.flux * rng.uniform(0.06, 0.15)
        colour = _tint(rng, _BLUE)
        steps = 14
        for j in range(1, steps + 1):
            t = j / steps
            ang = away + bend * t
            d = length * t
            _blob(
                canvas,
                xs + d * math.cos(ang),
                ys + d * math.sin(ang),
                g.scale * (0.8 + 1.5 * t),
                tail_flux * (1 - 0.7 * t) / steps * 2,
                colour,
            )


class _Galaxy:
    """Per-galaxy placement: centre (arcsec), position angle, angular scale, r-band flux."""

    def __init__(self, rng, scale):
        self.x0, self.y0 = np.clip(rng.normal(0, 1.0, 2), -3, 3)
        self.pa = rng.uniform(0, math.pi)
        self.scale = scale
        self.flux = 25000.0 * scale**2 * math.exp(rng.normal(0, 0.35))


def _draw(label, canvas, rng, g):
    name = CLASS_NAMES[label]
    if name == "Disturbed":
        _disturbed(canvas, rng, g)
    elif name == "Merging":
        _merging(canvas, rng, g)
    elif name == "Round Smooth":
        _smooth(canvas, rng, g, (2.5, 5.0), (0.85, 1.0))
    elif name == "In-between Round Smooth":
        _smooth(canvas, rng, g, (1.5, 4.0), (0.5, 0.8))
    elif name == "Cigar Shaped Smooth":
        _smooth(canvas, rng, g, (0.8, 2.5), (0.2, 0.45))
    elif name == "Barred Spiral":
        _spiral(canvas, rng, g, (15, 25), (0.1, 0.3), barred=True)
    elif name == "Unbarred Tight Spiral":
        _spiral(canvas, rng, g, (10, 15), (0.15, 0.4))
    elif name == "Unbarred Loose Spiral":
        _spiral(canvas, rng, g, (25, 35), (0.03, 0.15), knots=int(rng.integers(4, 10)))
    elif name == "Edge-on without Bulge":
        _edge_on(canvas, rng, g, with_bulge=False)
    elif name == "Edge-on with Bulge":
        _edge_on(canvas, rng, g, with_bulge=True)
    else:  # pragma: no cover - the class table has ten entries
        raise ValueError(f"no model for class {label}")


# ------------------------------------------------------------------ observation ----------


def _psf_kernel(pxscale, fwhm, beta, sub=5):
    """PSF integrated over pixels (``sub`` x ``sub`` samples each), unit sum; Gaussian when
    ``beta`` is None, else Moffat."""
    radius = max(2, int(math.ceil(2.5 * fwhm / pxscale)))
    c = (np.arange((2 * radius + 1) * sub) + 0.5) / sub - (radius + 0.5)
    r2 = (c[None, :] ** 2 + c[:, None] ** 2) * pxscale**2
    if beta is None:
        k = np.exp(-r2 / (2 * (fwhm / (2 * math.sqrt(2 * math.log(2)))) ** 2))
    else:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        k = (1 + r2 / alpha**2) ** -beta
    n = 2 * radius + 1
    k = k.reshape(n, sub, n, sub).sum(axis=(1, 3))
    return k / k.sum()


def _convolve(image, kernel):
    """Linear convolution (zero outside the image) of a 2-D image with an odd kernel by FFT."""
    n, r = image.shape[0], kernel.shape[0] // 2
    p = n + 2 * r
    kp = np.zeros((p, p))
    kp[: 2 * r + 1, : 2 * r + 1] = kernel
    kp = np.roll(kp, (-r, -r), axis=(0, 1))
    out = np.fft.irfft2(np.fft.rfft2(image, (p, p)) * np.fft.rfft2(kp), (p, p))
    return out[:n, :n]


def _observe(sb, pxscale, rng):
    """PSF (per band), then sky noise: [3, S, S] surface brightness."""
    fwhm = rng.uniform(1.0, 1.7)
    beta = None if rng.uniform() < 0.3 else rng.uniform(2.5, 4.5)
    depth = math.exp(rng.normal(0, 0.2))
    noise_scale = depth * _REF_PXSCALE / pxscale
    out = np.empty_like(sb)
    for b, widen in enumerate((1.12, 1.0, 0.92)):
        out[b] = _convolve(sb[b], _psf_kernel(pxscale, fwhm * widen, beta))
        out[b] += rng.normal(0.0, _NOISE[b] * noise_scale, sb[b].shape)
    return out


def to_rgb(bands):
    """g, r, z [3, S, S] surface brightness -> uint8 [S, S, 3] RGB (z -> R, r -> G, g -> B).

    The band mean I sets a pixel's brightness, compressed as asinh(alpha Q I) / Q; the bands
    keep their ratios (colour), and a pixel brighter than white is scaled down as a whole
    rather than clipped per band, so saturated cores keep their colour.
    """
    rgb = np.stack([bands[2] * _DISPLAY_SCALE[0], bands[1] * _DISPLAY_SCALE[1], bands[0] * _DISPLAY_SCALE[2]], -1)
    rgb = np.clip(rgb, 0.0, None)
    intensity = rgb.mean(-1, keepdims=True)
    safe = np.maximum(intensity, 1e-12)
    rgb = rgb * (np.arcsinh(_ASINH_ALPHA * _ASINH_Q * safe) / (_ASINH_Q * safe))
    rgb = rgb / np.maximum(rgb.max(-1, keepdims=True), 1.0)
    return np.rint(rgb * 255).astype(np.uint8)


def _supersampling(size):
    return 4 if size <= 40 else 3 if size <= 96 else 2


def render_galaxy(label, size, seed, index):
    """One galaxy of class ``label``: (uint8 [size, size, 3] RGB, redshift). Depends only
    on (label, size, seed, index)."""
    rng = np.random.default_rng([int(seed), 0x6A1, int(index)])
    pxscale = FIELD_ARCSEC / size
    redshift = rng.uniform(0.02, 0.14)
    scale = float(np.clip(1.3 * (0.06 / redshift) ** 0.5 * math.exp(rng.normal(0, 0.15)), 0.8, 2.2))
    canvas = _Canvas(size, pxscale, _supersampling(size))
    _draw(int(label), canvas, rng, _Galaxy(rng, scale))
    return to_rgb(_observe(canvas.pixels(), pxscale, rng)), redshift


def _class_counts(n, fractions):
    """Counts per class summing to n, by largest remainder."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def render_catalog(n, size, seed, class_fractions=None, progress=None):
    """Render a Galaxy10-like catalog with the analytic models.

    Returns ``{"images": uint8 (n, size, size, 3), "ans": uint8 (n,), "ra", "dec",
    "redshift", "pxscale": float64 (n,)}``, the keyword arguments of
    :func:`galcf_hpc.data.galaxy10.write_catalog`. Class counts follow ``class_fractions``
    (default: Galaxy10 DECaLS's) up to rounding, in a random order. Deterministic for a seed.
    ``progress(done, total)`` is called every 100 galaxies and at the end.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16 pixels, got {size!r}")
    fractions = galaxy10_fractions() if class_fractions is None else class_fractions
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (NUM_CLASSES,) or not np.all(np.isfinite(fractions)) or fractions.min() < 0:
        raise ValueError(f"class_fractions must be {NUM_CLASSES} non-negative numbers, got {class_fractions!r}")
    if fractions.sum() <= 0:
        raise ValueError("class_fractions must not all be zero")
    fractions = fractions / fractions.sum()

    rng = np.random.default_rng([int(seed), 0x6A0])
    labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), _class_counts(n, fractions))).astype(np.uint8)
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-0.3, 0.55, n)))  # roughly the DECaLS footprint
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    redshift = np.empty(n)
    for i in range(n):
        images[i], redshift[i] = render_galaxy(labels[i], size, seed, i)
        if progress is not None and ((i + 1) % 100 == 0 or i + 1 == n):
            progress(i + 1, n)
    return {
        "images": images,
        "ans": labels,
        "ra": ra,
        "dec": dec,
        "redshift": redshift,
        "pxscale": np.full(n, FIELD_ARCSEC / size),
    }
