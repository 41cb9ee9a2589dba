"""Your own model in the harness: ``--model my_pkg.my_module:ATTR`` (with ``--shape``), ``--model card.toml``,
and quality without data — the error against a high-accuracy reference solution of the model's own ODE
(``ref_error``), cached in the results folder."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pretrained
from bench import run as run_mod
from bench.reference_solutions import CACHE_FOLDER
from pretrained.user_models import parse_shape, resolve_card

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--num-samples", "64", "--batch-size", "64", "--steps", "5,20", "--solvers", "ddim,dpmpp_3m"]


def bench(out: Path, *args: str) -> int:
    return run_mod.main(["--quiet", "--out", str(out), *args])


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").sort_values(["solver", "steps"]).reset_index(drop=True)


# -- --model pkg.module:ATTR ------------------------------------------------------------------------------------
def test_an_imported_model_is_scored_against_its_own_reference_solution(tmp_path):
    """The example module's model is an exact 2-D mixture, so the reference-solution error can be checked against
    the exact ODE: the same sweep with ode_error on the zoo's analytic machinery must agree to the reference's
    own (stated) error."""
    out = tmp_path / "mine"
    assert bench(out, "--model", "examples.my_model:model", "--metric", "ref_error", *SMALL) == 0
    mine = results(out)
    assert (mine["status"] == "ok").all() and list(mine["model"].unique()) == ["examples.my_model:model"]
    card = pretrained.resolve_card("examples.my_model:model")
    assert card.kind == "points" and tuple(card.sample_shape) == (2,)
    errors = mine["metric.ref_error"].to_numpy()
    assert np.all(np.isfinite(errors)) and np.all(errors > 0)
    # more steps, smaller error, for each solver (a reference solution that did not resolve the ODE would not
    # show 5 → 20 steps improving a third-order method by more than 4×)
    for solver, g in mine.groupby("solver"):
        e5, e20 = g.sort_values("steps")["metric.ref_error"]
        assert e20 < e5 / 4, (solver, e5, e20)
    notes = [json.loads(n)["ref_error"] for n in mine["metric_notes"]]
    own = [float(n.split("≈ ")[1].split(" ")[0]) for n in notes]
    assert all(o < 1e-3 for o in own) and all(o < e / 50 for o, e in zip(own, errors))


def test_ref_error_agrees_with_the_exact_ode_error_on_an_exact_model(tmp_path):
    """On gmm2d both metrics measure the distance to the ODE's end point from the same x_T: one exactly, one
    through the reference solution, so they must agree to within the reference's own error (≈ 3e-5 here)."""
    out = tmp_path / "both"
    assert bench(out, "--model", "gmm2d", "--metric", "ode_error,ref_error", *SMALL) == 0
    df = results(out)
    assert np.allclose(df["metric.ref_error"], df["metric.ode_error"], rtol=0, atol=1e-3), \
        df[["solver", "steps", "metric.ode_error", "metric.ref_error"]]


def test_reference_solutions_are_cached_and_reused(tmp_path, capsys):
    out = tmp_path / "cache"
    assert bench(out, "--model", "examples.my_model:model", "--metric", "ref_error", *SMALL) == 0
    files = sorted((out / CACHE_FOLDER).glob("*.npz"))
    assert files, "the reference solutions are kept in the results folder"
    stamps = [f.stat().st_mtime_ns for f in files]
    first = results(out)["metric.ref_error"].to_numpy()
    capsys.readouterr()
    assert run_mod.main(["--out", str(out), "--force", "--model", "examples.my_model:model", "--metric",
                         "ref_error", *SMALL]) == 0
    assert "ref_error's reference" not in capsys.readouterr().err  # nothing solved again
    assert [f.stat().st_mtime_ns for f in sorted((out / CACHE_FOLDER).glob("*.npz"))] == stamps
    np.testing.assert_allclose(results(out)["metric.ref_error"].to_numpy(), first, rtol=1e-12)


