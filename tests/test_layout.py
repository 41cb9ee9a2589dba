"""The test folders are named like the packages they test (tests/solvers, tests/bench, tests/pretrained), so
each must be a package of ``tests``: a plain ``pytest`` (without ``python -m``, so without the repository root
on sys.path) otherwise puts tests/ first on sys.path and ``import solvers`` finds the empty test folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_every_test_folder_is_a_package():
    folders = [p for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders, "tests/ has subject folders"
    missing = [str(p.relative_to(TESTS)) for p in [TESTS, *folders] if not (p / "__init__.py").is_file()]
    assert not missing, f"add __init__.py to: {missing}"


@pytest.mark.slow
def test_plain_pytest_from_another_folder_imports_the_real_packages(tmp_path):
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--collect-only', "
            f"'{TESTS / 'solvers' / 'test_schedules.py'}']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
