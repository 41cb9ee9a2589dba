"""The project's learned gmm2d models (``cm_gmm2d``, ``fm_gmm2d``) against the exact model they learned.

The teacher is known exactly: its data samples, and its probability-flow ODE (SciPy DOP853 on the exact
denoiser).  The distance between two independent exact sample sets is the noise floor of the comparison.
"""
from __future__ import annotations

import pytest
import torch

import pretrained
import solvers
from pretrained.checkpoints import CheckpointError
from pretrained.toy import WEIGHTS_DIR, read_toy_weights

metrics = pytest.importorskip("bench.metrics", reason="the sliced Wasserstein distance of bench.metrics")

N = 1000


@pytest.fixture(scope="module")
def data():
    card = pretrained.get_card("gmm2d")
    return card.data_sampler(N, 101).numpy(), card.data_sampler(N, 202).numpy()


def _noise(model, n=N):
    return solvers.initial_noise((n, 2), seeds=range(n), schedule=model.schedule, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["cm", "fm"])
def test_committed_weights_are_small_and_record_their_training(kind):
    path = WEIGHTS_DIR / f"{kind}_gmm2d.pt"
    assert path.exists() and path.stat().st_size < 1_000_000
    _, record = read_toy_weights(path, kind)
    assert record["training"]["command"] == f"python -m pretrained.train_gmm2d {kind}"
    card = pretrained.get_card(f"{kind}_gmm2d")
    assert record["training"]["summary"] in card.weights_note
    word = "consistency distillation" if kind == "cm" else "flow matching"
    assert word in card.weights_note


def test_cm_is_the_identity_at_the_boundary():
    model = pretrained.load("cm_gmm2d")
    x = torch.randn(16, 2) * 3
    torch.testing.assert_close(model.denoise(x, 0.002), x)


def test_cm_one_step_is_much_closer_to_the_data_than_one_euler_step(data):
    card = pretrained.get_card("cm_gmm2d")
    model = pretrained.load("cm_gmm2d")
    exact = card.extra["mixture"].as_model(model.schedule, "x0")
    x_T = _noise(model)
    cm = solvers.sample(model, x_T.float(), solver="consistency", steps=1, spacing="karras",
                        **card.default_solver_options["consistency"]).samples.double()
    euler = solvers.sample(exact, x_T, solver="euler", steps=1, spacing="karras").samples
    end = card.exact_ode(x_T, model.schedule.t_max, 0.0)
    floor = metrics.sliced_wasserstein(*data)
    sw_cm = metrics.sliced_wasserstein(cm.numpy(), data[0])
    sw_euler = metrics.sliced_wasserstein(euler.numpy(), data[0])
    # One Euler step from σ = 80 returns E[x0 | x_T] ≈ the data mean for every sample (a collapsed cloud,
    # distance ≈ the data's spread, ~2.8); the consistency model must land within twice the noise floor.
    assert sw_euler > 2.0 and sw_cm < 2 * floor and sw_cm < 0.1 * sw_euler
    # Per sample: within one component std (0.3) of where the exact ODE sends the same noise.
    assert metrics.rmse(cm.numpy(), end.numpy()) < 0.3 < metrics.rmse(euler.numpy(), end.numpy())


def test_fm_velocity_path_runs_on_the_learned_network(data):
    card = pretrained.get_card("fm_gmm2d")
    model = pretrained.load("fm_gmm2d")
    assert model.prediction == "velocity" and isinstance(model.schedule, solvers.schedules.RectifiedFlow)
    x_T = _noise(model)
    end = card.exact_ode(x_T, 1.0, 0.0)
    fine = solvers.sample(model, x_T.float(), solver="euler", steps=100, spacing="uniform").samples.double()
    # With 100 Euler steps the discretisation error is small: what is left is the network's error.
    assert metrics.rmse(fine.numpy(), end.numpy()) < 0.15
    assert metrics.sliced_wasserstein(fine.numpy(), data[0]) < 2 * metrics.sliced_wasserstein(*data)
    coarse = solvers.sample(model, x_T.float(), solver="euler", steps=2, spacing="uniform").samples.double()
    assert metrics.rmse(coarse.numpy(), end.numpy()) > 2 * metrics.rmse(fine.numpy(), end.numpy())
    # The learned velocity field is close to the exact one where the data is (t = 0.5).
    exact = card.extra["mixture"].network(model.schedule, "velocity")
    x_half = card.extra["schedule"].q_sample(torch.from_numpy(data[0]), 0.5, torch.randn(N, 2, dtype=torch.float64))
    t = torch.full((N,), 0.5)
    with torch.no_grad():
        err = (model.fn(x_half.float(), t).double() - exact(x_half, t.double())).pow(2).sum(1).mean().sqrt()
    assert float(err) < 0.05 * float(exact(x_half, t.double()).pow(2).sum(1).mean().sqrt())


