"""Text from a model card (its name, description, notes) reaches the report as text: escaped in report.md and
report.html, never markup, and never mathtext for the charts."""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import run as run_mod
from bench.report import build_report

HOSTILE_NAME = r"$\frac{1}{0}^{x$ <b>bold</b>"
HOSTILE = {"name": HOSTILE_NAME, "description": "<script>alert(1)</script> **not bold** [link](http://x) `code`",
           "notes": "<img src=x onerror=alert(1)>\n# not a heading\n| not | a table |"}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("card_text") / "gmm2d"
    assert run_mod.main(["--quiet", "--no-report", "--out", str(out), "--model", "gmm2d", "--num-samples", "16",
                         "--steps", "2,4", "--solvers", "ddim", "--metric", "ode_error"]) == 0
    torch.set_num_threads(threads)
    return out


def _with_card_text(src: Path, dst: Path) -> Path:
    """A copy of the run whose card text (and results' model name) is ``HOSTILE``."""
    shutil.copytree(src, dst)
    info = json.loads((dst / "reference.json").read_text())
    info["card"].update(HOSTILE)
    (dst / "reference.json").write_text(json.dumps(info))
    df = pd.read_csv(dst / "results.csv")
    df["model"] = HOSTILE_NAME
    df.to_csv(dst / "results.csv", index=False)
    return dst


def test_card_text_is_escaped_in_both_reports_and_the_charts_draw_it(small_run, tmp_path):
    md_path, html_path = build_report(_with_card_text(small_run, tmp_path / "r"), quiet=True)
    md, page = md_path.read_text(), html_path.read_text()
    for raw in ("<script>", "<img src=x", "<b>bold", "](http://x)"):
        assert raw not in page or raw == "](http://x)", raw  # in the page, the text as written (no link)
        assert not re.search(r"(?<!\\)" + re.escape(raw), md), raw  # only its escaped form (\<script…)
    assert "<a href" not in page
    assert "\n# not a heading" not in md and "\n| not |" not in md  # a line break in card text starts nothing
    assert r"\<script\>alert(1)\</script\> \*\*not bold\*\* \[link\](http://x) \`code\`" in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt; **not bold** [link](http://x) `code`" in page
    assert "&lt;img src=x onerror=alert(1)&gt; # not a heading | not | a table |" in page
    assert r"# Sampler benchmark: \$\\frac{1}{0}^{x\$ \<b\>bold\</b\>" in md
    assert "<title>Sampler benchmark: $\\frac{1}{0}^{x$ &lt;b&gt;bold&lt;/b&gt;</title>" in page
    assert list((tmp_path / "r" / "figures").glob("ode_error_vs_*.png"))


@pytest.mark.parametrize("text", ["a_b *c* `d` <e> & [f](g) | h \\ i $j$ ~k~ !l", "snake_case_name", "x\ny"])
def test_md_text_renders_as_the_same_plain_text_in_html(text):
    from bench.report_doc import Doc, md_text
    doc = Doc()
    doc.p(md_text(text))
    page = doc.html(Path("."), "t")
    assert f"<p>{html.escape(' '.join(text.split()), quote=False)}</p>" in page.replace("&#x27;", "'").replace(
        "&quot;", '"')


def test_a_code_block_cannot_be_closed_by_its_text():
    from bench.report_doc import Doc
    doc = Doc()
    doc.code("python -m bench.run --out 'a\n```\n<script>x</script>'")
    md = doc.markdown()
    fence = md.split("\n", 1)[0]
    assert len(fence) > 3 and set(fence) == {"`"} and md.rstrip().endswith(fence)
