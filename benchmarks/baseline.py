"""An earlier commit of this repository checked out next to the working tree, so that a
benchmark can run the code before and after a change in the same run (same machine, same
load, same inputs)."""

import contextlib
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def worktree(rev):
    """Yields the path of a detached git worktree of ``rev`` (its own ``galcf_hpc``); removed
    on exit. Yields None when ``rev`` is None."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), rev], check=True)
        try:
            yield where
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], check=True)
