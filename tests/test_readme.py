"""The README's code cannot rot: every ```python block runs, in order, in one namespace (later blocks use what
earlier ones defined, as a reader would), and every `python -m bench.run …` command line it shows parses with
the current command line (the flags and their values exist)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_has_the_sections_users_look_for():
    for heading in ("## Quickstart", "## Use the solvers in your own project", "## Use in a diffusers pipeline",
                    "## Use from k-diffusion code", "### Benchmark your own model"):
        assert f"\n{heading}\n" in README, heading
    assert len(_blocks("python")) >= 6


def test_every_python_block_runs(monkeypatch):
    pytest.importorskip("diffusers", reason="the diffusers pipeline example needs diffusers (the test extra)")
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(_blocks("python")):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 — name the block that broke
            pytest.fail(f"README python block {i + 1} failed: {type(e).__name__}: {e}\n{code}")


def _bench_commands() -> list[list[str]]:
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            m = re.search(r"(?:python|torchrun .*?) -m bench\.run\b(.*)$", line)
            if m:
                out.append(shlex.split(m.group(1)))
    return out


def test_every_bench_run_command_line_parses():
    from bench import run as run_mod
    commands = _bench_commands()
    assert len(commands) >= 5
    for argv in commands:
        run_mod.build_parser().parse_args(argv)  # SystemExit (argparse's error) fails the test, naming the flag
