"""A model's identity in a results folder: a model changed behind the same name (its module edited, its card file
edited, other weights at the same path) is a different study — refused in the old folder, and never scored against
the old model's cached reference solutions or optimised grids."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import results as results_mod
from bench import run as run_mod
from bench.reference_solutions import CACHE_FOLDER
from bench.sweep import CALIBRATION_FOLDER

MODULE = """
from pretrained.analytic import GaussianMixture
from solvers import schedules

model = GaussianMixture([[-2.0, 0.0], [2.0, {shift}]], [0.3, 0.3]).as_model(schedules.VPLinear(), prediction="eps")
model.sample_shape = (2,)
"""
SMALL = ["--num-samples", "16", "--batch-size", "16", "--solvers", "ddim", "--metric", "ref_error", "--no-report",
         "--threads", "1"]


def bench(out: Path, *args: str) -> int:
    return run_mod.main(["--quiet", "--out", str(out), *args])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(shift) (re)writes the importable module ``idmodel_<test>`` and forgets any imported copy; returns
    its ``--model`` spec."""
    name = "idmodel_" + "".join(c for c in tmp_path.name if c.isalnum())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def write(shift: str) -> str:
        (tmp_path / f"{name}.py").write_text(MODULE.format(shift=shift))
        sys.modules.pop(name, None)
        return f"{name}:model"

    yield write
    sys.modules.pop(name, None)


def test_an_edited_model_module_is_refused_in_its_old_results_folder(tmp_path, user_module, capsys):
    out = tmp_path / "out"
    spec = user_module("0.5")
    assert bench(out, "--model", spec, "--steps", "2", *SMALL) == 0
    before = (out / "results.csv").read_bytes()
    digest = pd.read_csv(out / "results.csv")["model_digest"].iloc[0]
    assert isinstance(digest, str) and len(digest) >= 16
    assert bench(out, "--model", user_module("0.5"), "--steps", "3", *SMALL) == 0  # unchanged: extends the folder
    capsys.readouterr()
    spec = user_module("0.75")  # the same name, another model
    assert bench(out, "--model", spec, "--steps", "4", *SMALL) == 2
    err = capsys.readouterr().err
    assert "model_digest: " in err and "another --out" in err and err.count("\n") == 1, err
    assert len(pd.read_csv(out / "results.csv")) == 2 and (out / "results.csv").read_bytes() != before


TINY_CARD = """
name = "tiny"
sample_shape = [2]
prediction = "eps"
[network]
factory = "tests.bench.test_user_models:TinyEps"
weights = "tiny.pt"
[schedule]
name = "discrete_vp"
{extra}
"""


def _tiny_weights(path: Path, seed: int) -> None:
    from tests.bench.test_user_models import TinyEps
    torch.manual_seed(seed)
    torch.save(TinyEps().state_dict(), path)


@pytest.mark.parametrize("change", ["card", "weights"])
def test_an_edited_card_file_or_other_weights_at_the_same_path_are_refused(tmp_path, capsys, change):
    card = tmp_path / "card.toml"
    card.write_text(TINY_CARD.format(extra=""))
    _tiny_weights(tmp_path / "tiny.pt", 0)
    out = tmp_path / "out"
    assert bench(out, "--model", str(card), "--steps", "2", *SMALL) == 0
    if change == "card":
        card.write_text(TINY_CARD.format(extra="beta_end = 0.03"))
    else:
        _tiny_weights(tmp_path / "tiny.pt", 1)
    capsys.readouterr()
    assert bench(out, "--model", str(card), "--steps", "3", *SMALL) == 2
    err = capsys.readouterr().err
    assert "model_digest: " in err and "another --out" in err, err


