"""The cfg_mnist card: a class-conditional ε-prediction U-Net of MNIST for classifier-free guidance."""
from __future__ import annotations

import math

import pytest
import torch

import pretrained
import solvers
from pretrained import cfg_mnist, checkpoints, fm_mnist, toy
from pretrained.checkpoints import CheckpointError
from pretrained.fm_mnist import FlowUNet
from solvers.schedules import VPCosine
from tests.pretrained.mnist_marks import Payload, held_out_fd, needs_mnist, real_and_blurred

SMALL = dict(channels=(8, 16, 16), emb=32, n_freq=4)


@pytest.fixture
def small_weights(tmp_path):
    """A random small conditional network in the cfg_mnist format (output layer not zero: outputs differ by
    label) → (path, the network)."""
    torch.manual_seed(0)
    net = FlowUNet(**SMALL, num_classes=10).eval()
    torch.nn.init.normal_(net.out.weight, std=0.5)
    torch.nn.init.normal_(net.label.weight, std=3.0)
    path = tmp_path / "small.pt"
    torch.save({"format": cfg_mnist.FORMAT, "arch": net.arch(), "state_dict": net.state_dict()}, path)
    return path, net


# -- the network ---------------------------------------------------------------------------------------------
def test_an_unconditional_flow_unet_is_unchanged_by_the_class_option():
    committed = torch.load(fm_mnist.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    net = FlowUNet(**committed["arch"])
    assert net.arch() == committed["arch"] and "num_classes" not in net.arch()
    assert net.state_dict().keys() == committed["state_dict"].keys()
    torch.manual_seed(3)
    plain = FlowUNet(**SMALL).state_dict()
    torch.manual_seed(3)
    conditional = FlowUNet(**SMALL, num_classes=10).state_dict()
    # The label embedding is the only addition, and the shared weights start from the same random numbers.
    assert set(conditional) - set(plain) == {"label.weight"}
    assert conditional["label.weight"].shape == (11, SMALL["emb"])
    assert all(torch.equal(plain[k], conditional[k]) for k in plain)


def test_labels_are_required_by_a_conditional_network_and_refused_by_an_unconditional_one():
    x, t = torch.zeros(2, 1, 28, 28), torch.rand(2)
    with pytest.raises(ValueError, match="num_classes=10: labels are required"):
        FlowUNet(**SMALL, num_classes=10)(x, t)
    with pytest.raises(ValueError, match="num_classes=0: labels are not accepted"):
        FlowUNet(**SMALL)(x, t, torch.tensor([0, 1]))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
            FlowUNet(**SMALL, num_classes=bad)


# -- condition(model, labels, guidance) ----------------------------------------------------------------------
def test_the_loaded_model_is_the_null_label_model(small_weights):
    path, net = small_weights
    model = pretrained.load("cfg_mnist", weights=path)
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    assert isinstance(model.schedule, VPCosine) and model.prediction == "eps" and model.rows_per_sample == 1
    assert torch.allclose(model.fn(x, t), net(x, t, torch.full((3,), 10)))
    assert not torch.allclose(model.fn(x, t), net(x, t, torch.zeros(3, dtype=torch.long)), atol=1e-3)


def test_the_loaded_model_clamps_x0_to_the_data_range_unless_told_not_to(small_weights):
    # ε-prediction multiplies the network's error by 1/α ≈ 119 at t_max (cfg_mnist.CLIP_X0): clamped by default.
    assert pretrained.load("cfg_mnist", weights=small_weights[0]).clip_x0 == (-1.0, 1.0)
    assert pretrained.load("cfg_mnist", weights=small_weights[0], clip_x0=None).clip_x0 is None
    alpha = float(cfg_mnist.schedule().alpha(cfg_mnist.schedule().t_max))
    assert 100 < 1 / alpha < 140


def test_condition_evaluates_the_guided_combination_with_the_stated_rows(small_weights):
    path, net = small_weights
    card = pretrained.get_card("cfg_mnist")
    model = pretrained.load("cfg_mnist", weights=path, clip_x0=(-1.0, 1.0))
    x, t, labels = torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 3, 9, 3])
    cond, uncond = net(x, t, labels), net(x, t, torch.full((4,), 10))
    for w, expected, rows in ((1.0, cond, 1), (0.0, uncond, 1), (3.0, uncond + 3.0 * (cond - uncond), 2),
                              (0.5, uncond + 0.5 * (cond - uncond), 2)):
        guided = card.condition(model, labels, w)
        assert guided.rows_per_sample == rows, w
        assert torch.allclose(guided.fn(x, t), expected, atol=1e-5), w
        assert guided.schedule is model.schedule and guided.prediction == "eps"
        assert guided.clip_x0 == (-1.0, 1.0) and guided.input_dtype == model.input_dtype
    # The guided model is a DiffusionModel the solvers run, one NFE per step.
    x_T = solvers.initial_noise((4, 1, 28, 28), seeds=[0, 1, 2, 3], schedule=model.schedule)
    res = solvers.sample(card.condition(model, labels, 2.0), x_T, solver="euler", steps=3)
    assert res.nfe == 3 and torch.isfinite(res.samples).all()


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0.0, 1.0]), "labels must be integers"),
    (torch.tensor([True, False]), "labels must be integers"),
    (torch.tensor([0, 10]), "labels must be digits 0 … 9, got 10"),
    (torch.tensor([-1, 2]), "labels must be digits 0 … 9, got -1"),
    (torch.tensor([[0, 1]]), "non-empty 1-D tensor"),
    (torch.tensor(3), "non-empty 1-D tensor"),
    ("three", "labels must be a 1-D tensor of integers"),
])
def test_bad_labels_are_refused(small_weights, labels, message):
    model = pretrained.load("cfg_mnist", weights=small_weights[0])
    with pytest.raises(ValueError, match=message):
        cfg_mnist.condition(model, labels, 3.0)


