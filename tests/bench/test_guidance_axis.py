"""Classifier-free guidance as a sweep axis of ``bench.run`` (``--guidance``): cells solver × steps × guidance, the
label rule (sample i → class i mod C), network rows, resume, saved labels, errors, and the report.

The class-conditional cards are built here, so the tests depend on no trained model: a 2-D mixture of C
Gaussians on a ring whose class k conditions on component k (exact ε of the component, or of the whole mixture
for the unconditional branch), and a random-weight conditional network making 1×28×28 images for the
class_accuracy path.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import pretrained
import solvers
from bench import run as run_mod
from pretrained.analytic import GaussianMixture, gmm2d
from solvers import schedules

C = 4
MIX = gmm2d("ring", n_components=C, radius=3.0, std=0.3)
COMPONENTS = [GaussianMixture(MIX.means[k:k + 1], MIX.stds[k:k + 1]) for k in range(C)]
SCHED = schedules.VPLinear()
ROWS: dict = {}   # guidance scale → network rows evaluated by the conditioned models (the call-counting wrapper)


UNCONDITIONAL = MIX.network(SCHED)


def _mixture_network(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, w: float) -> torch.Tensor:
    """The exact ε of component c of the ring (c = −1: of the whole mixture) for each row; counts its rows
    under ``w``."""
    ROWS[w] = ROWS.get(w, 0) + x.shape[0]
    uncond = UNCONDITIONAL(x, t).to(torch.float64)
    time = (t.to(torch.float64) / SCHED.time_scale).clamp(SCHED.t_zero, SCHED.t_max)
    a, s = SCHED.alpha(time)[:, None], SCHED.sigma(time)[:, None]
    k = c.clamp(min=0)
    mu, sd = MIX.means[k], MIX.stds[k][:, None]
    xd = x.to(torch.float64)
    x0 = mu + a * sd ** 2 / (a * a * sd ** 2 + s * s) * (xd - a * mu)   # E[x0 | x_t] of one Gaussian component
    cond = (xd - a * x0) / s
    return torch.where((c >= 0)[:, None], cond, uncond).to(x.dtype)


def _condition_mixture(model, labels, w):
    none = torch.full_like(labels, -1)
    if w in (0.0, 1.0):
        fn = lambda x, t: _mixture_network(x, t, labels if w == 1.0 else none, w)  # noqa: E731
    else:
        fn = solvers.classifier_free_guidance(lambda x, t, c: _mixture_network(x, t, c, w), labels, none, w)
    return solvers.DiffusionModel(fn, schedule=model.schedule, prediction="eps")


MIXTURE_CARD = pretrained.ModelCard(
    name="cond_ring", kind="points", description="4 Gaussians on a ring, class k = component k (test card)",
    loader=lambda device="cpu", **kw: MIX.as_model(SCHED), sample_shape=(2,), prediction="eps",
    schedule_name="VPLinear", data_range=(-4.0, 4.0), data_sampler=lambda n, seed=0: MIX.sample(n, seed),
    default_num_samples=40, default_batch_size=40, num_classes=C, condition=_condition_mixture,
    default_guidance=(1.0, 3.0))
CARD = "tests.bench.test_guidance_axis:MIXTURE_CARD"
N = 24


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _bench(out, *args, model=CARD) -> int:
    return run_mod.main(["--quiet", "--out", str(out), "--model", model, "--num-samples", str(N), "--batch-size", "10",
                         "--repeats", "1", "--threads", "1", *args])


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """One sweep: ddim, dpmpp × 2 and 8 steps × guidance 0, 1, 3, samples saved; the rows each scale cost."""
    out = tmp_path_factory.mktemp("guided") / "o"
    ROWS.clear()
    assert _bench(out, "--guidance", "0,1,3", "--solvers", "ddim,dpmpp", "--steps", "2,8", "--save-samples") == 0
    return out, dict(ROWS)


def _nearest_component(samples: np.ndarray) -> np.ndarray:
    return np.argmin(((samples[:, None, :] - MIX.means.numpy()[None]) ** 2).sum(-1), axis=1)


# -- cells, rows and labels ------------------------------------------------------------------------------------
def test_cells_are_solver_by_steps_by_guidance_with_a_guidance_column(guided_run):
    out, _ = guided_run
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 * 2 * 3 and (df["status"] == "ok").all()
    assert sorted(df.groupby("guidance").size().items()) == [(0.0, 4), (1.0, 4), (3.0, 4)]
    assert df["cell_key"].is_unique and df["cell_id"].is_unique
    assert set(df.groupby(["solver_label", "steps"])["guidance"].apply(tuple)) == {(0.0, 1.0, 3.0)}
    assert all(f"-w{w:g}-" in cid for cid, w in zip(df["cell_id"], df["guidance"]))


def test_a_guided_call_costs_two_network_rows_per_sample(guided_run):
    out, rows = guided_run
    df = pd.read_csv(out / "results.csv")
    # nfe counts model calls whatever the guidance; network_rows the rows: 2 per call at w = 3, 1 at w = 0 and 1
    by_w = df.set_index(["solver_label", "steps", "guidance"])
    for (solver, steps, w), r in by_w.iterrows():
        assert r["nfe"] == by_w.loc[(solver, steps, 1.0), "nfe"]
        assert r["network_rows"] == r["nfe"] * (2 if w == 3.0 else 1)
    # counted by the network itself (warm-ups included, the same at every scale): w = 1 costs half of w = 3
    assert rows[3.0] == 2 * rows[1.0] and rows[0.0] == rows[1.0] > 0


def test_sample_i_is_generated_for_class_i_mod_c_whatever_its_batch(guided_run):
    out, _ = guided_run
    df = pd.read_csv(out / "results.csv")
    for _, r in df.iterrows():
        with np.load(out / "samples" / f"{r['cell_id']}.npz", allow_pickle=False) as z:
            labels, samples = z["labels"], z["samples"]
        assert labels.dtype == np.int64 and labels.tolist() == [i % C for i in range(N)]
        if r["steps"] == 8:
            hits = float(np.mean(_nearest_component(samples) == labels))
            if r["guidance"] >= 1:  # batches of 10: samples 10 … 23 are conditioned on 10 mod 4 = 2, …, not 0, …
                assert hits == 1.0, (r["cell_id"], hits)
            else:  # the unconditional model: the component is the draw's, not the label's
                assert hits < 0.6, (r["cell_id"], hits)


def test_labels_do_not_depend_on_the_batch_size(guided_run, tmp_path):
    out, _ = guided_run
    other = tmp_path / "b24"
    assert _bench(other, "--guidance", "3", "--solvers", "dpmpp", "--steps", "8", "--save-samples",
                  "--batch-size", "24") == 0
    (path,) = (other / "samples").iterdir()
    with np.load(path, allow_pickle=False) as a, np.load(out / "samples" / path.name, allow_pickle=False) as b:
        assert a["labels"].tolist() == b["labels"].tolist()
        np.testing.assert_allclose(a["samples"], b["samples"], atol=1e-4)


def test_the_report_has_a_guidance_column_charts_per_guidance_and_the_label_rule(guided_run):
    out, _ = guided_run
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| solver | options | steps |"))
    assert "| guidance |" in header and "| rows |" in header
    for w in ("0", "1", "3"):
        for metric in ("fd_data", "swd"):
            for x in ("time", "nfe"):
                assert (out / "figures" / f"{metric}_vs_{x}_w{w}.png").is_file()
                assert f"figures/{metric}_vs_{x}_w{w}.png" in md
    assert not (out / "figures" / "fd_data_vs_time.png").exists()
    assert f"sample i (the same index that chooses its seed) is generated for class i mod {C}" in md
    assert "how guidance changes the best solver and the steps it needs" in md


# -- resume ----------------------------------------------------------------------------------------------------
def test_resume_skips_done_guidance_cells_and_runs_new_ones(tmp_path):
    out = tmp_path / "o"
    assert _bench(out, "--guidance", "1", "--solvers", "dpmpp", "--steps", "3") == 0
    first = pd.read_csv(out / "results.csv")
    ROWS.clear()
    assert _bench(out, "--guidance", "1,3", "--solvers", "dpmpp", "--steps", "3") == 0
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["guidance"]) == [1.0, 3.0]
    kept = df[df["guidance"] == 1.0].iloc[0]
    assert kept["started_at"] == first["started_at"].iloc[0] and kept["cell_key"] == first["cell_key"].iloc[0]
    assert set(ROWS) == {3.0}   # the w = 1 cell was not sampled again


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, words", [("-1", "finite numbers ≥ 0"), ("nan", "finite numbers ≥ 0"),
                                          ("inf", "finite numbers ≥ 0"), ("two", "finite numbers ≥ 0"),
                                          ("1,", "finite numbers ≥ 0"), ("1,3,1.0", "lists 1 twice")])
def test_bad_guidance_values_are_refused_before_any_work(tmp_path, capsys, value, words):
    out = tmp_path / "o"
    assert _bench(out, "--guidance", value, "--solvers", "ddim", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_guidance_for_an_unconditional_model_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "o"
    assert _bench(out, "--guidance", "2", "--solvers", "ddim", "--steps", "2", model="gmm2d") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench.run: error: --guidance") and "gmm2d is unconditional" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_compile_is_refused_for_a_conditional_model(tmp_path, capsys):
    assert _bench(tmp_path / "o", "--compile", "--solvers", "ddim", "--steps", "2") == 2
    assert "--compile cannot be used with cond_ring" in capsys.readouterr().err


def test_the_cards_default_guidance_is_swept_when_none_is_given(tmp_path):
    out = tmp_path / "o"
    assert _bench(out, "--solvers", "dpmpp", "--steps", "2") == 0
    assert sorted(pd.read_csv(out / "results.csv")["guidance"]) == list(MIXTURE_CARD.default_guidance)


def test_an_unconditional_sweep_keeps_its_cell_keys_and_ids(tmp_path):
    from bench import plan
    card = pretrained.get_card("gmm2d")
    (cell,) = plan.plan_cells(card, card.loader(), plan.parse_solvers("ddim"), [5], None)
    assert cell.guidance is None and "-w" not in cell.cell_id
    assert cell.key == plan.cell_key("gmm2d", "ddim", cell.options, 5, cell.spacing, cell.t_start)
    (guided,) = plan.plan_cells(card, card.loader(), plan.parse_solvers("ddim"), [5], None, guidance=(2.0,))
    assert guided.key != cell.key and guided.cell_id.startswith("ddim-s5-w2-")


# -- ref_error and calibration under guidance ------------------------------------------------------------------------
def test_ref_error_solves_the_guided_ode_of_each_scale(tmp_path):
    out = tmp_path / "o"
    assert _bench(out, "--guidance", "1,3", "--solvers", "dpmpp_3m", "--steps", "40", "--metric", "ref_error",
                  "--dtype", "float64") == 0
    df = pd.read_csv(out / "results.csv")
    # 40 third-order steps are within ~1e-3 of the 250-step reference — of the SAME guided ODE; against the
    # w = 1 solution the w = 3 samples would be off by the guidance's whole effect (order 1)
    assert (df["metric.ref_error"] < 1e-2).all(), df["metric.ref_error"].tolist()
    assert len(list((out / "reference_solutions").iterdir())) == 2


def test_an_optimized_grid_is_calibrated_per_guidance_scale(tmp_path, monkeypatch):
    from bench import sweep as sweep_mod
    seen = []

    def fake_optimize(model, x, **kw):  # records the model it was given: the guided one, on balanced labels
        seen.append(model.fn(x, torch.full((x.shape[0],), 0.5, dtype=x.dtype)))
        grid = solvers.make_grid(model.schedule, kw["steps"], spacing=kw["spacing"], t_start=kw["t_start"])
        return type("Opt", (), dict(default_timesteps=grid, timesteps=grid, error_before=0.0, error_after=0.0,
                                    nfe=0, reference_error=0.0, method="fake"))()

    monkeypatch.setattr(sweep_mod.solvers, "optimize_timesteps", fake_optimize)
    monkeypatch.setattr(sweep_mod, "CALIBRATION_SAMPLES", 8)
    out = tmp_path / "o"
    assert _bench(out, "--guidance", "0,3", "--solvers", "ddim", "--steps", "3", "--spacing", "optimized") == 0
    records = [json.loads(p.read_text()) for p in sorted((out / "optimized_grids").iterdir())]
    assert sorted(r["guidance"] for r in records) == [0.0, 3.0]
    assert len(seen) == 2 and not torch.allclose(seen[0], seen[1])  # each scale calibrated on its own model


# -- class_accuracy ------------------------------------------------------------------------------------------------
needs_mnist = pytest.mark.skipif(not (pretrained.checkpoints.ASSETS / "mnist").is_dir(),
                                 reason="../shared/assets/mnist/ is absent")


class _RandomConditionalNet(torch.nn.Module):
    """A random-weight ε-network for 1×28×28 images conditioned on a class (−1: unconditional)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.embed = torch.nn.Parameter(torch.randn(11, 1, 28, 28, generator=g) * 0.5)

    def forward(self, x, t, c):
        return 0.3 * self.conv(x) + self.embed[c + 1]