def test_the_digest_covers_the_weights_and_a_pinned_sha256_is_reused(tmp_path, monkeypatch):
    """The weights' digest is the one their verification computed (the card's sha256), not a second hash."""
    from bench import provenance
    from pretrained.user_models import resolve_card
    _tiny_weights(tmp_path / "tiny.pt", 0)
    sha = hashlib.sha256((tmp_path / "tiny.pt").read_bytes()).hexdigest()
    card = tmp_path / "card.toml"
    card.write_text(TINY_CARD.format(extra="").replace('weights = "tiny.pt"', f'weights = "tiny.pt"\nsha256 = "{sha}"'))
    hashed = []
    real = provenance.file_digest
    monkeypatch.setattr(provenance, "file_digest", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    first = provenance.model_digest(str(card), resolve_card(str(card)), {})
    assert hashed == ["card.toml", "test_user_models.py"]  # the weights' pinned sha256 stands for them
    assert provenance.model_digest(str(card), resolve_card(str(card)), {}) == first
    other = tmp_path / "other.pt"
    _tiny_weights(other, 1)
    assert provenance.model_digest(str(card), resolve_card(str(card)), {"weights": str(other)}) != first


def test_a_zoo_model_digest_is_its_published_checksum_or_nothing(tmp_path):
    import pretrained
    from bench import provenance
    gmm = pretrained.get_card("gmm2d")
    assert provenance.model_digest("gmm2d", gmm, {}) == provenance.model_digest("gmm2d", gmm, {})
    mnist = pretrained.get_card("ddpm_mnist")
    assert provenance.model_digest("ddpm_mnist", mnist, {}) != provenance.model_digest("gmm2d", gmm, {})


def test_old_files_without_the_model_digest_column_stay_readable_and_resume(tmp_path, user_module):
    out = tmp_path / "out"
    spec = user_module("0.5")
    assert bench(out, "--model", spec, "--steps", "2", *SMALL) == 0
    old = pd.read_csv(out / "results.csv").drop(columns=["model_digest"])
    old.to_csv(out / "results.csv", index=False)
    assert bench(out, "--model", spec, "--steps", "2,3", *SMALL) == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 and df["model_digest"].isna().tolist() == [True, False]


def test_an_edited_model_is_not_scored_against_the_old_reference_solutions(tmp_path, user_module, capsys):
    out = tmp_path / "out"
    assert bench(out, "--model", user_module("0.5"), "--steps", "2", *SMALL) == 0
    old = pd.read_csv(out / "results.csv")["metric.ref_error"].iloc[0]
    (out / "results.csv").unlink()  # a folder whose rows are gone (or never written): only the caches remain
    capsys.readouterr()
    assert run_mod.main(["--out", str(out), "--model", user_module("0.75"), "--steps", "2", *SMALL]) == 0
    assert "ref_error's reference" in capsys.readouterr().err  # solved again, for the new model
    assert len(list((out / CACHE_FOLDER).glob("*.npz"))) == 2
    assert pd.read_csv(out / "results.csv")["metric.ref_error"].iloc[0] != old


def test_an_edited_model_does_not_reuse_the_old_optimised_grids(tmp_path, user_module, capsys):
    out = tmp_path / "out"
    args = ["--steps", "3", "--spacing", "optimized", "--solvers", "dpmpp_2m", "--num-samples", "16",
            "--metric", "ref_error", "--no-report", "--threads", "1"]
    assert bench(out, "--model", user_module("0.5"), *args) == 0
    (out / "results.csv").unlink()
    capsys.readouterr()
    assert run_mod.main(["--out", str(out), "--model", user_module("0.75"), *args]) == 0
    assert "optimizing the dpmpp_2m × 3-step grid" in capsys.readouterr().err
    assert len(list((out / CALIBRATION_FOLDER).glob("*.json"))) == 2


def test_model_digest_is_a_run_setting():
    assert "model_digest" in results_mod.RUN_SETTING_COLUMNS


# -- caches checked before use -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "one_row"])
def test_a_damaged_cached_reference_solution_is_checked_named_and_solved_again(tmp_path, user_module, capsys,
                                                                               damage):
    import io

    import numpy as np
    out = tmp_path / "out"
    spec = user_module("0.5")
    assert bench(out, "--model", spec, "--steps", "2", *SMALL) == 0
    first = pd.read_csv(out / "results.csv")["metric.ref_error"].iloc[0]
    (path,) = (out / CACHE_FOLDER).glob("*.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a valid file whose one row would be broadcast to every sample
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["solution"], arrays["error"] = arrays["solution"][:1], arrays["error"][:1]
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        path.write_bytes(buf.getvalue())
    capsys.readouterr()
    assert run_mod.main(["--out", str(out), "--force", "--model", spec, "--steps", "2", *SMALL]) == 0
    err = capsys.readouterr().err
    assert f"the cached reference solution {path} fails its check" in err and "solving it again" in err
    df = pd.read_csv(out / "results.csv")
    assert df["status"].tolist() == ["ok"] and df["metric.ref_error"].iloc[0] == pytest.approx(first, rel=1e-12)
    with np.load(path) as z:
        assert z["solution"].shape == (16, 2)
