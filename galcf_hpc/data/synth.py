"""Synthetic Galaxy10-DECaLS-like galaxies rendered with GalSim.

Every class of Galaxy10 DECaLS (labels as in :mod:`galcf_hpc.data.classes`) is modelled
physically (ranges from docs FACTS "Galaxy10 DECaLS"):

* smooth classes: Sersic profiles (Round n 3-6, q 0.8-1; In-between n 2-5, q 0.45-0.8;
  Cigar q 0.15-0.45), sometimes as a lenticular bulge + smooth disk;
* edge-on disks: ``galsim.InclinedExponential`` (inclination 80-90 deg, scale height
  0.08-0.15 of the scale length) with a bulge of <5% or 15-50% (n 2-4) and, often, a dust
  lane;
* spirals: exponential disk + Sersic bulge + logarithmic arms (pitch 12-25 deg barred,
  5-15 deg tight, 20-40 deg loose and clumpy). GalSim has no arm or ring profile, so arms,
  rings, star-forming knots, clumps, tidal features, background galaxies and neighbours
  are numpy surface-brightness maps on a grid of pixels no coarser than 0.55", convolved
  with the same Moffat PSF sampled on that grid, then binned to the image pixels. Bars are
  Sersic n 0.3-0.7, q 0.2-0.4 (10-20% of the light) in a disk depleted inside the bar,
  with the arms starting at the bar ends;
* Disturbed: lopsided, clumpy bodies, tidal plumes and shells, one-armed distorted disks;
* Merging: 2-3 galaxies 2-15" apart, flux ratio 1:1-1:4, tidal tails and bridges.

Each galaxy is drawn in r-band flux per component *group* (old stars, disk, young stars,
dust, neighbour); g and z are flux-scaled sums of the same group images with per-group
colours (bulges redder, disks and arms bluer), so a galaxy costs 1-4 GalSim draws. Images
are in nanomaggies per native 0.262" pixel, get Gaussian sky noise with DECaLS-like depth
and are mapped to RGB like Legacy Survey colour JPEGs (per-band scales, asinh stretch,
z -> R, r -> G, g -> B).

The field of view always equals a Galaxy10 256 px cutout: ``pxscale = 0.262 * 256 / size``
arcsec/px, or twice that for ~5% of the galaxies (large galaxies in Galaxy10 were cut out at
0.524"/px). ``generate`` is deterministic per seed: galaxy ``i`` depends only on
``(seed, i)``, so any number of worker processes gives identical arrays.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from .classes import CLASS_NAMES, NUM_CLASSES, class_fractions as _galaxy10_fractions

__all__ = ["render_galaxy", "generate", "write_sample_sheet", "grz_to_rgb",
           "NATIVE_PXSCALE", "NATIVE_SIZE"]

NATIVE_PXSCALE = 0.262          # arcsec/px of DECaLS and of most Galaxy10 cutouts
NATIVE_SIZE = 256               # Galaxy10 cutout size in pixels
DOUBLE_SCALE_FRACTION = 0.05    # share of cutouts at 0.524"/px
NEIGHBOUR_FRACTION = 0.15       # share of images with an unrelated star/galaxy in frame
_SUB_SCALE = 0.55               # numpy maps and GalSim draws use pixels no coarser than this

# Legacy-Survey-like colour JPEG mapping (nanomaggies -> display): per-band scale and the
# output plane (z -> R, r -> G, g -> B), asinh softening Q.
_RGB_SCALE = {"g": 6.0, "r": 3.4, "z": 2.2}
_ASINH_Q = 20.0
# 1-sigma sky noise per native 0.262" pixel in nanomaggies (DECaLS DR-like depths),
# multiplied per image by a random factor.
_SKY_SIGMA = np.array([0.006, 0.009, 0.022])      # g, r, z

# Confusable classes used for the conflicting labels of planted duplicates. Not
# data.classes.NEIGHBOURS (the table of `data synth --label-noise`, which moves labels after
# rendering): this one decides which galaxy a duplicate re-renders, and changing it would
# change the images every published seed gives.
_CONFUSABLE = {0: (1, 7), 1: (0,), 2: (3,), 3: (2, 4), 4: (3, 8), 5: (6, 7),
               6: (5, 7), 7: (6, 0), 8: (9, 4), 9: (8,)}

# Size multiplier per class applied to the common (class-independent) size draw, chosen so
# that the *measured* size distributions of the classes overlap (a merger's two bodies
# and its separation make it look bigger than one galaxy of the same half-light radius).
_SIZE_MULT = {0: 0.85, 1: 0.8, 2: 0.9, 3: 0.75, 4: 0.65, 5: 0.78, 6: 0.9, 7: 0.85,
              8: 1.05, 9: 1.3}


def _gs():
    import galsim
    return galsim


@lru_cache(maxsize=1)
def _gsparams():
    galsim = _gs()
    # Looser than the defaults: the images are noisy 8-bit renderings, and these settings
    # keep the FFTs small (a few ms per draw at 64-128 px).
    return galsim.GSParams(folding_threshold=1e-2, maxk_threshold=5e-3)


# ----------------------------------------------------------------------------- helpers
def _colour(rng, gr, rz):
    """Flux ratios (g/r, 1, z/r) for colours g-r and r-z (mag) drawn uniformly in ranges."""
    g_r = rng.uniform(*gr)
    r_z = rng.uniform(*rz)
    return np.array([10 ** (-0.4 * g_r), 1.0, 10 ** (0.4 * r_z)])


def _supersampling(pxscale: float) -> int:
    return max(1, int(round(pxscale / _SUB_SCALE)))


@lru_cache(maxsize=16)
def _subgrid(size: int, pxscale: float):
    """Coordinates (arcsec, relative to the image centre) of the supersampled pixel centres."""
    sub = _supersampling(pxscale)
    n = size * sub
    ds = pxscale / sub
    c = (np.arange(n) + 0.5) * ds - size * pxscale / 2.0
    xx, yy = np.meshgrid(c, c)
    return c, xx, yy


def _moffat_kernel(fwhm: float, beta: float, ds: float, max_half: int) -> np.ndarray:
    """Moffat PSF sampled on a grid of spacing ds (arcsec), normalised to unit sum."""
    half = int(min(max_half, math.ceil(3.5 * fwhm / ds)))
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    c = np.arange(-half, half + 1) * ds
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    k = (1.0 + r2 / alpha ** 2) ** (-beta)
    return k / k.sum()


class _SameConvolver:
    """Linear (zero-padded) convolution with an odd-sized, centred kernel whose transform is
    computed once; outputs have the shape of the input."""

    def __init__(self, kernel: np.ndarray, shape):
        self.kh = kernel.shape[0] // 2
        self.shape = tuple(shape)
        self.fft_shape = (shape[0] + 2 * self.kh, shape[1] + 2 * self.kh)
        self.fk = np.fft.rfft2(kernel, s=self.fft_shape)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        out = np.fft.irfft2(np.fft.rfft2(a, s=self.fft_shape) * self.fk, s=self.fft_shape)
        kh = self.kh
        return out[kh:kh + self.shape[0], kh:kh + self.shape[1]]


def _quantise_n(n):
    """Sersic index on a 0.2 grid: GalSim builds a costly table per n (and caches 100)."""
    return float(np.clip(round(n * 5) / 5, 0.3, 6.2))


def _sersic(n, r_e, flux, q, beta, x, y):
    galsim = _gs()
    n = _quantise_n(n)
    # truncated at 8 r_e (keeps GalSim's FFTs small); the flux is that of the truncated profile
    obj = galsim.Sersic(n=n, half_light_radius=float(r_e), flux=float(flux),
                        trunc=float(8 * r_e), gsparams=_gsparams())
    if q < 0.999:
        obj = obj.shear(q=float(q), beta=float(beta) * galsim.radians)
    return obj.shift(float(x), float(y))


class _Disk:
    """A disk plane seen at axis ratio q, major axis at position angle pa, centred (cx, cy)."""

    def __init__(self, cx, cy, pa, q):
        self.cx, self.cy, self.q = cx, cy, q
        self.c, self.s = math.cos(pa), math.sin(pa)

    def to_sky(self, x, y):
        return (self.cx + self.c * x - self.s * self.q * y,
                self.cy + self.s * x + self.c * self.q * y)

    def from_sky(self, u, v):
        du, dv = u - self.cx, v - self.cy
        return self.c * du + self.s * dv, (-self.s * du + self.c * dv) / self.q

    def place(self, obj):
        """Project a face-on GalSim profile onto the sky (flux conserved)."""
        c, s, q = self.c, self.s, self.q
        return obj.transform(c, -s * q, s, c * q).withScaledFlux(1.0 / q).shift(self.cx, self.cy)


class _Scene:
    """Components of one image, grouped by colour; renders g, r, z in nmgy per native px."""

    def __init__(self, size, pxscale, fwhm, beta):
        galsim = _gs()
        self.size, self.pxscale = size, pxscale
        self.fwhm, self.beta = fwhm, beta
        self.psf = galsim.Moffat(beta=beta, fwhm=fwhm, gsparams=_gsparams())
        self.objs: dict[str, list] = {}
        self.maps: dict[str, np.ndarray] = {}
        self.colour: dict[str, np.ndarray] = {}
        self.sub = _supersampling(pxscale)
        self.ds = pxscale / self.sub
        self.c1d, self.xx, self.yy = _subgrid(size, pxscale)

    @property
    def half_frame(self):
        return self.size * self.pxscale / 2.0

    def group(self, name, colour):
        if name not in self.colour:
            self.colour[name] = np.asarray(colour, dtype=float)

    def add(self, name, obj):
        self.objs.setdefault(name, []).append(obj)

    def add_map(self, name, sb, flux):
        """Add a surface-brightness map (on the subgrid) scaled to `flux` inside the frame."""
        tot = float(sb.sum())
        if tot <= 0 or flux == 0:
            return
        canvas = self.maps.setdefault(name, np.zeros_like(self.xx))
        canvas += sb * (flux / tot)

    def add_flux_map(self, name, fluxmap):
        """Add a map already in flux per subpixel."""
        canvas = self.maps.setdefault(name, np.zeros_like(self.xx))
        canvas += fluxmap

    def add_sersic_map(self, name, n, r_e, flux, q, beta, x, y):
        """A (small) Sersic galaxy drawn on the subgrid, normalised to `flux` in the frame."""
        c, s = math.cos(beta), math.sin(beta)
        du, dv = self.xx - x, self.yy - y
        sb = _sersic_sb(c * du + s * dv, -s * du + c * dv, n, r_e, q, 1.0)
        self.add_map(name, sb, flux)

    def add_blobs(self, name, u, v, sigma, flux):
        """Circular Gaussian blobs (sky position u, v; width sigma arcsec; flux each)."""
        u = np.atleast_1d(np.asarray(u, float))
        if u.size == 0:
            return
        v = np.atleast_1d(np.asarray(v, float))
        ds = self.ds
        sigma = np.maximum(np.broadcast_to(np.asarray(sigma, float), u.shape), 0.6 * ds)
        flux = np.broadcast_to(np.asarray(flux, float), u.shape)
        c = self.c1d
        norm = ds / (math.sqrt(2 * math.pi) * sigma)
        gx = np.exp(-0.5 * ((c[None, :] - u[:, None]) / sigma[:, None]) ** 2) * norm[:, None]
        gy = np.exp(-0.5 * ((c[None, :] - v[:, None]) / sigma[:, None]) ** 2) * norm[:, None]
        canvas = self.maps.setdefault(name, np.zeros_like(self.xx))
        # sum_k flux_k gy_k(y) gx_k(x); einsum, not BLAS: a multi-threaded BLAS on a busy
        # machine made this small product ~20x slower
        canvas += np.einsum("ki,kj->ij", gy, gx * flux[:, None])

    def render(self) -> np.ndarray:
        galsim = _gs()
        size, s = self.size, self.sub
        bands = np.zeros((3, size, size))
        convolve = None
        for name, col in self.colour.items():
            img = np.zeros((size, size))
            objs = self.objs.get(name)
            if objs:
                # Coarse pixels (> ~0.55") are drawn at a finer scale and binned: the result
                # is the same pixel-integrated image, but GalSim's FFT is several times
                # faster there than in its aliasing regime at the coarse scale.
                g = self.sub
                prof = objs[0] if len(objs) == 1 else galsim.Sum(objs)
                im = galsim.Image(size * g, size * g, scale=self.pxscale / g, dtype=np.float64)
                galsim.Convolve(prof, self.psf, gsparams=_gsparams()).drawImage(image=im)
                img += im.array.reshape(size, g, size, g).sum(axis=(1, 3)) if g > 1 else im.array
            m = self.maps.get(name)
            if m is not None:
                if convolve is None:
                    kernel = _moffat_kernel(self.fwhm, self.beta, self.ds, size * s // 2)
                    convolve = _SameConvolver(kernel, m.shape)
                img += convolve(m).reshape(size, s, size, s).sum(axis=(1, 3))
            bands += col[:, None, None] * img[None]
        return bands * (NATIVE_PXSCALE / self.pxscale) ** 2


# -------------------------------------------------------------------- morphology pieces
def _spiral_arms(disk, xx, yy, rng, *, m, pitch_deg, r0, h_arm, r_out, w0, w1,
                 phase, chirality, wobble, amp_jitter, w_frac=None):
    """Logarithmic spiral arms (surface brightness, unnormalised) on the sky grid."""
    x, y = disk.from_sky(xx, yy)
    r = np.hypot(x, y) + 1e-6
    phi = np.arctan2(y, x)
    tanp = math.tan(math.radians(pitch_deg))
    lnr = np.log(r / r0)
    wob_a, wob_w, wob_p = wobble
    psi = phi - phase - chirality * lnr / tanp - wob_a * np.sin(wob_w * lnr + wob_p)
    period = 2 * math.pi / m
    kk = np.floor(psi / period + 0.5)
    d = psi - kk * period                             # angle to the nearest arm
    arm = (kk.astype(np.int64) % m)
    amps = 1.0 + amp_jitter * rng.uniform(-1, 1, size=m)
    perp = r * np.abs(d) * math.sin(math.radians(pitch_deg))
    w = w0 + w1 * r
    if w_frac is not None:   # keep tightly wound arms narrower than the gaps between them
        w = np.maximum(np.minimum(w, w_frac * r * (2 * math.pi / m) * math.sin(math.radians(pitch_deg))), 0.3)
    along = 1.0 + 0.35 * amp_jitter * np.sin(3.0 * lnr + rng.uniform(0, 2 * np.pi))
    t_in = np.clip((r - 0.85 * r0) / (0.35 * r0), 0.0, 1.0)
    t_in = t_in * t_in * (3 - 2 * t_in)
    t_out = np.exp(-0.5 * (np.maximum(r - r_out, 0.0) / (0.35 * h_arm)) ** 2)
    # radial envelope rising then falling (peak at r = h_arm): arms light up the disk, not
    # only the (already bright) centre
    env = (r / h_arm) * np.exp(-r / h_arm)
    return amps[arm] * along * np.exp(-0.5 * (perp / w) ** 2) * env * t_in * t_out


def _arm_points(disk, rng, n, *, m, pitch_deg, r0, r_out, h_arm, phase, chirality, wobble,
                jitter):
    """Sky positions of n knots scattered along the arms."""
    tanp = math.tan(math.radians(pitch_deg))
    # radii weighted by the arm surface density (exp(-r/h) * r)
    r = r0 + rng.gamma(2.5, h_arm, size=4 * n)
    r = r[r < r_out * 1.1][:n]
    if r.size == 0:
        return np.zeros(0), np.zeros(0)
    k = rng.integers(0, m, size=r.size)
    lnr = np.log(r / r0)
    wob_a, wob_w, wob_p = wobble
    phi = (phase + k * 2 * math.pi / m + chirality * lnr / tanp
           + wob_a * np.sin(wob_w * lnr + wob_p))
    x = r * np.cos(phi) + rng.normal(0, jitter, r.size)
    y = r * np.sin(phi) + rng.normal(0, jitter, r.size)
    return disk.to_sky(x, y)


def _chain(sc, group, rng, x0, y0, heading, length, curl, w0, w1, flux, n=40, fade=1.0):
    """A curved tidal tail/plume/bridge: Gaussian blobs along a curve starting at (x0, y0)."""
    t = np.linspace(0.0, 1.0, n)
    ang = heading + curl * t
    step = length / (n - 1)
    x = x0 + np.concatenate([[0.0], np.cumsum(np.cos(ang[:-1]) * step)])
    y = y0 + np.concatenate([[0.0], np.cumsum(np.sin(ang[:-1]) * step)])
    sig = w0 + (w1 - w0) * t
    wts = (1.0 - 0.8 * t) ** fade * rng.uniform(0.6, 1.4, n)
    wts = wts / wts.sum() * flux
    jit = 0.25 * sig
    sc.add_blobs(group, x + rng.normal(0, 1, n) * jit, y + rng.normal(0, 1, n) * jit, sig, wts)
    return x, y


def _shell(sc, group, rng, cx, cy, radius, centre_ang, half_ext, width, flux, n=30):
    a = centre_ang + np.linspace(-half_ext, half_ext, n)
    wts = np.cos(np.linspace(-1.2, 1.2, n)) * rng.uniform(0.8, 1.2, n)
    sc.add_blobs(group, cx + radius * np.cos(a), cy + radius * np.sin(a), width,
                 wts / wts.sum() * flux)


# ---------------------------------------------------------------------- class builders
def _build_smooth(sc, rng, F, R, cx, cy, pa, cols, label):
    if label == 2:
        n, q = rng.uniform(3.0, 6.0), rng.uniform(0.8, 1.0)
    elif label == 3:
        n, q = rng.uniform(2.0, 5.0), rng.uniform(0.45, 0.8)
    else:
        n, q = rng.uniform(1.5, 4.0), rng.uniform(0.15, 0.45)
    col = cols["old"] if rng.random() > 0.12 else cols["disk"]
    sc.group("old", col)
    if label != 2 and rng.random() < 0.35:
        # lenticular-like: rounder bulge + smooth, featureless disk of the class's q
        fb = rng.uniform(0.4, 0.7)
        qb = min(1.0, q + rng.uniform(0.15, 0.4))
        sc.add("old", _sersic(rng.uniform(2.5, 4.0), R * rng.uniform(0.35, 0.55), F * fb,
                              qb, pa, cx, cy))
        sc.add("old", _sersic(1.0, R * 1.25, F * (1 - fb), q, pa, cx, cy))
    else:
        sc.add("old", _sersic(n, R, F, q, pa, cx, cy))


def _build_edge_on(sc, rng, F, R, cx, cy, pa, cols, with_bulge):
    galsim = _gs()
    h = R / 1.678
    incl = rng.uniform(80.0, 90.0)
    hr = rng.uniform(0.08, 0.15)
    fb = rng.uniform(0.15, 0.5) if with_bulge else rng.uniform(0.0, 0.05)
    sc.group("disk", cols["disk"])
    sc.group("old", cols["old"])
    rot = pa * galsim.radians
    # both components are built with the major axis along x, then rotated to the PA
    # thin disk + a fainter thick disk (10-25% of the disk light, ~3x the scale height)
    f_thick = rng.uniform(0.1, 0.25)
    disk0 = galsim.InclinedExponential(incl * galsim.degrees, scale_radius=h, scale_h_over_r=hr,
                                       flux=F * (1 - fb) * (1 - f_thick), gsparams=_gsparams())
    thick = galsim.InclinedExponential(incl * galsim.degrees, scale_radius=1.1 * h,
                                       scale_h_over_r=min(3 * hr, 0.4), flux=F * (1 - fb) * f_thick,
                                       gsparams=_gsparams())
    sc.add("disk", disk0.rotate(rot).shift(cx, cy))
    sc.add("disk", thick.rotate(rot).shift(cx, cy))
    if with_bulge:
        n_b, r_b, q_b = rng.uniform(2.0, 4.0), h * rng.uniform(0.35, 0.7), rng.uniform(0.65, 0.95)
    else:
        n_b, r_b, q_b = rng.uniform(1.0, 2.0), h * rng.uniform(0.2, 0.4), rng.uniform(0.5, 0.9)
    n_b = _quantise_n(n_b)
    bulge0 = galsim.Sersic(n=n_b, half_light_radius=r_b, flux=max(F * fb, 1e-3 * F),
                           trunc=8 * r_b, gsparams=_gsparams()).shear(q=q_b, beta=0 * galsim.radians)
    sc.add("old", bulge0.rotate(rot).shift(cx, cy))
    if not with_bulge and rng.random() < 0.5:   # star-forming knots along the thin disk
        sc.group("young", cols["young"])
        k = rng.integers(4, 12)
        xs = rng.laplace(0, 1.2 * h, k)
        ys = rng.normal(0, 0.3 * hr * h, k)
        c, s = math.cos(pa), math.sin(pa)
        sc.add_blobs("young", cx + c * xs - s * ys, cy + s * xs + c * ys,
                     rng.uniform(0.3, 0.6, k), F * rng.uniform(0.03, 0.08) / k)
    if rng.random() < (0.55 if with_bulge else 0.2):
        # Dust lane along the midplane, as the light it removes (GalSim cannot multiply
        # profiles): light x depth x (band across the midplane) <= light, so the sum stays
        # >= 0 before and after the PSF. Dust removes more g than z: own colour groups.
        depth = rng.uniform(0.4, 0.7)
        off = rng.uniform(-0.3, 0.3) * max(hr * h, 0.4)
        redden = np.array([1.4, 1.0, 0.6])
        # in front of the thin disk: the disk squeezed along its minor axis (transform keeps
        # surface brightness; squeezing a profile that falls off the midplane only lowers it)
        sc.group("dust_disk", -cols["disk"] * redden)
        k_d = rng.uniform(0.4, 0.7)
        sc.add("dust_disk", disk0.transform(1.0, 0.0, 0.0, k_d).withScaledFlux(depth).rotate(rot)
               .shift(cx - math.sin(pa) * off, cy + math.cos(pa) * off))
        if with_bulge:
            # across the bulge: the analytic Sersic surface brightness times a Gaussian band
            # of 0.8-1.6" FWHM, drawn on the subgrid (PSF-convolved with the numpy maps)
            fwhm_l = rng.uniform(0.8, 1.6)
            c, s_ = math.cos(pa), math.sin(pa)
            du, dv = sc.xx - cx, sc.yy - cy
            xb, yb = c * du + s_ * dv, -s_ * du + c * dv
            sb = _sersic_sb(xb, yb, n_b, r_b, q_b, max(F * fb, 1e-3 * F))
            band = np.exp(-4 * math.log(2) * ((yb - off) / fwhm_l) ** 2)
            sc.group("dust_old", -cols["old"] * redden)
            sc.add_flux_map("dust_old", depth * sb * band * sc.ds ** 2)


def _sersic_sb(x, y, n, r_e, q, flux):
    """Surface brightness (flux/arcsec^2) of the area-preserving sheared Sersic that
    galsim.Sersic(...).shear(q=q) draws, major axis along x."""
    b = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n * n)
    # galsim's shear(q) scales x by 1/sqrt(q) and y by sqrt(q)
    r = np.hypot(x * math.sqrt(q), y / math.sqrt(q))
    i_e = flux / (2 * math.pi * n * math.exp(b) * b ** (-2 * n) * math.gamma(2 * n) * r_e ** 2)
    return i_e * np.exp(-b * ((r / r_e) ** (1 / n) - 1))


def _build_spiral(sc, rng, F, R, cx, cy, pa, cols, kind):
    galsim = _gs()
    h = R / 1.678
    q = rng.uniform(0.5, 1.0)
    disk = _Disk(cx, cy, pa, q)
    chir = rng.choice([-1.0, 1.0])
    phase = rng.uniform(0, 2 * np.pi)
    sc.group("old", cols["old"])
    sc.group("disk", cols["disk"])
    sc.group("young", cols["young"])
    f_bar = 0.0
    if kind == "barred":
        fb = 0.05 + 0.30 * rng.random() ** 2          # 5-35%, mostly small: bars stay visible
        f_bar = rng.uniform(0.10, 0.20)                # strong bars (B/T ~0.1-0.2)
        a_bar = h * rng.uniform(1.2, 1.9)
        q_bar = rng.uniform(0.2, 0.4)
        n_bar = rng.uniform(0.3, 0.7)
        bar = galsim.Sersic(n=_quantise_n(n_bar), half_light_radius=0.9 * a_bar * math.sqrt(q_bar),
                            flux=F * f_bar, gsparams=_gsparams())
        bar = bar.shear(q=q_bar, beta=phase * galsim.radians)
        sc.add("old", disk.place(bar))
        m, pitch, r0 = 2, rng.uniform(12.0, 25.0), a_bar
        f_arm, w1, wob_a, amp_j = rng.uniform(0.18, 0.3), rng.uniform(0.06, 0.1), 0.08, 0.15
        n_knots, f_knots = rng.integers(4, 14), rng.uniform(0.02, 0.06)
    elif kind == "tight":
        fb = rng.uniform(0.10, 0.40)
        m = int(rng.choice([2, 2, 2, 3, 4]))
        pitch, r0 = rng.uniform(5.0, 15.0), h * rng.uniform(0.4, 0.8)
        f_arm, w1, wob_a, amp_j = rng.uniform(0.3, 0.45), rng.uniform(0.03, 0.06), 0.05, 0.15
        n_knots, f_knots = rng.integers(3, 12), rng.uniform(0.01, 0.04)
    else:  # loose
        fb = rng.uniform(0.0, 0.10)
        m = int(rng.choice([2, 2, 3, 3, 4]))
        pitch, r0 = rng.uniform(20.0, 40.0), h * rng.uniform(0.3, 0.6)
        f_arm, w1, wob_a, amp_j = rng.uniform(0.25, 0.4), rng.uniform(0.08, 0.13), 0.2, 0.35
        n_knots, f_knots = rng.integers(15, 40), rng.uniform(0.08, 0.16)
    # bulge: a little rounder than the projected disk
    qb = min(1.0, max(q, rng.uniform(0.75, 1.0)))
    rb = R * (rng.uniform(0.08, 0.16) if kind == "barred" else rng.uniform(0.15, 0.28))
    sc.add("old", _sersic(rng.uniform(1.5, 4.0), rb, max(F * fb, 1e-3 * F),
                          qb, pa, cx, cy))
    h_arm = h * rng.uniform(1.0, 1.3)
    r_out = h * rng.uniform(2.8, 4.2)
    wobble = (wob_a, rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi))
    arms = _spiral_arms(disk, sc.xx, sc.yy, rng, m=m, pitch_deg=pitch, r0=r0, h_arm=h_arm,
                        r_out=r_out, w0=rng.uniform(0.5, 0.9), w1=w1, phase=phase,
                        chirality=chir, wobble=wobble, amp_jitter=amp_j, w_frac=0.2)
    sc.add_map("young", arms, F * f_arm)
    if kind == "barred" and rng.random() < 0.3:   # inner ring around the bar
        x, y = disk.from_sky(sc.xx, sc.yy)
        cb, sb = math.cos(phase), math.sin(phase)
        xb, yb = cb * x + sb * y, (-sb * x + cb * y) / 0.85
        ring = np.exp(-0.5 * ((np.hypot(xb, yb) - r0) / (0.6 + 0.05 * r0)) ** 2)
        sc.add_map("young", ring, F * rng.uniform(0.03, 0.06))
        f_arm += 0.04
    ux, uy = _arm_points(disk, rng, int(n_knots), m=m, pitch_deg=pitch, r0=r0, r_out=r_out,
                         h_arm=h_arm, phase=phase, chirality=chir, wobble=wobble, jitter=0.4)
    if ux.size:
        wk = rng.lognormal(0, 0.5, ux.size)
        sc.add_blobs("young", ux, uy, rng.uniform(0.25, 0.6, ux.size), wk / wk.sum() * F * f_knots)
    f_disk = max(1.0 - fb - f_bar - f_arm - f_knots, 0.15)
    if kind == "barred":
        # the disk inside the bar radius is depleted (the bar swept it up): an exponential
        # minus a shorter exponential of lower amplitude (B < A keeps it non-negative), so
        # the disk light peaks in a ring near ~0.7 h and the bar stands out inside it
        h_in = h * rng.uniform(0.6, 0.75)
        ratio = rng.uniform(0.85, 0.97)                    # B / A, central depletion
        hole = ratio * (h_in / h) ** 2                      # hole flux / exponential flux
        a_out = f_disk / (1.0 - hole)
        sc.add("disk", disk.place(galsim.Exponential(scale_radius=h, flux=F * a_out,
                                                     gsparams=_gsparams())))
        sc.add("disk", disk.place(galsim.Exponential(scale_radius=h_in, flux=-F * a_out * hole,
                                                     gsparams=_gsparams())))
    else:
        sc.add("disk", disk.place(galsim.Exponential(scale_radius=h, flux=F * f_disk,
                                                     gsparams=_gsparams())))


def _build_disturbed(sc, rng, F, R, cx, cy, pa, cols):
    galsim = _gs()
    sc.group("old", cols["old"])
    sc.group("disk", cols["disk"])
    sc.group("young", cols["young"])
    variant = rng.choice(["irregular", "tidal", "lopsided"], p=[0.35, 0.4, 0.25])
    lop = rng.uniform(0, 2 * np.pi)                  # direction of the lopsidedness
    cl, sl = math.cos(lop), math.sin(lop)
    if variant == "irregular":
        q = rng.uniform(0.4, 1.0)
        f_main, f_sec, f_cl = rng.uniform(0.4, 0.55), rng.uniform(0.15, 0.25), rng.uniform(0.15, 0.3)
        d = _Disk(cx, cy, pa, q)
        sc.add("disk", d.place(galsim.Exponential(half_light_radius=R, flux=F * f_main,
                                                  gsparams=_gsparams())))
        off = R * rng.uniform(0.35, 0.8)
        sc.add("disk", _sersic(1.0, R * rng.uniform(0.5, 0.8), F * f_sec, rng.uniform(0.4, 1.0),
                               rng.uniform(0, np.pi), cx + off * cl, cy + off * sl))
        sc.add("old", _sersic(2.0, R * 0.15, F * rng.uniform(0.02, 0.06), 0.9, pa, cx, cy))
        k = int(rng.integers(8, 26))
        px = rng.normal(0.4 * off * cl, 0.7 * R, k)
        py = rng.normal(0.4 * off * sl, 0.7 * R, k)
        w = rng.lognormal(0, 0.6, k)
        sc.add_blobs("young", cx + px, cy + py, rng.uniform(0.3, 0.9, k), w / w.sum() * F * f_cl)
        if rng.random() < 0.4:
            _chain(sc, "disk", rng, cx + off * cl, cy + off * sl, lop + rng.normal(0, 0.5),
                   R * rng.uniform(1.5, 3.0), rng.uniform(-1.5, 1.5), 0.8, 2.0,
                   F * rng.uniform(0.05, 0.1), n=30)
    elif variant == "tidal":
        f_host = rng.uniform(0.7, 0.82)
        hostcol = "old" if rng.random() < 0.6 else "disk"
        sc.add(hostcol, _sersic(rng.uniform(1.0, 4.0), R * 0.8, F * f_host, rng.uniform(0.5, 1.0),
                                pa, cx, cy))
        off = R * rng.uniform(0.3, 0.6)
        f_env = rng.uniform(0.08, 0.15)
        sc.add("disk", _sersic(1.0, R * rng.uniform(1.5, 2.3), F * f_env, rng.uniform(0.5, 0.9),
                               lop, cx + off * cl, cy + off * sl))
        f_tid = max(1.0 - f_host - f_env, 0.03)
        if rng.random() < 0.6:   # one or two tails/plumes
            nt = int(rng.integers(1, 3))
            for j in range(nt):
                hd = lop + j * np.pi + rng.normal(0, 0.4)
                _chain(sc, "disk", rng, cx + 0.5 * R * math.cos(hd), cy + 0.5 * R * math.sin(hd),
                       hd, R * rng.uniform(2.0, 3.5), rng.choice([-1, 1]) * rng.uniform(0.8, 2.2),
                       0.8, rng.uniform(1.8, 3.0), F * f_tid / nt, n=40, fade=0.5)
        else:                    # shells on alternating sides
            ns = int(rng.integers(2, 5))
            for j in range(ns):
                _shell(sc, "old", rng, cx, cy, R * (1.2 + 0.7 * j) * rng.uniform(0.9, 1.1),
                       lop + j * np.pi + rng.normal(0, 0.3), rng.uniform(0.5, 1.0),
                       rng.uniform(0.5, 0.9), F * f_tid / ns)
    else:  # lopsided, one-armed distorted disk with clumps and an offset nucleus
        q = rng.uniform(0.5, 1.0)
        d = _Disk(cx, cy, pa, q)
        h = R / 1.678
        f_arm, f_cl = rng.uniform(0.2, 0.3), rng.uniform(0.1, 0.2)
        off = R * rng.uniform(0.2, 0.5)
        sc.add("old", _sersic(2.0, R * 0.2, F * rng.uniform(0.04, 0.1), 0.9, pa,
                              cx + off * cl, cy + off * sl))
        chir = rng.choice([-1.0, 1.0])
        arm = _spiral_arms(d, sc.xx, sc.yy, rng, m=1, pitch_deg=rng.uniform(25, 45), r0=0.4 * h,
                           h_arm=h * 1.4, r_out=h * rng.uniform(3, 4.5), w0=0.8, w1=0.15,
                           phase=lop, chirality=chir, wobble=(0.3, 2.0, rng.uniform(0, 6.3)),
                           amp_jitter=0.4)
        sc.add_map("young", arm, F * f_arm)
        k = int(rng.integers(6, 18))
        px = rng.normal(off * cl, 0.8 * R, k)
        py = rng.normal(off * sl, 0.8 * R, k)
        w = rng.lognormal(0, 0.6, k)
        sc.add_blobs("young", cx + px, cy + py, rng.uniform(0.3, 0.8, k), w / w.sum() * F * f_cl)
        sc.add("disk", d.place(galsim.Exponential(scale_radius=h, flux=F * (0.9 - f_arm - f_cl),
                                                  gsparams=_gsparams())))


def _build_merging(sc, rng, F, R, cx, cy, pa, cols):
    galsim = _gs()
    sc.group("old", cols["old"])
    sc.group("disk", cols["disk"])
    sep = rng.uniform(2.0, 15.0)
    ratio = rng.uniform(1.0, 4.0)
    f_tidal = rng.uniform(0.08, 0.2)
    fluxes = [ratio / (1 + ratio), 1 / (1 + ratio)]
    third = rng.random() < 0.15
    if third:
        f3 = rng.uniform(0.1, 0.25)
        fluxes = [f * (1 - f3) for f in fluxes] + [f3]
    fluxes = np.array(fluxes) * F * (1 - f_tidal)
    ang = rng.uniform(0, 2 * np.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    w1, w2 = fluxes[0], fluxes[1]
    pos = [(cx - sep * w2 / (w1 + w2) * ca, cy - sep * w2 / (w1 + w2) * sa),
           (cx + sep * w1 / (w1 + w2) * ca, cy + sep * w1 / (w1 + w2) * sa)]
    if third:
        a3 = ang + rng.uniform(0.6, 2.5) * rng.choice([-1, 1])
        d3 = rng.uniform(4.0, 12.0)
        pos.append((cx + d3 * math.cos(a3), cy + d3 * math.sin(a3)))
    spin = rng.choice([-1.0, 1.0])
    for j, (f, (x, y)) in enumerate(zip(fluxes, pos)):
        r_e = R * math.sqrt(f / F) * rng.uniform(0.9, 1.3)
        if rng.random() < 0.5:   # spheroid
            sc.add("old", _sersic(rng.uniform(2.0, 4.0), r_e, f, rng.uniform(0.6, 1.0),
                                  rng.uniform(0, np.pi), x, y))
        else:                    # disk with a small bulge
            d = _Disk(x, y, rng.uniform(0, np.pi), rng.uniform(0.35, 1.0))
            sc.add("disk", d.place(galsim.Exponential(half_light_radius=r_e, flux=0.85 * f,
                                                      gsparams=_gsparams())))
            sc.add("old", _sersic(2.5, 0.25 * r_e, 0.15 * f, 0.9, 0.0, x, y))
    # tidal tails from the two main bodies (anti-parallel for a prograde encounter),
    # a bridge between them, sometimes a common diffuse envelope
    parts = []
    for j in range(2):
        if rng.random() < 0.8 or j == 0:
            parts.append(("tail", j))
    if rng.random() < 0.45:
        parts.append(("bridge", 0))
    if rng.random() < 0.3:
        parts.append(("halo", 0))
    share = rng.dirichlet(np.ones(len(parts)) * 3)
    for (kind, j), sh in zip(parts, share):
        f = F * f_tidal * sh
        if kind == "tail":
            x, y = pos[j]
            away = ang + (np.pi if j == 0 else 0.0) + rng.normal(0, 0.5)
            length = max(sep, 2 * R) * rng.uniform(0.9, 2.0)
            _chain(sc, "disk", rng, x, y, away, length, spin * rng.uniform(0.8, 2.4),
                   0.7, rng.uniform(1.5, 2.8), f, n=45, fade=0.6)
        elif kind == "bridge":
            (x0, y0), (x1, y1) = pos[0], pos[1]
            head = math.atan2(y1 - y0, x1 - x0)
            bend = rng.uniform(-0.6, 0.6)
            _chain(sc, "disk", rng, x0, y0, head - bend / 2, math.hypot(x1 - x0, y1 - y0) * 1.05,
                   bend, 0.9, 0.9, f, n=25, fade=0.0)
        else:
            sc.add("disk", _sersic(1.0, max(sep, 2 * R) * 0.9, f, rng.uniform(0.5, 1.0), ang, cx, cy))


# ---------------------------------------------------------------------- one galaxy
def _render(label, size, prng, nrng, pxscale=None, offset=(0.0, 0.0)):
    """Render one galaxy. prng draws everything physical, nrng the noise.

    Returns (uint8 image (size, size, 3), pxscale, redshift).
    """
    label = int(label)
    double = prng.random() < DOUBLE_SCALE_FRACTION
    if pxscale is None:
        pxscale = (2 if double else 1) * NATIVE_PXSCALE * NATIVE_SIZE / size
    pxscale = float(pxscale)
    big = pxscale * size > 1.5 * NATIVE_PXSCALE * NATIVE_SIZE
    # common, class-independent physical draws
    R0 = math.exp(prng.uniform(math.log(3.5), math.log(11.0))) * (1.8 if big else 1.0)
    R = R0 * _SIZE_MULT[label]
    # total r-band flux (nanomaggies) from the size and a mean surface brightness within
    # the half-light radius (mu_e, mag/arcsec^2): bigger galaxies are brighter, as in a
    # real size-luminosity relation; both draws are the same for every class
    mu_e = prng.uniform(21.0, 23.0)
    F = 2.0 * math.pi * R0 ** 2 * 10 ** ((22.5 - mu_e) / 2.5)
    fwhm = prng.uniform(1.0, 1.5)
    beta = prng.uniform(2.8, 4.5)
    pa = prng.uniform(0, np.pi)
    cx, cy = np.clip(prng.normal(0, 0.7, 2), -2.0, 2.0)
    cx, cy = float(cx + offset[0]), float(cy + offset[1])
    cols = {"old": _colour(prng, (0.75, 0.95), (0.4, 0.55)),
            "disk": _colour(prng, (0.5, 0.7), (0.3, 0.45)),
            "young": _colour(prng, (0.15, 0.45), (0.0, 0.3))}
    sc = _Scene(size, pxscale, fwhm, beta)
    if label in (2, 3, 4):
        _build_smooth(sc, prng, F, R, cx, cy, pa, cols, label)
    elif label in (8, 9):
        _build_edge_on(sc, prng, F, R, cx, cy, pa, cols, with_bulge=(label == 9))
    elif label == 5:
        _build_spiral(sc, prng, F, R, cx, cy, pa, cols, "barred")
    elif label == 6:
        _build_spiral(sc, prng, F, R, cx, cy, pa, cols, "tight")
    elif label == 7:
        _build_spiral(sc, prng, F, R, cx, cy, pa, cols, "loose")
    elif label == 0:
        _build_disturbed(sc, prng, F, R, cx, cy, pa, cols)
    elif label == 1:
        _build_merging(sc, prng, F, R, cx, cy, pa, cols)
    else:
        raise ValueError(f"label must be 0-{NUM_CLASSES - 1}, got {label}")
    half = sc.half_frame
    # Faint background galaxies anywhere in the frame and, in ~15% of images, an unrelated
    # neighbour (star or small galaxy). Drawn as numpy maps: shifted far from the centre,
    # they would make GalSim's FFTs much larger.
    nbg = prng.poisson(2.0)
    if nbg:
        sc.group("bg", _colour(prng, (0.6, 1.2), (0.3, 0.8)))
        for _ in range(nbg):
            x, y = prng.uniform(-0.95 * half, 0.95 * half, 2)
            sc.add_sersic_map("bg", 1.0, prng.uniform(0.3, 1.0), 10 ** ((22.5 - prng.uniform(20.0, 22.5)) / 2.5),
                              prng.uniform(0.4, 1.0), prng.uniform(0, np.pi), x, y)
    if prng.random() < NEIGHBOUR_FRACTION:
        a = prng.uniform(0, 2 * np.pi)
        dist = prng.uniform(0.5, 0.88) * half
        x, y = cx + dist * math.cos(a), cy + dist * math.sin(a)
        x, y = float(np.clip(x, -0.92 * half, 0.92 * half)), float(np.clip(y, -0.92 * half, 0.92 * half))
        if prng.random() < 0.55:   # a star: a point source, i.e. the PSF
            sc.group("nb", _colour(prng, (0.3, 1.4), (0.0, 0.9)))
            sc.add_blobs("nb", x, y, 0.0, 10 ** ((22.5 - prng.uniform(15.0, 19.5)) / 2.5))
        else:
            sc.group("nb", _colour(prng, (0.3, 0.9), (0.15, 0.5)))
            sc.add_sersic_map("nb", prng.uniform(1.0, 4.0), prng.uniform(0.6, 2.0),
                              10 ** ((22.5 - prng.uniform(16.5, 19.5)) / 2.5),
                              prng.uniform(0.3, 1.0), prng.uniform(0, np.pi), x, y)
    bands = sc.render()
    sky = _SKY_SIGMA * prng.uniform(0.7, 1.4) * (NATIVE_PXSCALE / pxscale)
    bands = bands + nrng.standard_normal(bands.shape) * sky[:, None, None]
    img = grz_to_rgb(bands[0], bands[1], bands[2])
    # redshift consistent with the angular size and a physical half-light radius
    z = 0.0
    for _ in range(12):
        kpc = 10 ** prng.normal(0.75, 0.2)
        z = _redshift_for_scale(kpc / R0)
        if 0.01 <= z <= 0.15:
            break
    z = float(np.clip(z, 0.01, 0.15))
    return img, pxscale, z


def _redshift_for_scale(kpc_per_arcsec: float) -> float:
    """Invert kpc/arcsec = D_A(z) * 4.848e-3 with D_A ~ (c/H0) z / (1+z)^1.5 (h = 0.7)."""
    target = kpc_per_arcsec / (4283.0 * 4.848e-3)
    z = target
    for _ in range(20):
        z = target * (1 + z) ** 1.5
        if z > 5:
            break
    return z


def grz_to_rgb(g: np.ndarray, r: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Legacy-Survey-style colour image from g, r, z in nanomaggies per 0.262" pixel.

    Each band is multiplied by its scale, the mean of the three (positive) planes sets an
    asinh stretch applied equally to all planes (colours are preserved up to saturation),
    z -> R, r -> G, g -> B. Returns uint8 (H, W, 3).
    """
    planes = np.stack([z * _RGB_SCALE["z"], r * _RGB_SCALE["r"], g * _RGB_SCALE["g"]], axis=-1)
    inten = np.maximum(planes, 0.0).mean(axis=-1)
    q = _ASINH_Q
    with np.errstate(divide="ignore", invalid="ignore"):
        fac = np.where(inten > 1e-9, np.arcsinh(q * inten) / (math.sqrt(q) * inten), math.sqrt(q))
    rgb = np.clip(planes * fac[..., None], 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------- public API
def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16 pixels, got {size!r}")
    return int(size)


def render_galaxy(label: int, size: int, rng: np.random.Generator,
                  pxscale: float | None = None) -> np.ndarray:
    """Render one galaxy of class `label` as a uint8 (size, size, 3) Legacy-Survey-like image.

    `pxscale` (arcsec/px) defaults to the Galaxy10 field of view, 0.262 * 256 / size (or
    twice that for ~5% of draws). All randomness comes from `rng`.
    """
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be an integer 0-{NUM_CLASSES - 1}, got {label!r}")
    size = _check_size(size)
    if pxscale is not None and not (np.isfinite(pxscale) and pxscale > 0):
        raise ValueError(f"pxscale must be a positive number of arcsec/px, got {pxscale!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0))")
    return _render(label, size, rng, rng, pxscale)[0]


def _resolve_fractions(class_fractions):
    if class_fractions is None:
        return np.array(_galaxy10_fractions(), dtype=float)
    try:
        f = np.asarray(class_fractions, dtype=float).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"class_fractions must be {NUM_CLASSES} numbers, got {class_fractions!r}") from None
    if f.size != NUM_CLASSES:
        raise ValueError(f"class_fractions must have {NUM_CLASSES} entries (one per class), got {f.size}")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"class_fractions must be finite and non-negative, got {f.tolist()}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"class_fractions must sum to 1, got sum {f.sum():.6g}")
    return f


