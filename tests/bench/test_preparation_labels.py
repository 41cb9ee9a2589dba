"""Long preparation steps labelled: bench.run says on stderr what it is preparing (noise floor, the exact ODE,
reference statistics and whether they came from the cache, weights) before doing it, and torch-fidelity's
feature bar gets a description; --quiet says nothing."""
from __future__ import annotations

import io

import pytest
import torch_fidelity.utils as fidelity_utils

import pretrained
from bench import references, run as run_mod

SMALL = ["--model", "gmm2d", "--num-samples", "200", "--batch-size", "200", "--solvers", "ddim", "--steps", "2",
         "--no-report", "--repeats", "1"]


def test_the_analytic_preparation_is_announced_before_the_cells(tmp_path, capsys):
    assert run_mod.main(["--out", str(tmp_path / "a"), *SMALL]) == 0
    lines = capsys.readouterr().err.splitlines()
    floor = ("bench.run: noise floor of fd_data, swd: 10 fresh sets of 200 exact samples against 200 reference "
             "samples (not cached)")
    ode = ("bench.run: ode_error's reference: the exact probability-flow ODE from t = 1 to 0 for 200 start points "
           "(once per grid start and end, kept in memory)")
    cell = [i for i, ln in enumerate(lines) if "2 steps: NFE 2" in ln]
    assert lines.count(floor) == 1 and lines.count(ode) == 1 and len(cell) == 1
    assert lines.index(floor) < lines.index(ode) < cell[0]


def test_quiet_says_nothing_about_preparation(tmp_path, capsys):
    assert run_mod.main(["--quiet", "--out", str(tmp_path / "q"), *SMALL]) == 0
    assert capsys.readouterr().err == ""


def test_weights_loading_is_announced_for_trained_models(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_load(card, **kw):
        calls.append(card.name)  # bench.run loads by card (a card may come from a file or an import path)
        raise ValueError("stop here")  # the announcement comes before the loading

    monkeypatch.setattr(pretrained, "load", fake_load)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert run_mod.main(["--out", str(tmp_path / "m"), "--model", "ddpm_mnist", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert calls == ["ddpm_mnist"]
    assert err[0] == f"bench.run: loading ddpm_mnist's weights from {weights}"
    assert err[1] == "bench.run: error: cannot load ddpm_mnist: stop here"


def test_the_feature_extraction_bar_gets_a_description_and_it_is_put_back():
    plain = fidelity_utils.tqdm
    with references.labelled_bars("reference statistics (mnist-test, resnet20)"):
        bar = fidelity_utils.tqdm(total=3, desc="Processing samples", leave=False, file=io.StringIO())
        assert bar.desc == "reference statistics (mnist-test, resnet20)"
        bar.close()
    assert fidelity_utils.tqdm is plain
    with pytest.raises(RuntimeError), references.labelled_bars("x"):
        raise RuntimeError("a failure inside")
    assert fidelity_utils.tqdm is plain


def test_committed_weights_are_announced_as_committed(tmp_path, capsys):
    assert run_mod.main(["--out", str(tmp_path / "fm"), "--model", "fm_gmm2d", "--num-samples", "8", "--steps", "2",
                         "--solvers", "euler", "--no-report"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("bench.run: loading fm_gmm2d's weights from ") and first.endswith(
        "fm_gmm2d.pt (committed with this project, sha256-checked)"), first