def test_a_stochastic_solver_gets_a_stated_reason_not_a_number(tmp_path):
    out = tmp_path / "ddpm"
    assert bench(out, "--model", "examples.my_model:model", "--num-samples", "16", "--steps", "5",
                 "--solvers", "ddpm") == 0
    row = results(out).iloc[0]
    assert np.isnan(row["metric.ref_error"])
    assert json.loads(row["metric_notes"])["ref_error"] == "not defined for a stochastic solver"


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_pkg.mod:model"], "cannot import 'no_such_pkg.mod'"),
    (["--model", "examples.my_model:nope"], "examples.my_model has no attribute 'nope'"),
    (["--model", "examples.my_model:__doc__"], "is a str, not a model"),
    (["--model", "gmm2d", "--shape", "2"], "--shape is for your own model; gmm2d is a zoo model"),
    (["--model", "examples.my_model:model", "--shape", "3"], "its sample_shape is (2,); --shape 3 disagrees"),
    (["--model", "examples.my_model:model", "--shape", "0,2"], "positive sizes"),
    (["--model", "examples.my_model:model", "--metric", "fd_resnet20"], "does not fit"),
    (["--model", "examples.my_model:model", "--metric", "fd_data"], "needs exact data samples"),
])
def test_bad_model_specs_are_refused_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert bench(out, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.run: error: ") and err.count("\n") == 1, err
    assert any(m in err for m in message.split("|")), err
    assert not out.exists()


def test_an_object_without_a_shape_asks_for_shape(tmp_path, monkeypatch, capsys):
    import examples.my_model as mod
    model = mod.make_model()
    del model.sample_shape
    monkeypatch.setattr(mod, "bare", model, raising=False)
    assert bench(tmp_path / "o", "--model", "examples.my_model:bare", "--metric", "ref_error") == 2
    assert "pass --shape C,H,W" in capsys.readouterr().err
    assert bench(tmp_path / "o", "--model", "examples.my_model:bare", "--shape", "2", "--metric", "ref_error",
                 "--num-samples", "8", "--steps", "3", "--solvers", "ddim") == 0


def test_parse_shape():
    assert parse_shape("3, 32,32") == (3, 32, 32) and parse_shape([2]) == (2,)
    for bad in ("", "a,b", "3,-1", "0"):
        with pytest.raises(ValueError, match="positive sizes"):
            parse_shape(bad)


# -- --model card.toml ------------------------------------------------------------------------------------------
class TinyEps(torch.nn.Module):
    """A tiny ε-network for the card-file tests: fixed random weights, time-dependent output."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.width = width

    def forward(self, x, t):
        return 0.1 * torch.tanh(self.lin(x)) * (1 + t[:, None] / 1000)


def _card(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "card.toml"
    path.write_text(body)
    return path


def _weights(tmp_path: Path) -> tuple[Path, str]:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(TinyEps().state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


FACTORY_CARD = """
name = "tiny"
sample_shape = [2]
prediction = "eps"
[network]
factory = "tests.bench.test_user_models:TinyEps"
kwargs = {{ width = 4 }}
weights = "tiny.pt"
sha256 = "{sha}"
[schedule]
name = "discrete_vp"
"""


def test_a_card_file_builds_the_network_with_its_weights_and_schedule(tmp_path):
    weights, sha = _weights(tmp_path)
    card = resolve_card(str(_card(tmp_path, FACTORY_CARD.format(sha=sha))))
    assert card.name == "tiny" and card.kind == "points" and card.reference == "none"
    model = pretrained.load(card)
    assert model.prediction == "eps" and model.schedule.num_train_timesteps == 1000
    torch.testing.assert_close(model.fn.lin.weight, torch.load(weights, weights_only=True)["lin.weight"])
    out = tmp_path / "run"
    assert bench(out, "--model", str(tmp_path / "card.toml"), "--num-samples", "16", "--steps", "3",
                 "--solvers", "ddim") == 0
    row = results(out).iloc[0]
    assert row["model"] == "tiny" and row["status"] == "ok" and np.isfinite(row["metric.ref_error"])


@pytest.mark.parametrize("reference, resolved", [
    ("my_stats.npz", "cards/my_stats.npz"), ("images", "cards/images"), ("sub/stats.npz", "cards/sub/stats.npz"),
    ("mnist-test", "mnist-test"), ("none", "none"),
])
def test_a_card_files_relative_reference_is_relative_to_the_card(tmp_path, monkeypatch, reference, resolved):
    (tmp_path / "cards" / "images").mkdir(parents=True)
    (tmp_path / "cards" / "my_stats.npz").write_bytes(b"")
    body = FACTORY_CARD.format(sha="0" * 64).replace("sample_shape = [2]",
                                                      f'sample_shape = [2]\nreference = "{reference}"')
    (tmp_path / "cards" / "card.toml").write_text(body)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the current directory plays no part
    card = resolve_card(str(tmp_path / "cards" / "card.toml"))
    assert card.reference == (str(tmp_path / resolved) if "/" in resolved else resolved)


class _Crafted:
    """A pickle that, unpickled unrestricted, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_weights(tmp_path: Path) -> Path:
    """The card's weights file replaced by a pickle that would run code; returns the marker it would create."""
    weights, _ = _weights(tmp_path)
    weights.write_bytes(pickle.dumps(_Crafted(tmp_path / "ran")))
    return tmp_path / "ran"


def test_a_card_file_refuses_weights_whose_sha256_differs_before_reading_them(tmp_path):
    marker = _crafted_weights(tmp_path)
    card = resolve_card(str(_card(tmp_path, FACTORY_CARD.format(sha="0" * 64))))
    with pytest.raises(pretrained.CheckpointError, match="sha256"):
        pretrained.load(card)
    assert not marker.exists()


def test_a_card_file_reads_weights_only(tmp_path):
    marker = _crafted_weights(tmp_path)
    body = FACTORY_CARD.replace('sha256 = "{sha}"\n', "").format()
    with pytest.raises(pretrained.CheckpointError, match="weights-only"):
        pretrained.load(resolve_card(str(_card(tmp_path, body))))
    assert not marker.exists()


@pytest.mark.parametrize("body, message", [
    ("sample_shape = [2]\nprediction = 'eps'\ncolour = 1\n[network]\nfactory = 'a:b'\n[schedule]\nname='vp_linear'",
     "unknown key(s) colour in the top level"),
    ("sample_shape = [2]\nprediction = 'eps'\n[network]\nfactory = 'a:b'\nweight = 'x'\n[schedule]\nname='vp_linear'",
     "unknown key(s) weight in [network]"),
    ("prediction = 'eps'\n[network]\nfactory = 'a:b'\n[schedule]\nname='vp_linear'", "sample_shape is required"),
    ("sample_shape = [2]\nprediction = 'eps'\n[network]\nfactory = 'a:b'\ndiffusers = 'x'\n[schedule]\nname='vp'",
     "exactly one of factory, diffusers, loader"),
    ("sample_shape = [2]\nprediction = 'eps'\n[network]\nfactory = 'a:b'", "a [schedule] table is required"),
    ("sample_shape = [2]\n[network]\nfactory = 'a:b'\n[schedule]\nname='vp_linear'", "prediction is required"),
    ("sample_shape = [2\n", "is not valid TOML"),
])
def test_bad_card_files_are_refused_with_the_reason(tmp_path, body, message):
    with pytest.raises(ValueError) as e:
        resolve_card(str(_card(tmp_path, body)))
    assert message in str(e.value)


GOOD_TOP = 'sample_shape = [2]\nprediction = "eps"\n'
GOOD_NET = '[network]\nfactory = "tests.bench.test_user_models:TinyEps"\n'
GOOD_SCHED = '[schedule]\nname = "discrete_vp"\n'


@pytest.mark.parametrize("body, message", [
    ("sample_shape = 3\nprediction = 'eps'\n" + GOOD_NET + GOOD_SCHED,
     "sample_shape must be a list of positive integers, e.g. [3, 32, 32]; got 3"),
    ("name = { a = 1 }\n" + GOOD_TOP + GOOD_NET + GOOD_SCHED, "name must be a string of letters"),
    ("description = [1]\n" + GOOD_TOP + GOOD_NET + GOOD_SCHED, "description must be a string; got [1]"),
    ("reference = 5\n" + GOOD_TOP + GOOD_NET + GOOD_SCHED, "reference must be a string; got 5"),
    ("data_range = 'x'\n" + GOOD_TOP + GOOD_NET + GOOD_SCHED, "data_range must be a list of two finite numbers"),
    ("default_num_samples = 'many'\n" + GOOD_TOP + GOOD_NET + GOOD_SCHED,
     "default_num_samples must be a positive integer"),
    ("sample_shape = [2]\nprediction = 5\n" + GOOD_NET + GOOD_SCHED, "prediction must be one of eps"),
    (GOOD_TOP + "schedule = 'x'\n" + GOOD_NET, "schedule must be a table"),
    (GOOD_TOP + "[network]\nfactory = 5\n" + GOOD_SCHED, "[network] factory must be a string; got 5"),
    (GOOD_TOP + GOOD_NET + "kwargs = 'x'\n" + GOOD_SCHED, "[network] kwargs must be a table"),
    (GOOD_TOP + GOOD_NET + "dtype = 'nope'\n" + GOOD_SCHED, "[network] dtype must be one of float32"),
    (GOOD_TOP + GOOD_NET + "weights = 'w.pt'\nsha256 = 3\n" + GOOD_SCHED, "[network] sha256 must be 64 hexadecimal"),
    (GOOD_TOP + GOOD_NET + GOOD_SCHED + "num_train_timesteps = 'x'\n", "[schedule] discrete_vp"),
    (GOOD_TOP + GOOD_NET + GOOD_SCHED + "[model]\nclip_x0 = 'x'\n", "[model] clip_x0 must be a list of two"),
    (GOOD_TOP + GOOD_NET + GOOD_SCHED + "[decoder]\nfactory = 'a:b'\nscale = 'x'\ndata_shape = [1, 2, 2]\n",
     "[decoder] scale must be a finite number"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply"),
    ("sample_shape = [2\n", "is not valid TOML"),
    ("sample_shape = [2]\n" + GOOD_NET + "[schedule]\nscheduler_config = 'nope.json'\n",
     "[schedule] scheduler_config"),
], ids=["shape-int", "name-table", "description-list", "reference-int", "range-str", "count-str", "prediction-int",
        "schedule-str", "factory-int", "kwargs-str", "dtype-name", "sha256-int", "schedule-parameter", "clip-str",
        "scale-str", "deep-arrays", "deep-tables", "syntax", "scheduler-config-missing"])
def test_mistyped_card_keys_are_refused_in_one_line_naming_the_key(tmp_path, capsys, body, message):
    """A value of the wrong type (or TOML that cannot be read) stops the run before any work with one line that
    names the card file, the key and what it must be."""
    card = _card(tmp_path, body)
    assert bench(tmp_path / "o", "--model", str(card), "--num-samples", "4", "--steps", "2", "--solvers", "ddim") == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.run: error: ") and err.count("\n") == 1, err[-2000:]
    assert message in err and str(card) in err, err
    assert not (tmp_path / "o").exists()


LOADER_NET = '[network]\nloader = "pretrained.ddpm_mnist:load_ddpm_mnist"\n'


@pytest.mark.parametrize("extra, ignored", [
    ('prediction = "eps"\n' + LOADER_NET, "prediction"),
    (LOADER_NET + GOOD_SCHED, "schedule"),
    (LOADER_NET + 'dtype = "float64"\n', "network.dtype"),
    (LOADER_NET + "[model]\nclip_x0 = [-1, 1]\n", "model"),
], ids=["prediction", "schedule", "dtype", "model"])
def test_a_loader_card_refuses_the_keys_its_loader_would_ignore(tmp_path, extra, ignored):
    """A loader returns the whole model, so a [schedule], prediction, [model] or network dtype beside it would
    change nothing: refused, naming the key, instead of silently ignored."""
    with pytest.raises(ValueError, match=rf"loader returns the whole model .* so {re.escape(ignored)} would be "
                                         "ignored; drop them"):
        resolve_card(str(_card(tmp_path, "sample_shape = [1, 28, 28]\n" + extra)))


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "a b", "<b>x</b>", "x" * 65],
                         ids=["formula", "plus", "minus", "at", "space", "html", "too-long"])
