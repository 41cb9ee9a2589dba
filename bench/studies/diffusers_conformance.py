"""diffusers' own scheduler tests, run against ``SolverScheduler`` with only the scheduler swapped.

    python -m bench.studies.diffusers_conformance --diffusers-repo PATH/TO/diffusers [--commit REV] [--baseline]

The test files of ``tests/schedulers/`` (``SchedulerCommonTest`` and the files for DDIM, DDPM,
DPMSolverMultistep, UniPC, Euler, Heun and DEIS) are copied from a diffusers git checkout at ``--commit`` into a
temporary folder, unchanged, with the modules they import.  A ``conftest.py`` there replaces each test class's
``scheduler_classes`` by stand-ins: ``Stand(**cfg)`` is ``SolverScheduler.from_config(Reference(**cfg).config)``
(the method read from the config), and the stand-in's ``from_config``/``from_pretrained`` are SolverScheduler's.
diffusers' assertions and expected numbers are untouched.  ``--baseline`` runs the same copies without the swap
(diffusers' own schedulers), to show that a failure is ours and not the environment's.

Writes ``OUT.md`` (per-file counts, every test that does not pass with the first line of its failure, the
diffusers commit and version, the command, the machine) and ``OUT.json`` with the same for programs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from bench.results import atomic_write_text
from bench.studies.common import machine_description

FILES = ("test_scheduler_ddim.py", "test_scheduler_ddpm.py", "test_scheduler_dpm_multi.py",
         "test_scheduler_unipc.py", "test_scheduler_euler.py", "test_scheduler_heun.py", "test_scheduler_deis.py")
SUPPORT = ("tests/__init__.py", "tests/testing_utils.py", "tests/others/__init__.py", "tests/others/test_utils.py",
           "tests/schedulers/__init__.py", "tests/schedulers/test_schedulers.py")
ROOT = Path(__file__).resolve().parents[2]
# Why a test does not pass, where the reason is known: (file, test name) → reason.  A test listed here that
# passes, or a failure not listed, shows up as such in the report.
EXPLAINED = {
    ("test_scheduler_ddim.py", "test_variance"): "private: calls diffusers' `_get_variance`",
    ("test_scheduler_ddpm.py", "test_variance"): "private: calls diffusers' `_get_variance`",
    ("test_scheduler_ddim.py", "test_betas"): "refused: beta_end=2 gives β > 1 and ᾱ < 0 (diffusers accepts it)",
    ("test_scheduler_ddpm.py", "test_betas"): "refused: beta_end=2 gives β > 1 and ᾱ < 0 (diffusers accepts it)",
    ("test_scheduler_ddpm.py", "test_timesteps"): "refused: num_train_timesteps=1 (a discrete schedule needs 2 steps)",
    ("test_scheduler_ddpm.py", "test_variance_type"): "refused: variance_type='other' is no variance diffusers defines",
    ("test_scheduler_dpm_multi.py", "test_solver_order_and_type"):
        "method missing: DPM-Solver and SDE-DPM-Solver in noise prediction (algorithm_type dpmsolver/sde-dpmsolver)",
    ("test_scheduler_euler.py", "test_custom_timesteps"):
        "refused: interpolation_type='log_linear' (diffusers pairs steps + 1 log-spaced σ with steps timesteps)",
    ("test_scheduler_euler.py", "test_karras_sigmas"):
        "refused: sigma_max=700 is above the schedule's largest σ (the network would run outside its training)",
    ("test_scheduler_ddpm.py", "test_full_loop_with_noise"):
        "rounding: the expected sum carries diffusers' float32 ᾱ table (ours is float64; 5e-5 relative)",
    ("test_scheduler_euler.py", "test_full_loop_with_noise"):
        "rounding: expected sum to 1e-2 of 57,063 (2e-7 relative), below diffusers' float32 σ rounding",
    ("test_scheduler_heun.py", "test_full_loop_with_noise"):
        "rounding: expected sum to 1e-2 of 75,075 (1e-7 relative), below diffusers' float32 σ rounding",
}

CONFTEST = '''
import pytest
from solvers.interop import SolverScheduler

_STANDS = {}


def stand_in(reference):
    """SolverScheduler built from ``reference``'s config, in the place of ``reference``."""
    if reference not in _STANDS:
        def build(cls, *args, **cfg):
            return SolverScheduler.from_config(reference(*args, **cfg).config)
        _STANDS[reference] = type(reference.__name__, (SolverScheduler,), {
            "__new__": build,
            "from_config": classmethod(lambda cls, *a, **k: SolverScheduler.from_config(*a, **k)),
            "from_pretrained": classmethod(lambda cls, *a, **k: SolverScheduler.from_pretrained(*a, **k)),
        })
    return _STANDS[reference]


@pytest.fixture(autouse=True)
def _swap(request):
    cls = request.cls
    original = getattr(cls, "scheduler_classes", None) if cls is not None else None
    if original:
        cls.scheduler_classes = tuple(stand_in(c) for c in original)
    yield
    if original:
        cls.scheduler_classes = original
