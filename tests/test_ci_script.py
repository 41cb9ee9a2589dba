""".ci/run runs the README's test command as a user gets it, then what that command leaves out.

A user who follows the Quickstart has the test extra and nothing else: no k-diffusion (not a dependency), maybe
no Chromium.  CI must run that same command in that same state — a CI that installs the optional peers first is
green while the user's run is red — and then, with the peers present, the tests that need them and the slow
tests that the default run deselects.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CI = (ROOT / ".ci" / "run").read_text()
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What a test file uses when its outcome depends on an optional peer being installed.
PEER_USES = ("load_peer(", "import_kdiffusion(", "load_k_diffusion_sampling(", "_has_kdiffusion(", "CHROMIUM")


def _commands() -> list[str]:
    """.ci/run's commands in order (comments and line continuations removed)."""
    text = re.sub(r"\\\n\s*", " ", CI)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _index(predicate) -> int:
    found = [i for i, c in enumerate(_commands()) if predicate(c)]
    assert found, _commands()
    return found[0]


def _readme_test_command() -> str:
    quickstart = README.split("## Quickstart", 1)[1]
    blocks = re.findall(r"^```bash\n(.*?)^```", quickstart, flags=re.S | re.M)
    return blocks[1].strip()


def test_the_first_pytest_is_the_readmes_command_with_the_peers_absent():
    install, tests = (part.strip() for part in _readme_test_command().split("&&"))
    commands = _commands()
    first_pytest = _index(lambda c: "pytest" in c and "pip" not in c)
    assert commands[first_pytest] == tests                    # exactly the README's command: no -m, no path
    assert _index(lambda c: c.startswith(install.replace("pip install", "python -m pip install"))) < first_pytest
    uninstall = _index(lambda c: "pip uninstall" in c and "k-diffusion" in c)
    assert uninstall < first_pytest                           # a peer left by an earlier run is removed first
    assert _index(lambda c: "pip install" in c and "k-diffusion" in c) > first_pytest


def test_the_second_pass_runs_the_slow_and_peer_tests_with_the_peers_installed():
    commands = _commands()
    last = [c for c in commands if "pytest" in c and "pip" not in c][-1]
    words = shlex.split(last)
    assert words[:3] == ["python", "-m", "pytest"] and words[3:] == ["-m", "slow or peer"]
    assert _index(lambda c: "pip install" in c and "k-diffusion" in c) < commands.index(last)
    assert _index(lambda c: "chromium" in c and "install" in c) < commands.index(last)


def test_the_default_run_deselects_exactly_the_slow_tests():
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    addopts = shlex.split(options["addopts"])
    assert addopts[addopts.index("-m") + 1] == "not slow"
    declared = {m.split(":")[0] for m in options["markers"]}
    assert {"slow", "peer"} <= declared


def test_every_test_file_that_needs_an_optional_peer_marks_those_tests_peer():
    unmarked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text()
        if path.name == Path(__file__).name or not any(use in text for use in PEER_USES):
            continue
        if "pytest.mark.peer" not in text:
            unmarked.append(str(path.relative_to(ROOT)))
    assert not unmarked, f"mark the tests that need k-diffusion or Chromium with @pytest.mark.peer: {unmarked}"