def test_a_card_name_is_an_identifier(tmp_path, name):
    """The name keys results rows, folders and reports: letters, digits, ``_ . -``, starting with a letter or
    digit (so never a spreadsheet formula), at most 64 characters."""
    with pytest.raises(ValueError, match="name must be a string of letters, digits"):
        resolve_card(str(_card(tmp_path, f"name = '{name}'\n" + GOOD_TOP + GOOD_NET + GOOD_SCHED)))


@pytest.mark.parametrize("name", ["=1+1", "+1", "-1", "@A1", "\tx"])
def test_an_imported_card_named_like_a_spreadsheet_formula_is_refused(monkeypatch, name):
    """The name is written to results.csv: a spreadsheet would run a cell that starts with = + - @."""
    import dataclasses

    import examples.my_model as mod
    monkeypatch.setattr(mod, "odd_card", dataclasses.replace(pretrained.get_card("gmm2d"), name=name), raising=False)
    with pytest.raises(ValueError, match="would read that name as a formula"):
        resolve_card("examples.my_model:odd_card")


def test_a_file_name_that_is_no_card_name_asks_for_a_name(tmp_path):
    path = tmp_path / "=cmd.toml"
    path.write_text(GOOD_TOP + GOOD_NET + GOOD_SCHED)
    with pytest.raises(ValueError, match=r"defaults to the file name '=cmd'.*set name = "):
        resolve_card(str(path))


