"""report.html in a real browser: headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) loads the
page at 1400 px width; every image must have loaded, the sections must be there in order with the answer
first, sample-panel titles must show at ≥ 10 px, and a screenshot of the top of the page is saved."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import torch

from bench import charts
from bench import run as run_mod

WIDTH = 1400
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = [pytest.mark.peer,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found on PATH (install Debian's `chromium`: "
                                 "`apt-get install -y chromium`; .ci/run installs it where absent)")]

# Collects, once the page has loaded, each image's load state and its natural and shown widths, and the
# headings, into a <pre> that --dump-dom prints.
PROBE = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {complete: i.complete, natural: i.naturalWidth, shown: i.clientWidth, alt: i.alt}; });
  var heads = Array.from(document.querySelectorAll('h1,h2,h3')).map(function (h) {
    return h.tagName + ' ' + h.textContent; });
  var pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs: imgs, heads: heads}); document.body.appendChild(pre); });
</script>"""


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--hide-scrollbars", f"--window-size={WIDTH},2400", *args]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root (CI containers)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("browser") / "gmm2d"
    try:
        assert run_mod.main(["--quiet", "--out", str(out), "--model", "gmm2d", "--num-samples", "100",
                             "--solvers", "ddim,heun", "--steps", "1,2,10", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "report.html"


def test_report_html_loads_every_image_and_section_in_chromium(report_html, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(report_html.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri()).stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, f"the page did not finish loading: {dom[-500:]!r}"
    probe = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    imgs = probe["imgs"]
    assert len(imgs) == 6 + 2  # 3 metrics × (time, NFE) + one sample figure per solver
    assert all(i["complete"] and i["natural"] > 0 and i["shown"] > 0 for i in imgs), imgs
    h2 = [h[3:] for h in probe["heads"] if h.startswith("H2 ")]
    assert h2[0] == "Recommendation"
    order = ["Recommendation", "Setup", "Model", "Metrics", "Results", "Charts", "Observations", "Samples",
             "Environment"]
    assert [h for h in h2 if h in order] == order
    assert {"H3 Best cell per budget", "H3 Pareto set among usable cells", "H3 Diverged cells"} <= set(probe["heads"])
    panels = [i for i in imgs if "the first samples" in i["alt"]]
    for i in panels:  # panel titles as shown at this width, in CSS px
        assert charts.PANEL_TITLE_PT * charts.PANEL_DPI / 72 * i["shown"] / i["natural"] >= 10, i


def test_report_html_screenshot(report_html, tmp_path):
    shot = tmp_path / "report_top.png"
    _chromium(f"--screenshot={shot}", report_html.as_uri())
    assert shot.read_bytes()[:4] == b"\x89PNG"
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, WIDTH)
    assert pixels[..., :3].std() > 0.05  # text and figures, not a blank page