def test_training_script_writes_a_loadable_file(tmp_path):
    from pretrained.train_gmm2d import main
    out = tmp_path / "cm.pt"
    assert main(["cm", "--steps", "20", "--batch", "64", "--levels", "8", "--out", str(out)]) == 0
    model = pretrained.load("cm_gmm2d", weights=out)
    assert model.denoise(torch.zeros(3, 2), 80.0).shape == (3, 2)
    with pytest.raises(CheckpointError, match="holds a 'cm' model"):
        pretrained.load("fm_gmm2d", weights=out)
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a pretrained.toy/1 weight file"):
        pretrained.load("cm_gmm2d", weights=junk)
    with pytest.raises(FileNotFoundError, match="python -m pretrained.train_gmm2d cm"):
        pretrained.load("cm_gmm2d", weights=tmp_path / "none.pt")


# -- the committed weight files are checked against their sha256 ------------------------------------------
def _copy_weights(tmp_path, monkeypatch):
    """A copy of pretrained/weights/ in tmp_path, made the loaders' WEIGHTS_DIR."""
    import shutil
    from pretrained import toy
    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    monkeypatch.setattr(toy, "WEIGHTS_DIR", folder)
    return folder


def test_a_committed_weights_file_with_flipped_bytes_is_refused(tmp_path, monkeypatch):
    from pretrained.toy import WEIGHTS_SHA256
    path = _copy_weights(tmp_path, monkeypatch) / "cm_gmm2d.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        pretrained.load("cm_gmm2d")
    message = str(err.value)
    assert str(path) in message and WEIGHTS_SHA256["cm_gmm2d.pt"] in message
    assert pretrained.checkpoints.file_digest(path) in message
    assert "git checkout -- pretrained/weights/cm_gmm2d.pt" in message
    assert "python -m pretrained.train_gmm2d cm" in message


def test_a_weights_file_without_a_digest_entry_is_refused(tmp_path, monkeypatch):
    folder = _copy_weights(tmp_path, monkeypatch)
    (folder / "fm_gmm2d.pt").rename(folder / "fm_gmm2d_v2.pt")
    with pytest.raises(CheckpointError, match="no sha256 entry in WEIGHTS_SHA256"):
        pretrained.load("fm_gmm2d", weights=folder / "fm_gmm2d_v2.pt")


def test_the_intact_copies_load_and_give_the_committed_networks(tmp_path, monkeypatch):
    _copy_weights(tmp_path, monkeypatch)
    x = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    t = torch.tensor([0.3, 0.7])
    for kind in ("cm", "fm"):
        loaded = pretrained.load(f"{kind}_gmm2d").fn
        committed, _ = read_toy_weights(WEIGHTS_DIR / f"{kind}_gmm2d.pt", kind)
        torch.testing.assert_close(loaded(x, t), committed(x, t), rtol=0, atol=0)


def test_every_committed_weights_file_has_a_matching_digest_entry():
    from pretrained.checkpoints import file_digest
    from pretrained.toy import WEIGHTS_SHA256
    files = {p.name for p in WEIGHTS_DIR.iterdir() if p.is_file()}
    assert files == set(WEIGHTS_SHA256), "a file in pretrained/weights/ without an entry in WEIGHTS_SHA256"
    for name, expected in WEIGHTS_SHA256.items():
        assert file_digest(WEIGHTS_DIR / name) == expected, name