def test_card_text_and_card_files_are_bounded(tmp_path):
    from pretrained.card_files import MAX_CARD_BYTES, MAX_TEXT_CHARS
    long = "x" * (MAX_TEXT_CHARS + 1)
    for key in ("notes", "description"):
        with pytest.raises(ValueError, match=f"{key} has {MAX_TEXT_CHARS + 1:,} characters; a card's text is at "
                                             f"most {MAX_TEXT_CHARS:,}"):
            resolve_card(str(_card(tmp_path, f'{key} = "{long}"\n' + GOOD_TOP + GOOD_NET + GOOD_SCHED)))
    big = _card(tmp_path, GOOD_TOP + GOOD_NET + GOOD_SCHED + "#" * MAX_CARD_BYTES + "\n")
    with pytest.raises(ValueError, match="is larger than a card file may be"):
        resolve_card(str(big))


def test_a_missing_card_file_is_named(tmp_path, capsys):
    assert bench(tmp_path / "o", "--model", str(tmp_path / "nope.toml")) == 2
    assert "no such card file" in capsys.readouterr().err


# -- the examples ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_diffusers_unet_example_card_runs_end_to_end(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    monkeypatch.setenv("UNET_DIR", str(tmp_path / "unet"))
    out = tmp_path / "run"
    assert bench(out, "--model", str(ROOT / "examples" / "diffusers_unet_card.toml"), "--num-samples", "4",
                 "--steps", "3", "--solvers", "ddim,dpmpp_2m") == 0
    df = results(out)
    assert (df["status"] == "ok").all() and (df["model"] == "my_diffusers_unet").all()
    assert np.isfinite(df["metric.ref_error"]).all()
    with np.load(out / "previews" / f"{df['cell_id'].iloc[0]}.npz") as z:
        assert z["data"].shape[-2:] == (16, 16) and str(z["kind"]) == "images"