def _plan(n, seed, fractions, duplicate_fraction):
    """Labels, rendered morphology, duplicate sources and sky positions (main process only)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    # exact class counts by largest remainder, then a seeded shuffle
    raw = fractions * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.lexsort((np.arange(NUM_CLASSES), -(raw - counts)))
    counts[order[:rest]] += 1
    ans = rng.permutation(np.repeat(np.arange(NUM_CLASSES), counts))
    morph = ans.copy()
    src = np.arange(n)
    # sky: a patch of the DECaLS footprint
    ra = rng.uniform(110.0, 260.0, n)
    sd = rng.uniform(math.sin(math.radians(-10.0)), math.sin(math.radians(32.0)), n)
    dec = np.degrees(np.arcsin(sd))
    offsets = np.zeros((n, 2))
    n_dup = int(round(duplicate_fraction * n))
    if n_dup > 0 and n >= 2:
        n_dup = min(n_dup, n // 2)
        targets = rng.choice(n, size=n_dup, replace=False)
        is_target = np.zeros(n, bool)
        is_target[targets] = True
        pool = np.flatnonzero(~is_target)
        for t in targets:
            want = int(ans[t])
            # a third of the duplicates carry a label that conflicts with the original's
            if rng.random() < 0.33:
                cands = pool[np.isin(ans[pool], _CONFUSABLE[want])]
            else:
                cands = pool[ans[pool] == want]
            if cands.size == 0:
                cands = pool
            s = int(rng.choice(cands))
            src[t] = s
            morph[t] = morph[s]
            # same galaxy, cutout centred within 1 arcsec of the original
            r = rng.uniform(0.05, 0.95)
            a = rng.uniform(0, 2 * np.pi)
            dra, ddec = r * math.cos(a), r * math.sin(a)
            dec[t] = dec[s] + ddec / 3600.0
            ra[t] = ra[s] + dra / 3600.0 / math.cos(math.radians(dec[s]))
            offsets[t] = (-dra, -ddec)   # the galaxy appears shifted opposite to the cutout centre
    return ans.astype(np.uint8), morph, src, ra, dec, offsets


def _render_chunk(args):
    seed, size, start, morph, src, offsets = args
    k = len(morph)
    images = np.empty((k, size, size, 3), np.uint8)
    pxs = np.empty(k)
    zs = np.empty(k)
    for j in range(k):
        i = start + j
        prng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(src[j]), 0)))
        nrng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 1)))
        images[j], pxs[j], zs[j] = _render(int(morph[j]), size, prng, nrng,
                                           offset=(float(offsets[j, 0]), float(offsets[j, 1])))
    return start, images, pxs, zs


@contextmanager
def _single_threaded_children():
    """Worker processes started inside inherit one-thread BLAS/OpenMP settings (one process
    per core; nested thread pools only fight over the cores). The caller's own environment
    is restored afterwards, and variables the user set are left alone."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    added = [k for k in keys if k not in os.environ]
    for k in added:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def generate(n: int, size: int, seed: int, workers: int = 1, class_fractions=None,
             duplicate_fraction: float = 0.003, progress=None) -> dict:
    """Synthesise a Galaxy10-DECaLS-like catalog in astroNN's format.

    Returns ``{"images": uint8 (n, size, size, 3), "ans": uint8 (n,), "ra", "dec",
    "redshift", "pxscale": float64 (n,)}``. Class counts follow `class_fractions` (default:
    Galaxy10's) exactly up to rounding. About `duplicate_fraction` of the entries re-render
    another entry's galaxy at a sky position within 1" of it, a third of them with a
    conflicting label, as in the real Galaxy10. Galaxy i depends only on (seed, i), so the
    result is identical for any `workers`. `progress(done, total)` is called as chunks finish.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    size = _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not (isinstance(duplicate_fraction, (int, float, np.floating)) and 0.0 <= duplicate_fraction <= 0.5):
        raise ValueError(f"duplicate_fraction must be in [0, 0.5], got {duplicate_fraction!r}")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable(done, total) or None")
    n, seed, workers = int(n), int(seed), int(workers)
    fractions = _resolve_fractions(class_fractions)
    ans, morph, src, ra, dec, offsets = _plan(n, seed, fractions, float(duplicate_fraction))

    chunk = max(1, min(64, math.ceil(n / (workers * 4))))
    tasks = [(seed, size, s, morph[s:s + chunk], src[s:s + chunk], offsets[s:s + chunk])
             for s in range(0, n, chunk)]
    images = np.empty((n, size, size, 3), np.uint8)
    pxscale = np.empty(n)
    redshift = np.empty(n)
    done = 0

    def _store(res):
        nonlocal done
        start, im, px, z = res
        k = len(im)
        images[start:start + k] = im
        pxscale[start:start + k] = px
        redshift[start:start + k] = z
        done += k
        if progress is not None:
            progress(done, n)

    if workers == 1 or len(tasks) == 1:
        for t in tasks:
            _store(_render_chunk(t))
    else:
        ctx = multiprocessing.get_context("spawn")
        with _single_threaded_children():
            pool = ctx.Pool(min(workers, len(tasks)))
        with pool:
            for res in pool.imap_unordered(_render_chunk, tasks):
                _store(res)
    return {"images": images, "ans": ans, "ra": ra.astype(np.float64), "dec": dec.astype(np.float64),
            "redshift": redshift, "pxscale": pxscale}


def write_sample_sheet(path, n_per_class: int = 6, size: int = 128, seed: int = 0) -> None:
    """Write a PNG grid of synthetic galaxies: one row per class, labelled with its name."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = _check_size(size)
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
    cell = 1.25
    fig = Figure(figsize=(2.6 + cell * n_per_class, cell * NUM_CLASSES + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(NUM_CLASSES, n_per_class, left=2.5 / (2.6 + cell * n_per_class),
                            right=0.995, top=1 - 0.45 / (cell * NUM_CLASSES + 0.5), bottom=0.005,
                            wspace=0.03, hspace=0.03)
    for c in range(NUM_CLASSES):
        for k in range(n_per_class):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(c, k, 99)))
            img = render_galaxy(c, size, rng)
            ax = fig.add_subplot(grid[c, k])
            ax.imshow(img, interpolation="nearest", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(f"{c} {CLASS_NAMES[c]}", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"galcf_hpc synthetic Galaxy10-like galaxies ({size} px, seed {seed})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
