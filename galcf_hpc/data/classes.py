"""The Galaxy10 DECaLS class table (astroNN labels 0-9) and its class counts."""

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