NET = _RandomConditionalNet().requires_grad_(False)


def _condition_images(model, labels, w):
    none = torch.full_like(labels, -1)
    if w in (0.0, 1.0):
        fn = lambda x, t: NET(x, t, labels if w == 1.0 else none)  # noqa: E731
    else:
        fn = solvers.classifier_free_guidance(NET, labels, none, w)
    return solvers.DiffusionModel(fn, schedule=model.schedule, prediction="eps")


IMAGE_CARD = pretrained.ModelCard(
    name="cond_digits", kind="image", description="random-weight class-conditional 1×28×28 network (test card)",
    loader=lambda device="cpu", **kw: solvers.DiffusionModel(lambda x, t: NET(x, t, torch.full((x.shape[0],), -1)),
                                                             schedule=SCHED, prediction="eps"),
    sample_shape=(1, 28, 28), prediction="eps", schedule_name="VPLinear", to_images=lambda x: (x + 1) / 2,
    reference="mnist-heldout", default_num_samples=20, default_batch_size=20, num_classes=10,
    condition=_condition_images, default_guidance=(1.0,))


def _evaluator(card, n):
    from types import SimpleNamespace

    from bench.distributed import Dist
    from bench.references import Evaluator
    cfg = SimpleNamespace(seed=0, batch_size=500, reference_size=None, cache_dir=None, out_dir=None)
    ev = Evaluator(card, ["class_accuracy"], cfg, "cpu", Dist(), progress=False)
    ev.prepare(n)
    return ev


