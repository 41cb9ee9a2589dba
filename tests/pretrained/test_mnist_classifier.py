"""The project's MNIST classifier (pretrained.mnist_classifier, pretrained.train_mnist_classifier)."""
from __future__ import annotations


import pytest
import torch

from pretrained import checkpoints, mnist_classifier, toy
from pretrained.checkpoints import CheckpointError
from pretrained.mnist_classifier import MnistClassifier, load_mnist_classifier, read_classifier_record

needs_mnist = pytest.mark.skipif(not (checkpoints.ASSETS / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file(),
                                 reason="MNIST test set not in the shared assets")


@needs_mnist
def test_committed_classifier_is_at_least_98_percent_right_on_the_held_out_images():
    from pretrained.mnist_data import mnist_split
    from pretrained.train_mnist_classifier import accuracy
    net = load_mnist_classifier()
    images, labels = mnist_split("heldout")
    held = accuracy(net, images, labels)
    assert held >= 0.98
    _, record = read_classifier_record(mnist_classifier.WEIGHTS_FILE)
    # The record's number is this measurement (one image may round differently on another CPU).
    assert abs(record["training"]["heldout_accuracy"] - held) <= 1 / 2000
    assert "every fifth image" in record["training"]["data"]
    assert record["training"]["command"] == "python -m pretrained.train_mnist_classifier"


def test_committed_file_is_under_5_mb_and_small_net_shapes_are_checked():
    assert mnist_classifier.WEIGHTS_FILE.stat().st_size < 5 * 2 ** 20
    net = load_mnist_classifier()
    feats, logits = net(torch.zeros(3, 1, 28, 28))
    assert feats.shape == (3, 128) and logits.shape == (3, 10) and not feats.requires_grad
    with pytest.raises(ValueError, match=r"grey 28×28 images \(B, 1, 28, 28\), got \(3, 3, 28, 28\)"):
        net(torch.zeros(3, 3, 28, 28))


def test_a_changed_committed_file_is_refused_and_the_message_names_its_own_script(changed_committed_file):
    path = changed_committed_file("mnist_classifier.pt")
    with pytest.raises(CheckpointError) as err:
        load_mnist_classifier(path)
    message = str(err.value)
    assert toy.WEIGHTS_SHA256["mnist_classifier.pt"] in message and checkpoints.file_digest(path) in message
    assert "python -m pretrained.train_mnist_classifier" in message and "train_gmm2d" not in message


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_that_are_not_classifier_weights_are_refused_unexecuted(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": mnist_classifier.FORMAT, "x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot read the MNIST classifier weights"):
        load_mnist_classifier(evil)
    assert "this must never run" not in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a pretrained.mnist_classifier/1 weight file"):
        load_mnist_classifier(junk)
    wrong = tmp_path / "wrong.pt"
    net = MnistClassifier(features=64)
    torch.save({"format": mnist_classifier.FORMAT, "arch": {**net.arch(), "features": 128},
                "state_dict": net.state_dict()}, wrong)
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_mnist_classifier(wrong)
    with pytest.raises(FileNotFoundError, match="python -m pretrained.train_mnist_classifier"):
        load_mnist_classifier(tmp_path / "none.pt")


def test_random_shifts_move_whole_images_within_the_bound():
    from pretrained.train_mnist_classifier import random_shifts
    x = torch.zeros(50, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    moved = random_shifts(x, 2, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and torch.equal(moved.sum(dim=(1, 2, 3)), torch.ones(50))
    rows, cols = moved[:, 0].nonzero()[:, 1], moved[:, 0].nonzero()[:, 2]
    assert (rows - 14).abs().max() == 2 and (cols - 14).abs().max() == 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols)}) > 10


@needs_mnist
def test_training_is_bit_for_bit_reproducible(monkeypatch, one_thread):
    from pretrained import train_mnist_classifier as tmc
    from pretrained.mnist_data import mnist_split
    small = {part: tuple(t[:128] for t in mnist_split(part)) for part in ("train", "heldout")}
    monkeypatch.setattr(tmc, "mnist_split", lambda part: small[part])
    first = tmc.train(epochs=1, batch=32, lr=2e-3, shift=2, seed=3, log=False)
    second = tmc.train(epochs=1, batch=32, lr=2e-3, shift=2, seed=3, log=False)
    other = tmc.train(epochs=1, batch=32, lr=2e-3, shift=2, seed=4, log=False)
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    assert not torch.equal(first["state_dict"]["fc.weight"], other["state_dict"]["fc.weight"])
    assert first["training"] == second["training"]