@pytest.mark.parametrize("guidance", [-0.5, float("nan"), float("inf"), "3", None, True])
def test_bad_guidance_is_refused(small_weights, guidance):
    model = pretrained.load("cfg_mnist", weights=small_weights[0])
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        cfg_mnist.condition(model, torch.tensor([1, 2]), guidance)


@pytest.mark.parametrize("guidance", [1.0, 0.0, 3.0])
def test_labels_for_another_batch_size_are_refused_before_the_network_runs(small_weights, guidance):
    model = pretrained.load("cfg_mnist", weights=small_weights[0])
    guided = cfg_mnist.condition(model, torch.tensor([1, 2, 3]), guidance)
    calls = []
    model.fn.net.register_forward_hook(lambda *args: calls.append(1))
    if guidance == 0.0:   # the null label needs no labels: any batch size is right
        assert guided.fn(torch.zeros(2, 1, 28, 28), torch.rand(2)).shape == (2, 1, 28, 28)
        return
    with pytest.raises(ValueError, match="3 .*for a batch of 2"):
        guided.fn(torch.zeros(2, 1, 28, 28), torch.rand(2))
    assert calls == []


def test_condition_refuses_a_model_of_another_card():
    with pytest.raises(ValueError, match="needs the model that pretrained.load\\('cfg_mnist'\\) returns"):
        cfg_mnist.condition(pretrained.load("gmm2d"), torch.tensor([1]), 1.0)


# -- the card and its committed weights ----------------------------------------------------------------------
def test_card_declares_the_class_conditional_contract_and_its_provenance():
    card = pretrained.get_card("cfg_mnist")
    assert card.kind == "image" and card.prediction == "eps" and card.reference == "mnist-heldout"
    assert card.sample_shape == (1, 28, 28) and card.data_range == (-1.0, 1.0)
    assert card.num_classes == 10 and card.condition is cfg_mnist.condition and card.default_guidance == (1.0, 3.0)
    assert "every fifth image" in card.notes and "python -m pretrained.train_cfg_mnist" in card.notes
    assert "label dropout 0.1" in card.weights_note and "8,000 labelled MNIST images" in card.weights_note
    assert card.sha256 == toy.WEIGHTS_SHA256["cfg_mnist.pt"] == checkpoints.file_digest(cfg_mnist.WEIGHTS_FILE)
    assert cfg_mnist.WEIGHTS_FILE.stat().st_size < 5 * 2 ** 20


def test_a_changed_committed_file_is_refused_and_the_message_names_its_script(changed_committed_file):
    path = changed_committed_file("cfg_mnist.pt")
    with pytest.raises(CheckpointError) as err:
        pretrained.load("cfg_mnist", weights=path)
    message = str(err.value)
    assert toy.WEIGHTS_SHA256["cfg_mnist.pt"] in message and checkpoints.file_digest(path) in message
    assert "python -m pretrained.train_cfg_mnist" in message


def test_files_that_are_not_cfg_mnist_weights_are_refused_unexecuted(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": cfg_mnist.FORMAT, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot read the cfg_mnist weights"):
        pretrained.load("cfg_mnist", weights=evil)
    assert "this must never run" not in capsys.readouterr().out
    # An unconditional network in this format (e.g. fm_mnist's arch) is not the cfg_mnist network.
    plain = FlowUNet(**SMALL)
    wrong = tmp_path / "plain.pt"
    torch.save({"format": cfg_mnist.FORMAT, "arch": plain.arch(), "state_dict": plain.state_dict()}, wrong)
    with pytest.raises(CheckpointError, match="num_classes=10, this file's architecture says None"):
        pretrained.load("cfg_mnist", weights=wrong)
    with pytest.raises(FileNotFoundError, match="python -m pretrained.train_cfg_mnist"):
        pretrained.load("cfg_mnist", weights=tmp_path / "none.pt")


