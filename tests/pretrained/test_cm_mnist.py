"""The cm_mnist card: a consistency model distilled by this project from fm_mnist on its rectified-flow ODE."""
from __future__ import annotations


import pytest
import torch

import pretrained
import solvers
from bench import plan
from pretrained import checkpoints, cm_mnist, fm_mnist, toy
from pretrained.checkpoints import CheckpointError
from solvers.schedules import RectifiedFlow
from tests.pretrained.mnist_marks import Payload, held_out_fd, needs_mnist, real_and_blurred



def test_card_loads_offline_and_one_step_gives_images_in_its_data_range():
    card = pretrained.get_card("cm_mnist")
    assert card.kind == "image" and card.prediction == "x0" and card.reference == "mnist-heldout"
    assert card.sample_shape == (1, 28, 28) and card.data_range == (-1.0, 1.0)
    assert card.default_solver_options == {"consistency": {"sigma_boundary": 0.0}}
    model = pretrained.load("cm_mnist")
    assert isinstance(model.schedule, RectifiedFlow) and model.prediction == "x0"
    x_T = solvers.initial_noise((4, 1, 28, 28), seeds=[0, 1, 2, 3], schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="consistency", steps=1, spacing="uniform")
    assert res.nfe == 1 and res.samples.shape == (4, 1, 28, 28) and torch.isfinite(res.samples).all()
    images = card.to_images(res.samples)
    # Digits are mostly black background, in one step from pure noise.
    assert float((images < 0.2).float().mean()) > 0.6


def test_boundary_condition_and_the_start_from_the_teachers_euler_prediction():
    teacher, _ = fm_mnist.read_fm_mnist_weights(fm_mnist.WEIGHTS_FILE)
    f = cm_mnist.FlowConsistency(teacher)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # f(x, t_min) = x exactly, whatever the network says.
        assert torch.equal(f(x, torch.zeros(3)), x)
        # With F = the teacher's velocity, f is the teacher's x0 = x − t·v (what the solvers convert it to).
        t = torch.tensor([0.25, 0.5, 1.0])
        x0_teacher = pretrained.load("fm_mnist").denoise_at(x, t)
        assert torch.allclose(f(x, t), x0_teacher.to(x.dtype), atol=1e-5)


