"""The harness that runs diffusers' own scheduler tests against SolverScheduler
(``bench.studies.diffusers_conformance``): its swap, its reading of pytest's outcomes, its report, its errors.
The run itself needs a diffusers checkout and takes a minute; it writes reports/diffusers_conformance.md."""
from __future__ import annotations

import subprocess

import pytest

diffusers = pytest.importorskip("diffusers")

from bench.studies import diffusers_conformance as C  # noqa: E402
from solvers.interop import SolverScheduler  # noqa: E402

JUNIT = """<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.schedulers.test_scheduler_ddim.DDIMSchedulerTest" name="test_steps_offset"/>
<testcase classname="tests.schedulers.test_scheduler_ddim.DDIMSchedulerTest" name="test_variance">
  <failure message="AttributeError: no _get_variance&#10;more">trace</failure></testcase>
<testcase classname="tests.schedulers.test_scheduler_euler.EulerDiscreteSchedulerTest" name="test_x">
  <skipped message="not supported"/></testcase>
</testsuite></testsuites>"""


def test_the_stand_in_is_solver_scheduler_from_the_reference_config():
    namespace: dict = {}
    exec(compile(C.CONFTEST, "conftest.py", "exec"), namespace)
    stand = namespace["stand_in"](diffusers.UniPCMultistepScheduler)
    sched = stand(solver_order=3, num_train_timesteps=500)
    assert type(sched) is SolverScheduler
    assert sched.solver.name == "unipc" and sched.solver.solver_order == 3
    assert sched.config.num_train_timesteps == 500
    assert stand.__name__ == "UniPCMultistepScheduler"
    assert type(stand.from_config(sched.config)) is SolverScheduler


def test_outcomes_are_read_from_junit_and_counted_per_file():
    results = C.parse_junit(JUNIT)
    assert [(r["file"], r["outcome"]) for r in results] == [
        ("test_scheduler_ddim.py", "passed"), ("test_scheduler_ddim.py", "failed"),
        ("test_scheduler_euler.py", "skipped")]
    assert results[1]["message"] == "AttributeError: no _get_variance"
    summary = C.summarise(results)
    assert summary["files"]["test_scheduler_ddim.py"] == {"passed": 1, "failed": 1}
    assert summary["total"] == {"passed": 1, "failed": 1, "skipped": 1}


def test_the_report_lists_counts_and_every_test_that_does_not_pass():
    results = C.parse_junit(JUNIT)
    meta = {"commit": "abc", "version": "0.42.1", "command": "python -m x", "seconds": 3.0, "machine": "m"}
    text = C.report(results, results, meta)
    assert "| test_scheduler_ddim.py | 1 | 1 | 0 | 0 | 1 / 2 |" in text
    assert ("| test_scheduler_ddim.py::DDIMSchedulerTest::test_variance | failed | private: calls diffusers' "
            "`_get_variance` | AttributeError: no _get_variance |") in text
    assert "test_steps_offset" not in text


def test_a_revision_the_repository_lacks_is_one_clear_error(tmp_path, capsys):
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    code = C.main(["--diffusers-repo", str(tmp_path / "repo" / ".git"), "--commit", "nope",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no revision 'nope'" in err[0]
    assert not (tmp_path / "out.md").exists()