@needs_mnist
def test_class_accuracy_of_held_out_images_is_the_classifiers_accuracy_and_chance_when_shuffled():
    from bench import metrics as M
    from pretrained.mnist_data import mnist_split
    images, labels = mnist_split("heldout")
    ev = _evaluator(IMAGE_CARD, len(labels))
    samples = images.to(torch.float32) / 255.0 * 2 - 1          # in the card's data range
    cell = type("Cell", (), dict(label="x", steps=1, deterministic=True, guidance=1.0))()
    true = ev.finalize(cell, [ev.local(cell, samples, samples, labels=labels)])[0]["class_accuracy"]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    chance = ev.finalize(cell, [ev.local(cell, samples, samples, labels=shuffled)])[0]["class_accuracy"]
    assert true == pytest.approx(0.9855, abs=1e-9)              # the classifier's held-out accuracy, 1,971 / 2,000
    assert 0.06 < chance < 0.14
    # the noise floor: the held-out images with their true labels (all 2,000 in every draw here)
    assert ev.floors["class_accuracy"] == pytest.approx([0.9855, 0.0], abs=1e-9)
    assert M.METRICS["class_accuracy"].higher_is_better


def test_class_accuracy_fits_conditional_mnist_cards_only():
    from bench import metrics as M
    assert M.default_metrics(IMAGE_CARD) == ["fd_mnist", "class_accuracy"]
    spec = M.METRICS["class_accuracy"]
    assert spec.unfit_reason(IMAGE_CARD) is None
    assert "unconditional" in spec.unfit_reason(pretrained.get_card("fm_mnist"))
    assert "MNIST-like" in spec.unfit_reason(pretrained.ModelCard(
        **{**{f: getattr(IMAGE_CARD, f) for f in ("name", "kind", "description", "loader", "prediction",
                                                 "schedule_name", "condition")}, "sample_shape": (3, 32, 32),
           "num_classes": 10}))
    assert "it is for image models" in spec.unfit_reason(MIXTURE_CARD)


