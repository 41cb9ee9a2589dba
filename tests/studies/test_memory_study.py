"""bench.memory: the peak-memory study's command line and its report."""
from __future__ import annotations

import pytest

from bench.studies import memory


@pytest.mark.parametrize("argv", [["--samples", "1"], ["--samples", "10,x"], ["--batch-size", "0"]])
def test_bad_counts_are_refused_before_any_run(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        memory.main([*argv, "--out", str(tmp_path / "m.md")])
    assert e.value.code == 2 and not (tmp_path / "m.md").exists()


def test_the_report_shows_each_counts_peak_and_its_growth_over_the_first():
    rows = [{"samples": 1000, "peak_mb": 1300.0, "seconds": 6.0}, {"samples": 50000, "peak_mb": 1250.4, "seconds": 184.0}]
    page = memory.report(rows, batch_size=500, threads=2, command="python -m bench.memory")
    assert "| 1,000 | 1300 | +0 | 6 |" in page and "| 50,000 | 1250 | -50 | 184 |" in page
    assert "`python -m bench.memory`" in page and "batch size 500" in page


@pytest.mark.slow
@pytest.mark.assets("resnet20_cifar")
def test_a_run_reports_its_peak_memory(tmp_path):
    row = memory.peak_rss(20, batch_size=10, threads=1, work=tmp_path)
    assert row["samples"] == 20 and 50 < row["peak_mb"] < 20_000 and row["seconds"] > 0
