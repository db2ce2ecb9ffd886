"""The floors stay one-way: import-linter and ruff catch what a reviewer would miss.

Each test lints a copy of the package (galcf_hpc/ + .importlinter + ruff.toml) in a
temporary directory, so a planted violation never touches the tree.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
FLOORS = "Floors: a module imports only from floors below it"
JUDGES = "trained-against-vs-judged-by"


@pytest.fixture
def copy(tmp_path):
    shutil.copytree(REPO / "galcf_hpc", tmp_path / "galcf_hpc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in (".importlinter", "ruff.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def _plant(path, line):
    """Add ``line`` after the module's imports (before its first definition)."""
    text = path.read_text()
    first_def = min(i for i in (text.find("\ndef "), text.find("\nclass ")) if i >= 0)
    path.write_text(text[:first_def] + "\n" + line + "\n" + text[first_def:])


def _lint_imports(root, *args):
    # PYTHONPATH first, so grimp analyses the copy and not the installed (editable) tree;
    # a wide terminal, so rich does not wrap contract names.
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="250")
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def _ruff(root, *args):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_import_contracts(copy):
    result = _lint_imports(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_floors_contract(copy):
    _plant(copy / "galcf_hpc/model/gmm.py", "from ..catalog import store  # noqa: F401")
    result = _lint_imports(copy)
    assert result.returncode != 0
    assert f"{FLOORS} (docs/architecture.md) BROKEN" in result.stdout
    assert "galcf_hpc.model is not allowed to import galcf_hpc.catalog" in result.stdout
    assert "galcf_hpc.model.gmm -> galcf_hpc.catalog.store" in result.stdout


def test_the_model_may_not_import_a_judge(copy):
    _plant(copy / "galcf_hpc/model/gmm.py", "from ..judges import load_judge  # noqa: F401")
    result = _lint_imports(copy, "--contract", JUDGES)
    assert result.returncode != 0
    assert "Trained against is not judged by" in result.stdout and "BROKEN" in result.stdout
    assert "galcf_hpc.model.gmm -> galcf_hpc.judges" in result.stdout


def test_training_may_not_import_a_judge_module_nor_the_old_baseline(copy):
    judge = sorted(p.stem for p in (copy / "galcf_hpc/judges").glob("*.py") if p.stem != "__init__")[0]
    _plant(copy / "galcf_hpc/train/checkpoint.py", f"from ..judges import {judge}  # noqa: F401")
    result = _lint_imports(copy, "--contract", JUDGES)
    assert result.returncode != 0
    assert "galcf_hpc.train.checkpoint -> galcf_hpc.judges" in result.stdout

    # baseline/ moved into judges/; should it come back, training still may not use it.
    baseline = copy / "galcf_hpc/baseline"
    baseline.mkdir()
    (baseline / "__init__.py").write_text("from .cnn import predict  # noqa: F401\n")
    (baseline / "cnn.py").write_text("def predict():\n    pass\n")
    _plant(copy / "galcf_hpc/train/checkpoint.py", "from .. import baseline  # noqa: F401")
    result = _lint_imports(copy, "--contract", JUDGES)
    assert result.returncode != 0
    assert "galcf_hpc.baseline.cnn" in result.stdout


def test_a_style_error_fails_ruff(copy):
    target = "galcf_hpc/model/gmm.py"
    clean = _ruff(copy, "check", "--no-cache", target)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    _plant(copy / target, "import os")
    result = _ruff(copy, "check", "--no-cache", target)
    assert result.returncode != 0
    assert "F401" in result.stdout and "gmm.py" in result.stdout
