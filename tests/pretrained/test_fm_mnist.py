"""The fm_mnist card: a rectified-flow velocity U-Net trained by this project on 8,000 MNIST images."""
from __future__ import annotations


import pytest
import torch

import pretrained
import solvers
from pretrained import checkpoints, fm_mnist, toy
from pretrained.checkpoints import CheckpointError
from solvers.schedules import RectifiedFlow
from tests.pretrained.mnist_marks import Payload, held_out_fd, needs_mnist, real_and_blurred



def test_card_loads_offline_and_samples_images_in_its_data_range():
    card = pretrained.get_card("fm_mnist")
    assert card.kind == "image" and card.prediction == "velocity" and card.reference == "mnist-heldout"
    assert card.sample_shape == (1, 28, 28) and card.data_range == (-1.0, 1.0)
    model = pretrained.load("fm_mnist")
    assert isinstance(model.schedule, RectifiedFlow) and model.prediction == "velocity"
    x_T = solvers.initial_noise((4, 1, 28, 28), seeds=[0, 1, 2, 3], schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="euler", steps=8, spacing="uniform")
    assert res.nfe == 8 and res.samples.shape == (4, 1, 28, 28) and torch.isfinite(res.samples).all()
    images = card.to_images(res.samples)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    # Digits are mostly black background: far from the noise they started from.
    assert float((images < 0.2).float().mean()) > 0.6


def test_card_states_the_data_split_the_recipe_and_the_checksum():
    card = pretrained.get_card("fm_mnist")
    assert "every fifth image" in card.notes and "python -m pretrained.train_fm_mnist" in card.notes
    assert "Adam steps" in card.weights_note and "8,000 MNIST images" in card.weights_note
    assert card.sha256 == toy.WEIGHTS_SHA256["fm_mnist.pt"] == checkpoints.file_digest(fm_mnist.WEIGHTS_FILE)
    assert fm_mnist.WEIGHTS_FILE.stat().st_size < 5 * 2 ** 20


def test_a_changed_committed_file_is_refused_and_the_message_names_its_script(changed_committed_file):
    path = changed_committed_file("fm_mnist.pt")
    with pytest.raises(CheckpointError) as err:
        pretrained.load("fm_mnist", weights=path)
    message = str(err.value)
    assert toy.WEIGHTS_SHA256["fm_mnist.pt"] in message and checkpoints.file_digest(path) in message
    # Before, every fm_*.pt was said to come from train_gmm2d.
    assert "python -m pretrained.train_fm_mnist" in message and "train_gmm2d" not in message


def test_files_that_are_not_fm_mnist_weights_are_refused_unexecuted(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": fm_mnist.FORMAT, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot read the fm_mnist weights"):
        pretrained.load("fm_mnist", weights=evil)
    assert "this must never run" not in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a pretrained.fm_mnist/1 weight file"):
        pretrained.load("fm_mnist", weights=junk)
    small = fm_mnist.FlowUNet(channels=(8, 16, 16))
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": fm_mnist.FORMAT, "arch": {**small.arch(), "channels": [16, 32, 64]},
                "state_dict": small.state_dict()}, wrong)
    with pytest.raises(CheckpointError, match="inp.weight"):
        pretrained.load("fm_mnist", weights=wrong)
    with pytest.raises(FileNotFoundError, match="python -m pretrained.train_fm_mnist"):
        pretrained.load("fm_mnist", weights=tmp_path / "none.pt")


def test_training_is_bit_for_bit_reproducible(one_thread):
    from pretrained.train_fm_mnist import train
    data = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    arch = dict(channels=(8, 16, 16), emb=32, n_freq=4)
    kwargs = dict(steps=4, batch=4, lr=1e-3, warmup=2, ema=0.9, arch=arch, log_every=0, data=data)
    first, second, other = train(seed=1, **kwargs), train(seed=1, **kwargs), train(seed=2, **kwargs)
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    assert not torch.equal(first["state_dict"]["inp.weight"], other["state_dict"]["inp.weight"])
    assert first["training"] == second["training"] and "seconds" not in first["training"]


def test_training_refuses_bad_settings_before_any_work(capsys):
    from pretrained.train_fm_mnist import main
    for argv, message in ((["--steps", "0"], "--steps must be a positive integer, got 0"),
                          (["--ema", "1.0"], "--ema in [0, 1)"),
                          (["--lr", "-1"], "--lr must be > 0")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# Why 5× the noise floor: at n = 300 the floor (300 held-out images against all 2,000) is ≈ 17; 300 real
# training digits, which neither the reference nor the classifier saw, score ≈ 1.6× the floor; the same digits
# blurred by a 3×3 box filter (still digits, fine strokes lost) ≈ 20×.  Their geometric midpoint is ≈ 5.7×:
# 5× the floor means "closer to real digits than to blurred ones on a log scale".  The test re-measures both
# yardsticks, so the factor's meaning is checked here rather than copied from a run.
FACTOR, N = 5.0, 300


@pytest.mark.slow
@needs_mnist
def test_samples_score_within_5x_the_held_out_noise_floor(tmp_path, one_thread):
    from bench import features
    fd, floor = held_out_fd(tmp_path, N)
    real, blurred = real_and_blurred(N)
    assert fd(real) < FACTOR * floor < fd(blurred)
    card, model = pretrained.get_card("fm_mnist"), pretrained.load("fm_mnist")
    x_T = solvers.initial_noise((N, 1, 28, 28), seeds=list(range(N)), schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="dpmpp_2m", steps=10, spacing="uniform", t_start=0.999)
    samples = features.to_uint8_rgb(card.to_images(res.samples))[:, :1]
    assert fd(samples) <= FACTOR * floor