def test_card_states_the_data_split_the_recipe_the_teacher_and_the_checksum():
    card = pretrained.get_card("cm_mnist")
    assert "every fifth image" in card.notes and "python -m pretrained.train_cm_mnist" in card.notes
    assert "consistency distillation" in card.weights_note and "fm_mnist (sha256" in card.weights_note
    assert "Adam steps" in card.weights_note and "8,000 MNIST images" in card.weights_note
    assert card.sha256 == toy.WEIGHTS_SHA256["cm_mnist.pt"] == checkpoints.file_digest(cm_mnist.WEIGHTS_FILE)
    assert cm_mnist.WEIGHTS_FILE.stat().st_size < 5 * 2 ** 20
    # The record names the teacher it was distilled from: the committed fm_mnist file.
    record = torch.load(cm_mnist.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert checkpoints.file_digest(fm_mnist.WEIGHTS_FILE)[:16] in record["training"]["summary"]
    assert record["t_min"] == cm_mnist.T_MIN == 0.0


def test_a_changed_committed_file_is_refused_and_the_message_names_its_script(changed_committed_file):
    path = changed_committed_file("cm_mnist.pt")
    with pytest.raises(CheckpointError) as err:
        pretrained.load("cm_mnist", weights=path)
    message = str(err.value)
    assert toy.WEIGHTS_SHA256["cm_mnist.pt"] in message and checkpoints.file_digest(path) in message
    assert "python -m pretrained.train_cm_mnist" in message


def test_files_that_are_not_cm_mnist_weights_are_refused_unexecuted(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": cm_mnist.FORMAT, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot read the cm_mnist weights"):
        pretrained.load("cm_mnist", weights=evil)
    assert "this must never run" not in capsys.readouterr().out
    # The teacher's file is a velocity network, not a consistency function: refused by its format.
    with pytest.raises(CheckpointError, match="not a pretrained.cm_mnist/1 weight file"):
        pretrained.load("cm_mnist", weights=fm_mnist.WEIGHTS_FILE)
    small = fm_mnist.FlowUNet(channels=(8, 16, 16))
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": cm_mnist.FORMAT, "arch": {**small.arch(), "channels": [16, 32, 64]},
                "state_dict": small.state_dict()}, wrong)
    with pytest.raises(CheckpointError, match="inp.weight"):
        pretrained.load("cm_mnist", weights=wrong)
    with pytest.raises(FileNotFoundError, match="python -m pretrained.train_cm_mnist"):
        pretrained.load("cm_mnist", weights=tmp_path / "none.pt")
    # A record with another boundary time is another function f: refused, not reinterpreted with t_min = 0.
    record = torch.load(cm_mnist.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    for t_min in (0.002, None):
        moved = tmp_path / "moved.pt"
        torch.save({**record, "t_min": t_min} if t_min is not None else
                   {k: v for k, v in record.items() if k != "t_min"}, moved)
        with pytest.raises(CheckpointError, match=f"t_min = {t_min} in the file, but cm_mnist's"):
            pretrained.load("cm_mnist", weights=moved)


class _Card:
    reference = "mnist-heldout"


@pytest.mark.parametrize("steps, grid", [(1, [1.0, 0.0]), (2, [1.0, 0.5, 0.0]), (4, [1.0, 0.75, 0.5, 0.25, 0.0])])
def test_the_harness_grid_is_song_et_al_multistep_sampling(steps, grid):
    """bench.run's grid for consistency on rectified flow: uniform in t from 1 to σ = 0, so k steps evaluate f
    at 1 and at the k − 1 interior points τ, re-noising to x_τ = (1 − τ)·x0 + τ·z in between (σ_b = 0)."""
    schedule = RectifiedFlow()
    spacing, _ = plan.default_spacing(_Card, schedule, "consistency", steps)
    t_start = plan.default_t_start(schedule, "consistency")
    assert solvers.make_grid(schedule, steps, spacing=spacing, t_start=t_start) == pytest.approx(grid)
    calls = []

    def constant_f(x, t):   # f ≡ 0.5: every re-noised input must be (1 − τ)·0.5 + τ·z
        calls.append((float(torch.as_tensor(t).reshape(-1)[0]), x.clone()))
        return torch.full_like(x, 0.5)

    model = solvers.DiffusionModel(constant_f, schedule=schedule, prediction="x0")
    x_T = solvers.initial_noise((64, 1, 28, 28), seeds=list(range(64)), schedule=schedule)
    res = solvers.sample(model, x_T, solver="consistency", steps=steps, spacing=spacing, t_start=t_start,
                         seeds=list(range(64)), sigma_boundary=0.0)
    assert res.nfe == steps and torch.equal(res.samples, torch.full_like(x_T, 0.5))
    assert [t for t, _ in calls] == pytest.approx(grid[:-1]) and torch.equal(calls[0][1], x_T)
    for tau, x in calls[1:]:
        # 64·784 noise values: mean within 0.01 and standard deviation within 2 % of the forward process's.
        assert float(x.mean()) == pytest.approx((1 - tau) * 0.5, abs=0.01)
        assert float(x.std()) == pytest.approx(tau, rel=0.02)


def _tiny_training(seed: int) -> dict:
    from pretrained.train_cm_mnist import train
    torch.manual_seed(123)
    teacher = fm_mnist.FlowUNet(channels=(8, 16, 16), emb=32, n_freq=4)
    torch.nn.init.normal_(teacher.out.weight, std=0.01)   # a teacher whose velocity is not zero
    data = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return train(steps=4, batch=4, intervals=4, lr=1e-3, warmup=2, target_ema=0.9, ema=0.5, seed=seed,
                 teacher=teacher, log_every=0, data=data)


def test_training_is_bit_for_bit_reproducible(one_thread, tmp_path):
    first, second, other = _tiny_training(1), _tiny_training(1), _tiny_training(2)
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    assert not torch.equal(first["state_dict"]["out.weight"], other["state_dict"]["out.weight"])
    assert first["training"] == second["training"] and "seconds" not in first["training"]
    # The record reads back as a consistency function whose boundary holds.
    path = tmp_path / "tiny.pt"
    torch.save(first, path)
    f, record = cm_mnist.read_cm_mnist_weights(path)
    x = torch.randn(2, 1, 28, 28)
    assert record["training"]["steps"] == 4 and torch.equal(f(x, torch.zeros(2)), x)


def test_the_teacher_step_is_heun_on_the_velocity():
    from pretrained.train_cm_mnist import heun_step

    def velocity(x, t):   # dx/dt = t·x: x(s) = x(t)·exp((s² − t²)/2)
        return t[:, None, None, None] * x

    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    t_from, t_to = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    h = t_to - t_from
    # Heun by hand: d1 = t·x, x_e = x + h·d1, x_new = x + h/2·(d1 + t_to·x_e).
    expected = 1 + h / 2 * (t_from + t_to * (1 + h * t_from))
    assert torch.allclose(heun_step(velocity, x, t_from, t_to)[:, 0, 0, 0], expected)
    exact = torch.exp((t_to ** 2 - t_from ** 2) / 2)
    assert torch.allclose(heun_step(velocity, x, t_from, t_to)[:, 0, 0, 0], exact, atol=0.02)


def test_training_refuses_bad_settings_before_any_work(capsys):
    from pretrained.train_cm_mnist import main
    for argv, message in ((["--steps", "0"], "--steps must be a positive integer, got 0"),
                          (["--intervals", "0"], "--intervals must be a positive integer, got 0"),
                          (["--target-ema", "1.0"], "--target-ema, --ema in [0, 1)"),
                          (["--ema", "-0.5"], "--target-ema, --ema in [0, 1)"),
                          (["--lr", "0"], "--lr must be > 0")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# Yardsticks, as in test_fm_mnist: at n = 300 the noise floor (300 held-out images against all 2,000) is ≈ 17;
# 300 real training digits score ≈ 1.6× the floor and the same digits blurred by a 3×3 box filter (still
# digits, fine strokes lost) ≈ 20×.  5× the floor is their geometric midpoint ("closer to real digits than to
# blurred ones on a log scale").  The teacher at 2 model calls (euler or dpmpp_2m, 2 steps; heun needs 3)
# gives smooth blobs, farther than the blurred digits; the consistency model's claim is that its 2-step
# samples are nearer than the blurred digits — so the blurred digits, re-measured here, are the margin
# between the two.  Seeds are fixed (samples 0..299, the same for every sampler), so the test is repeatable.
FACTOR, N = 5.0, 300


@pytest.fixture(scope="module")
def fd_heldout(tmp_path_factory):
    """(fd(uint8 images (N, 1, 28, 28)) → FD (MNIST classifier) against the held-out images, noise floor)."""
    return held_out_fd(tmp_path_factory.mktemp("refstats"), N)


def _samples(name: str, solver: str, steps: int, **options) -> torch.Tensor:
    from bench import features
    card, model = pretrained.get_card(name), pretrained.load(name)
    t_start = plan.default_t_start(model.schedule, solver)
    x_T = solvers.initial_noise((N, 1, 28, 28), seeds=list(range(N)), schedule=model.schedule)
    res = solvers.sample(model, x_T, solver=solver, steps=steps, spacing="uniform", t_start=t_start,
                         seeds=list(range(N)), **options)
    return features.to_uint8_rgb(card.to_images(res.samples))[:, :1]


@pytest.mark.slow
@needs_mnist
def test_two_consistency_steps_beat_the_teacher_at_two_model_calls(fd_heldout, one_thread):
    fd, floor = fd_heldout
    real, blurred = real_and_blurred(N)
    fd_blurred = fd(blurred)
    assert fd(real) < FACTOR * floor < fd_blurred   # the yardsticks mean what the comment above says
    cm_two = fd(_samples("cm_mnist", "consistency", 2))
    teacher_two = min(fd(_samples("fm_mnist", solver, 2)) for solver in ("euler", "dpmpp_2m"))
    assert cm_two < fd_blurred < teacher_two


@pytest.mark.slow
@needs_mnist
def test_four_consistency_steps_score_within_5x_the_held_out_noise_floor(fd_heldout, one_thread):
    fd, floor = fd_heldout
    assert fd(_samples("cm_mnist", "consistency", 4)) <= FACTOR * floor
