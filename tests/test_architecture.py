"""The layering contract (pyproject.toml, docs/ARCHITECTURE.md) holds, and it catches what it is for.

`make test` runs `lint-imports` on the tree before the tests; these tests prove the contract fails on an upward
import (an import inside a function too: such an import is a cycle held apart, not a cure) and on a cycle between
sibling modules, by planting each in a copy of the package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra has it)")


def _lint(src: Path) -> subprocess.CompletedProcess:
    """lint-imports with pyproject's contracts, on the package found first under `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of src/pocketlm to plant bugs in."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "src" / "pocketlm", src / "pocketlm", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _planted(tree: Path, rel: str, line: str):
    """Append `line` to the module at `rel` for one check; restore it after."""
    path = tree / "pocketlm" / rel
    text = path.read_text()

    class _Plant:
        def __enter__(self):
            path.write_text(text + "\n" + line + "\n")

        def __exit__(self, *exc):
            path.write_text(text)

    return _Plant()


def test_the_tree_keeps_the_contract():
    r = _lint(ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BROKEN" not in r.stdout


def test_an_upward_import_breaks_it(tree):
    """(The unplanted tree keeps the contract, above; so this failure is the plant's, read from the copy.)"""
    with _planted(tree, "core/units.py", "from pocketlm.report import gates  # planted"):
        r = _lint(tree)
    assert r.returncode != 0
    assert "pocketlm.core is not allowed to import pocketlm.report" in r.stdout


def test_an_upward_import_inside_a_function_breaks_it(tree):
    with _planted(tree, "models/moe.py", "def _dodge():\n    from pocketlm.eval import perplexity  # planted"):
        r = _lint(tree)
    assert r.returncode != 0
    assert "pocketlm.models is not allowed to import pocketlm.eval" in r.stdout


def test_a_cycle_between_siblings_breaks_it(tree):
    # eval.perplexity imports eval.loglik; the plant closes the circle inside one layer
    with _planted(tree, "eval/loglik.py", "def _dodge():\n    from pocketlm.eval import perplexity  # planted"):
        r = _lint(tree)
    assert r.returncode != 0
    assert "No cycles are allowed in pocketlm.eval" in r.stdout
