"""bench.animate's command line: where it writes by default."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.studies import animate


@pytest.mark.slow
def test_the_default_output_is_runs_not_the_committed_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    committed = tmp_path / "reports" / "animation_gmm2d.gif"
    committed.write_bytes(b"committed")
    assert animate.main(["--model", "gmm2d", "--steps", "2", "--num-samples", "20", "--fps", "4"]) == 0
    gif, page = Path("runs/animation_gmm2d.gif"), Path("runs/animation_gmm2d.html")
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    assert "python -m bench.animate --model gmm2d --steps 2" in page.read_text()
    assert committed.read_bytes() == b"committed"  # the committed copy is untouched
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["animation_gmm2d.gif"]
    assert f"wrote {gif} and {page}" in capsys.readouterr().out