def test_the_ddpm_mnist_example_card_loads_the_zoo_network(tmp_path):
    weights = pretrained.checkpoints.ASSETS / "ddpm_mnist" / "ddpm_mnist.pth"
    if not weights.exists():
        pytest.skip(f"the offline assets are absent ({weights}): the example card points there")
    card = resolve_card(str(ROOT / "examples" / "ddpm_mnist_card.toml"))
    assert card.reference == "mnist-test" and tuple(card.sample_shape) == (1, 28, 28)
    mine, zoo = pretrained.load(card), pretrained.load("ddpm_mnist")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 20.0])
    torch.testing.assert_close(mine.fn(x, t), zoo.fn(x, t))


# -- latent models: a decoder on the card, timed apart ----------------------------------------------------------
LATENT_CARD = """
name = "tiny_ldm"
sample_shape = [4, 8, 8]
prediction = "eps"
[network]
diffusers = "unet"
[schedule]
name = "discrete_vp"
[decoder]
diffusers = "vae"
scale = 0.5
data_shape = [1, 16, 16]
name = "a tiny random AutoencoderKL"
"""


def test_a_latent_card_decodes_the_samples_and_times_the_decoding_apart(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                          norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet")
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                            norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).save_pretrained(tmp_path / "vae")
    card = resolve_card(str(_card(tmp_path, LATENT_CARD)))
    assert card.kind == "image" and card.data_shape == (1, 16, 16) and card.decoder_name.startswith("a tiny")
    out = tmp_path / "run"
    assert bench(out, "--model", str(tmp_path / "card.toml"), "--num-samples", "4", "--steps", "3",
                 "--solvers", "ddim", "--repeats", "2") == 0
    row = results(out).iloc[0]
    assert row["status"] == "ok" and row["time_decode_s"] > 0 and np.isfinite(row["metric.ref_error"])
    parts = row["time_model_s"] + row["time_solver_s"] + row["time_decode_s"]
    assert row["time_total_s"] == pytest.approx(parts, rel=1e-9)
    with np.load(out / "previews" / f"{row['cell_id']}.npz") as z:
        assert z["data"].shape[-2:] == (16, 16)  # decoded images, not the 8×8 latents
    report = (out / "report.md").read_text()
    assert "**Latent model:** the samples are latents decoded by a tiny random AutoencoderKL" in report
    assert "| decode s |" in report