# -- the training script -------------------------------------------------------------------------------------
def _tiny_run(tmp_path, name: str, seed: int) -> bytes:
    from pretrained.train_cfg_mnist import train
    from pretrained.train_gmm2d import save_atomic
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(16, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (16,), generator=gen))
    record = train(steps=4, batch=4, lr=1e-3, warmup=2, ema=0.9, p_uncond=0.5, seed=seed,
                   arch=dict(SMALL, num_classes=10), log_every=0, data=data)
    save_atomic(record, tmp_path / name)
    return (tmp_path / name).read_bytes()


def test_training_is_bit_for_bit_reproducible(tmp_path, one_thread):
    first, second = _tiny_run(tmp_path, "a.pt", 1), _tiny_run(tmp_path, "b.pt", 1)
    other = _tiny_run(tmp_path, "c.pt", 2)
    assert first == second and first != other
    record = torch.load(tmp_path / "a.pt", weights_only=True)
    assert record["training"]["p_uncond"] == 0.5 and "seconds" not in record["training"]
    net, _ = cfg_mnist.read_cfg_mnist_weights(tmp_path / "a.pt")   # the script writes what the card reads
    assert net.num_classes == 10


def test_training_refuses_bad_settings_before_any_work(capsys):
    from pretrained.train_cfg_mnist import main
    for argv, message in ((["--steps", "0"], "--steps must be a positive integer, got 0"),
                          (["--ema", "1.0"], "--ema in [0, 1)"),
                          (["--p-uncond", "0"], "--p-uncond must be in (0, 1)"),
                          (["--p-uncond", "1"], "--p-uncond must be in (0, 1)"),
                          (["--weights", "x.pt"], "--weights names the file --evaluate measures"),
                          (["--evaluate", "--num-samples", "25"], "--num-samples must be a positive multiple of 10")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# -- sample quality of the committed weights -----------------------------------------------------------------
# The bar (issue 13): class accuracy ≥ 95 % under guidance 3.  The test samples N = 200 digits (20 of each), the
# first 200 of the card's 500-sample measurement (same seeds, labels and solver); at 95 % the binomial standard
# error of 200 samples is 1.5 points, so asserting the bar itself on them would fail a model that meets it by
# chance one time in two.  ACCURACY_FLOOR = 95 % − 2 standard errors ≈ 92 %: a model at the bar passes, one at
# 89 % or below (a clear miss) fails.
ACCURACY_BAR, N = 0.95, 200
ACCURACY_FLOOR = ACCURACY_BAR - 2 * math.sqrt(ACCURACY_BAR * (1 - ACCURACY_BAR) / N)
# The FD criterion is the fm_mnist tests' yardstick itself, re-measured at this N: real training digits that
# neither the reference nor the classifier saw score ≈ 1.6× the noise floor, the same digits blurred by a 3×3 box
# filter (still digits, fine strokes lost) ≈ 20×; guided samples must score below their geometric midpoint,
# "closer to real digits than to blurred ones on a log scale" (the reason fm_mnist's 5× factor was chosen).


@pytest.fixture(scope="module")
def guided_digits():
    """(images in [0, 1], labels) of N samples under guidance 3, dpmpp_2m 20 steps, on one thread."""
    from pretrained.train_cfg_mnist import guided_images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        labels = torch.arange(N) % 10
        return guided_images(pretrained.load("cfg_mnist"), labels, 3.0, solver="dpmpp_2m", steps=20), labels
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@needs_mnist
def test_guided_digits_are_the_digits_asked_for(guided_digits, one_thread):
    from pretrained.train_cfg_mnist import class_accuracy, guided_images
    images, labels = guided_digits
    assert class_accuracy(images, labels) >= ACCURACY_FLOOR
    # The labels are what makes the digits: the null-label model (guidance 0) ignores them, so the classifier
    # agrees with the labels asked for about one time in ten (chance; 30 % is almost 7 standard errors of 100
    # samples above it).
    unguided = guided_images(pretrained.load("cfg_mnist"), labels[:100], 0.0, solver="dpmpp_2m", steps=10)
    assert class_accuracy(unguided, labels[:100]) < 0.3


@pytest.mark.slow
@needs_mnist
def test_guided_digits_are_closer_to_real_digits_than_to_blurred_ones(guided_digits, tmp_path, one_thread):
    from bench import features
    fd, floor = held_out_fd(tmp_path, N)
    real, blurred = real_and_blurred(N)
    fd_real, fd_blurred = fd(real), fd(blurred)
    assert floor < fd_real < 3 * floor and fd_blurred > 10 * floor   # the yardsticks mean what they say
    assert fd(features.to_uint8_rgb(guided_digits[0])[:, :1]) < math.sqrt(fd_real * fd_blurred)
