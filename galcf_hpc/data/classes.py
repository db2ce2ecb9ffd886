"""The Galaxy10 DECaLS class table (astroNN labels 0-9), its class counts, the classes that
are confused with each other, and planted label noise along them."""

import numpy as np

CLASS_NAMES = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)

# Galaxy counts per class in Galaxy10_DECals.h5 (17736 galaxies).
GALAXY10_COUNTS = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)

NUM_CLASSES = len(CLASS_NAMES)


# Pairs of classes that a volunteer can mistake for each other, each for a reason of
# morphology (Galaxy10's labels are Galaxy Zoo vote fractions cut at thresholds, so
# neighbouring classes of a continuum are where real label errors sit). Symmetric; every
# class has at least one neighbour.
CONFUSABLE_PAIRS = (
    # axis ratio is a continuum: round and in-between are split at q ~ 0.8 by eye
    ("Round Smooth", "In-between Round Smooth"),
    # ... and in-between and cigar at q ~ 0.45
    ("In-between Round Smooth", "Cigar Shaped Smooth"),
    # a thin, smooth, featureless streak: an edge-on disc without a bulge or dust lane
    # looks like a cigar-shaped elliptical
    ("Cigar Shaped Smooth", "Edge-on without Bulge"),
    # bulge size is a continuum too, and a small bulge is lost in the disc's light
    ("Edge-on without Bulge", "Edge-on with Bulge"),
    # weak or foreshortened bars are missed, and a tight inner spiral can pass for a bar
    ("Barred Spiral", "Unbarred Tight Spiral"),
    # pitch angle is a continuum: tight and loose are thresholds on it
    ("Unbarred Tight Spiral", "Unbarred Loose Spiral"),
    # tidal features look alike whether the companion is visible (merging) or not (disturbed)
    ("Disturbed", "Merging"),
)


def _neighbour_table(pairs):
    index = {n: i for i, n in enumerate(CLASS_NAMES)}
    table = {c: set() for c in range(len(CLASS_NAMES))}
    for a, b in pairs:
        table[index[a]].add(index[b])
        table[index[b]].add(index[a])
    return {c: tuple(sorted(v)) for c, v in table.items()}


# class index -> the classes it is confusable with (CONFUSABLE_PAIRS as indices)
NEIGHBOURS = _neighbour_table(CONFUSABLE_PAIRS)


def plant_label_noise(labels, fraction, seed):
    """Move the labels of ``round(fraction * n)`` galaxies, drawn uniformly without
    replacement, each to a neighbouring class (:data:`NEIGHBOURS`, one drawn uniformly where
    a class has several). Returns ``(noisy labels int64 [n], indices of the moved galaxies,
    sorted)``. Deterministic per ``seed``; the draws are their own random stream, so adding
    noise to a synthetic catalog changes none of its images."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"the label-noise fraction must be in [0, 0.5), got {fraction!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be class indices 0-{NUM_CLASSES - 1}")
    # a stream apart from every stream of the renderers (they use seed with spawn keys (i, 0|1))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x6C6E, 0x6F6973)))
    moved = np.sort(rng.choice(labels.size, size=int(round(fraction * labels.size)), replace=False))
    noisy = labels.copy()
    for i in moved.tolist():
        options = NEIGHBOURS[int(labels[i])]
        noisy[i] = options[int(rng.integers(len(options)))]
    return noisy, moved


def class_fractions():
    """Galaxy10 DECaLS class proportions, summing to 1."""
    total = sum(GALAXY10_COUNTS)
    return tuple(c / total for c in GALAXY10_COUNTS)


def parse_class_list(text):
    """``all`` (or nothing), or class names or numbers separated by commas -> sorted class
    indices: the one way every command takes a list of classes (``--targets``)."""
    if text is None or str(text).strip() in ("", "all"):
        return list(range(NUM_CLASSES))
    classes = sorted({class_index(t.strip()) for t in str(text).split(",") if t.strip()})
    if not classes:
        raise ValueError("no class given; use all, or names or numbers separated by commas")
    return classes


def class_index(name):
    """Index of a class given its name (case-insensitive) or its number as a string."""
    if isinstance(name, int) or str(name).isdigit():
        idx = int(name)
        if 0 <= idx < NUM_CLASSES:
            return idx
    else:
        lowered = {n.lower(): i for i, n in enumerate(CLASS_NAMES)}
        if str(name).lower() in lowered:
            return lowered[str(name).lower()]
    raise ValueError(f"unknown class {name!r}; valid: 0-{NUM_CLASSES - 1} or one of {', '.join(CLASS_NAMES)}")