def test_a_decoder_table_needs_its_data_shape(tmp_path):
    with pytest.raises(ValueError, match="data_shape"):
        resolve_card(str(_card(tmp_path, LATENT_CARD.replace("data_shape = [1, 16, 16]\n", ""))))


DIFFUSERS_CARD = GOOD_TOP + '[network]\ndiffusers = "unet"\n' + GOOD_SCHED


def _fake_diffusers_folder(tmp_path: Path, weights: bytes = b"") -> Path:
    """A diffusers folder with a config.json and, where ``weights`` is given, a weights file of those bytes."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    if weights:
        (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return tmp_path / "unet"


def test_a_diffusers_folder_without_weights_is_refused_in_one_line(tmp_path, capsys):
    _fake_diffusers_folder(tmp_path)
    card = _card(tmp_path, DIFFUSERS_CARD)
    assert bench(tmp_path / "o", "--model", str(card), "--num-samples", "4", "--steps", "2", "--solvers", "ddim") == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.run: error: ") and err.count("\n") == 1, err[-2000:]
    assert (f"{card}: the diffusers folder {tmp_path / 'unet'} has no weights file: expected "
            "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin") in err, err


def test_a_diffusers_folder_card_checks_its_sha256_before_reading_the_weights(tmp_path):
    """The pinned digest is that of the folder's weights file: a different file is refused unread."""
    folder = _fake_diffusers_folder(tmp_path, weights=b"not the pinned weights")
    card = resolve_card(str(_card(tmp_path, DIFFUSERS_CARD.replace("\n[schedule]", f"\nsha256 = '{'0' * 64}'\n[schedule]"))))
    with pytest.raises(pretrained.CheckpointError, match=f"{folder / 'diffusion_pytorch_model.safetensors'}: sha256 is"):
        pretrained.load(card)