'''


class ConformanceError(Exception):
    """A bad repository path or revision (one line)."""


def copy_tests(repo: Path, commit: str, dest: Path) -> str:
    """Copy the test files at ``commit`` of the diffusers git dir ``repo`` into ``dest``; return the full hash."""
    git = ["git", "--git-dir", str(repo)]
    found = subprocess.run(git + ["rev-parse", "--verify", f"{commit}^{{commit}}"], capture_output=True, text=True)
    if found.returncode != 0:
        raise ConformanceError(f"{repo} has no revision {commit!r} (give --diffusers-repo a diffusers git directory "
                               "and --commit one of its revisions)")
    full = found.stdout.strip()
    for rel in SUPPORT + tuple(f"tests/schedulers/{f}" for f in FILES):
        text = subprocess.run(git + ["show", f"{full}:{rel}"], capture_output=True, text=True)
        if text.returncode != 0:
            raise ConformanceError(f"{rel} is missing at {full[:12]} of {repo}")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text.stdout)
    return full


def run_pytest(dest: Path, swap: bool, timeout: float) -> list[dict]:
    """Run the copied scheduler tests (with the swap or without); one dict per test: file, name, outcome, message."""
    conftest = dest / "tests" / "schedulers" / "conftest.py"
    if swap:
        conftest.write_text(CONFTEST)
    elif conftest.exists():
        conftest.unlink()
    xml = dest / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}",
           "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning"] + \
          [f"tests/schedulers/{f}" for f in FILES]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=timeout, env=env)
    return parse_junit(xml.read_text())


def parse_junit(text: str) -> list[dict]:
    """Outcomes from pytest's junit XML."""
    out = []
    for case in ET.fromstring(text).iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:200] \
                    if (node.get("message") or node.text) else ""
                break
        file = case.get("classname", "").split(".")[-2] + ".py" if "." in case.get("classname", "") else "?"
        out.append({"file": file, "test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                    "outcome": outcome, "message": message})
    return out


def summarise(results: list[dict]) -> dict:
    """Per-file counts of each outcome, and the totals."""
    files: dict = {}
    for r in results:
        files.setdefault(r["file"], Counter())[r["outcome"]] += 1
    total = Counter(r["outcome"] for r in results)
    return {"files": {f: dict(c) for f, c in sorted(files.items())}, "total": dict(total)}


def report(swapped: list[dict], baseline: list[dict] | None, meta: dict) -> str:
    """The markdown report."""
    lines = ["# diffusers' scheduler tests against SolverScheduler", "",
             f"diffusers tests at commit `{meta['commit']}`; installed diffusers {meta['version']}.  "
             f"Command: `{meta['command']}` ({meta['seconds']:.0f} s).  {meta['machine']}", "",
             "| file | passed | failed | errors | skipped | baseline (diffusers' own) passed / run |",
             "|---|---|---|---|---|---|"]
    ours, base = summarise(swapped)["files"], summarise(baseline)["files"] if baseline else {}
    for f, c in ours.items():
        b = base.get(f, {})
        ran = sum(v for k, v in b.items() if k != "skipped")
        base_cell = f"{b.get('passed', 0)} / {ran}" if b else "—"
        lines.append(f"| {f} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('error', 0)} | "
                     f"{c.get('skipped', 0)} | {base_cell} |")
    t = summarise(swapped)["total"]
    lines += [f"| **total** | {t.get('passed', 0)} | {t.get('failed', 0)} | {t.get('error', 0)} | "
              f"{t.get('skipped', 0)} | |", "", "## Tests that do not pass", "",
              "| test | outcome | why | first line |", "|---|---|---|---|"]
    for r in swapped:
        if r["outcome"] in ("failed", "error"):
            msg = r["message"].replace("|", "\\|")
            why = _explanation(r) or "**not explained**"
            lines.append(f"| {r['file']}::{r['test']} | {r['outcome']} | {why} | {msg} |")
    return "\n".join(lines) + "\n"


def _explanation(result: dict) -> str:
    """The known reason a test does not pass (by file and test name, whatever its class), or ''."""
    return EXPLAINED.get((result["file"], result["test"].split("::")[-1]), "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.studies.diffusers_conformance",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--diffusers-repo", type=Path, required=True, help="a diffusers git directory (a clone's .git)")
    p.add_argument("--commit", default="HEAD", help="the revision whose tests run (default HEAD)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "diffusers_conformance",
                   help="report path without suffix: writes OUT.md and OUT.json")
    p.add_argument("--baseline", action="store_true", help="also run the tests on diffusers' own schedulers")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import diffusers
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            commit = copy_tests(args.diffusers_repo, args.commit, Path(tmp))
        except ConformanceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"running diffusers' scheduler tests at {commit[:12]} against SolverScheduler ...", file=sys.stderr)
        swapped = run_pytest(Path(tmp), True, args.timeout)
        baseline = run_pytest(Path(tmp), False, args.timeout) if args.baseline else None
    meta = {"commit": commit, "version": diffusers.__version__, "seconds": time.time() - start,
            "command": "python -m bench.studies.diffusers_conformance " + " ".join(argv or sys.argv[1:]),
            "machine": machine_description()}
    atomic_write_text(args.out.with_suffix(".md"), report(swapped, baseline, meta))
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(
        {**meta, "swapped": swapped, "baseline": baseline, "summary": summarise(swapped)}, indent=1))
    print(f"wrote {args.out.with_suffix('.md')}: {summarise(swapped)['total']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