@needs_mnist
def test_class_accuracy_in_a_guided_sweep_is_the_classifiers_verdict_on_the_saved_samples(tmp_path):
    from bench.features import to_uint8_rgb
    from pretrained.mnist_classifier import load_mnist_classifier
    out = tmp_path / "o"
    assert _bench(out, "--guidance", "0,4", "--solvers", "ddim", "--steps", "3", "--metric", "class_accuracy",
                  "--save-samples", model="tests.bench.test_guidance_axis:IMAGE_CARD") == 0
    df = pd.read_csv(out / "results.csv")
    net = load_mnist_classifier()
    for _, r in df.iterrows():
        with np.load(out / "samples" / f"{r['cell_id']}.npz", allow_pickle=False) as z:
            images = to_uint8_rgb((torch.from_numpy(z["samples"]) + 1) / 2)
            labels = z["labels"]
        predicted = net(images.float().mean(1, keepdim=True) / 255.0)[1].argmax(1).numpy()
        assert r["metric.class_accuracy"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-12)
    info = json.loads((out / "reference.json").read_text())["metrics"]["class_accuracy"]
    assert info["floor"][0] == pytest.approx(0.9855, abs=0.01) and "higher is better" in info["note"]
    md = (out / "report.md").read_text()
    assert "class accuracy (MNIST classifier) ≥" in md      # the usable limit is a lower bound for a score