def test_a_diffusers_folder_card_with_its_weights_sha256_loads(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    sha = hashlib.sha256((tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    body = DIFFUSERS_CARD.replace("sample_shape = [2]", "sample_shape = [1, 8, 8]")
    model = pretrained.load(resolve_card(str(_card(tmp_path, body.replace("\n[schedule]", f"\nsha256 = '{sha}'\n[schedule]")))))
    torch.testing.assert_close(model.fn.unet.conv_in.weight, unet.conv_in.weight)


def test_a_sharded_diffusers_folder_cannot_be_pinned_by_one_sha256(tmp_path):
    folder = _fake_diffusers_folder(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    card = resolve_card(str(_card(tmp_path, DIFFUSERS_CARD.replace("\n[schedule]", f"\nsha256 = '{'0' * 64}'\n[schedule]"))))
    with pytest.raises(ValueError, match="sharded weights.*one sha256"):
        pretrained.load(card)


# -- --reference: your own data ----------------------------------------------------------------------------------
def _unet_card_run(tmp_path, monkeypatch, *extra):
    diffusers = pytest.importorskip("diffusers")
    if not (pretrained.checkpoints.ASSETS / "resnet20_cifar").exists():
        pytest.skip(f"the offline assets are absent ({pretrained.checkpoints.ASSETS}): fd_resnet20 needs ResNet-20")
    if not (tmp_path / "unet").exists():
        torch.manual_seed(0)
        diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                              block_out_channels=(8, 16), norm_num_groups=4,
                              down_block_types=("DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet")
    monkeypatch.setenv("UNET_DIR", str(tmp_path / "unet"))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    return bench(tmp_path / "run", "--model", str(ROOT / "examples" / "diffusers_unet_card.toml"), "--num-samples",
                 "8", "--steps", "2", "--solvers", "ddim", "--force", *extra)


@pytest.mark.slow
def test_your_own_image_folder_and_its_statistics_file_give_the_same_fd(tmp_path, monkeypatch):
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "sub").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "data" / "sub" / f"{i}.png")
    assert _unet_card_run(tmp_path, monkeypatch, "--reference", str(tmp_path / "data"), "--metric",
                          "fd_resnet20,ref_error") == 0
    first = results(tmp_path / "run").iloc[0]
    assert first["reference"] == str(tmp_path / "data") and np.isfinite(first["metric.fd_resnet20"])
    stats = list((tmp_path / "cache").glob("refstats-folder*.npz"))
    assert len(stats) == 1, "the folder's statistics are cached under a hash of its contents"
    # the cached statistics given back as --reference stats.npz: the same distance (another results folder,
    # as the reference is a run setting)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").rename(tmp_path / "run_folder")
    assert _unet_card_run(tmp_path, monkeypatch, "--reference", str(stats[0]), "--metric", "fd_resnet20") == 0
    again = results(tmp_path / "run").iloc[0]
    assert again["metric.fd_resnet20"] == pytest.approx(first["metric.fd_resnet20"], rel=1e-9)


def test_a_pickled_statistics_file_is_refused_unread(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "stats.npz"
    np.savez(bad, mu=np.array([object()], dtype=object), sigma=np.zeros((1, 1)))
    # refused with the other bad input (status 2), before the model is loaded
    assert _unet_card_run(tmp_path, monkeypatch, "--reference", str(bad), "--metric", "fd_resnet20") == 2
    assert "pickled arrays are refused" in capsys.readouterr().err


def test_statistics_of_another_feature_dimension_are_refused_before_any_cell_samples(tmp_path, monkeypatch, capsys):
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(5), sigma=np.eye(5))
    assert _unet_card_run(tmp_path, monkeypatch, "--reference", str(stats), "--metric", "fd_resnet20") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bench.run: error: {stats}: the statistics are 5-dimensional but resnet20-cifar10 (layer 64) "
                   "gives 64-dimensional features; use statistics of that extractor's features (or the metric whose "
                   "extractor made them)"]
    assert not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "gmm2d", "--reference", "."], "--reference is reference images for an image model"),
    (["--model", "ddpm_mnist", "--reference", "nope/"], "is not a data set (mnist-test, mnist-heldout, cifar10-train), an image folder"),
])
def test_bad_references_are_refused_before_any_work(tmp_path, capsys, argv, message):
    assert bench(tmp_path / "o", *argv) == 2
    assert message in capsys.readouterr().err


def test_a_card_file_takes_a_diffusers_scheduler_config(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction", clip_sample=True).save_config(tmp_path / "sched")
    weights, sha = _weights(tmp_path)
    body = FACTORY_CARD.format(sha=sha).replace('prediction = "eps"\n', "").replace(
        'name = "discrete_vp"', 'scheduler_config = "sched/scheduler_config.json"')
    model = pretrained.load(resolve_card(str(_card(tmp_path, body))))
    reference = diffusers.DDPMScheduler.from_pretrained(tmp_path / "sched")
    assert model.prediction == "v" and model.clip_x0 == (-1.0, 1.0)
    torch.testing.assert_close(model.schedule.alphas_cumprod, reference.alphas_cumprod.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("raw", ["instance", "class"])
def test_a_raw_network_is_refused_with_the_line_that_wraps_it(tmp_path, monkeypatch, capsys, raw):
    """A torch.nn.Module (or its class) given as --model is not blamed on --model-opt: one line says it is a
    network, not a model, and shows the one line that wraps it in solvers.DiffusionModel."""
    import examples.my_model as mod
    net = torch.nn.Linear(2, 2)
    monkeypatch.setattr(mod, "raw_net", net if raw == "instance" else torch.nn.Linear, raising=False)
    assert bench(tmp_path / "o", "--model", "examples.my_model:raw_net", "--shape", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a network (Linear), not a model" in err
    assert "solvers.DiffusionModel(net, schedule=" in err and "--model-opt" not in err
    assert not (tmp_path / "o").exists()


def test_the_load_line_names_weights_only_where_there_are_weights():
    from bench.sweep import loading_message
    user = resolve_card("examples.my_model:model")
    assert loading_message(user, {}) == f"loading {user.name}"
    assert loading_message(user, {"weights": "w.pt"}) == f"loading {user.name}'s weights from w.pt"
    zoo = pretrained.get_card("ddpm_mnist")
    assert loading_message(zoo, {}).startswith("loading ddpm_mnist's weights from ")
