"""docs/config.md documents every configuration key, with its default."""

import dataclasses
import re
import typing
from pathlib import Path

from galcf_hpc.config import Config

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def config_keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", default


def test_every_config_key_is_documented_with_its_default():
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z0-9_.]+)` \|[^|]*(?:\\\|[^|]*)*\| `([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    keys = dict(config_keys())
    missing = sorted(set(keys) - set(rows))
    assert not missing, f"docs/config.md lacks {missing}"
    unknown = sorted(set(rows) - set(keys))
    assert not unknown, f"docs/config.md documents keys that do not exist: {unknown}"
    for key, default in keys.items():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        assert rows[key] == shown, f"{key}: docs say {rows[key]!r}, config.py {shown!r}"