def test_reports_rank_a_higher_is_better_metric_by_its_shortfall():
    from bench.charts import usable_front
    from bench.report_analysis import judge_metric, observations
    df = pd.DataFrame({"status": "ok", "solver_label": "ddim", "solver": "ddim", "steps": [1, 2, 5, 10],
                       "guidance": 3.0, "nfe": [1, 2, 5, 10], "time_total_s": [0.1, 0.2, 0.5, 1.0],
                       "cell_key": list("abcd"), "metric.class_accuracy": [0.10, 0.90, 0.97, 0.96]})
    v = judge_metric(df, "class_accuracy", "acc", (0.9855, 0.003))
    assert v.best()["steps"] == 5 and v.off_scale == []            # the highest accuracy, nothing "diverged"
    # usable: shortfall ≤ 5 × max(best shortfall 0.03, the floor's 0.0145) = 0.15, i.e. accuracy ≥ 0.85
    assert v.bound == pytest.approx(0.85) and v.bound_words() == "≥ 0.85"
    assert sorted(v.usable["steps"]) == [2, 5, 10]
    assert usable_front(df, "metric.class_accuracy", "nfe", usable_max=v.bound, higher_is_better=True) == [1, 2]
    lines = observations(df, ["class_accuracy"], {"class_accuracy": "acc"}, {"class_accuracy": 0.9855})
    assert "acc: best 0.97 by ddim × 5 steps, w = 3 (NFE 5, 0.5 s); noise floor 0.9855." in lines
    assert any(line.startswith("acc, ddim, w = 3: NOT monotone in steps (0.97 at 5 steps → 0.96 at 10 steps)")
               for line in lines)
