"""The fd_mnist metric: Fréchet distance in the MNIST classifier's penultimate features, always against the
2,000 held-out MNIST images (bench.metrics, bench.features, bench.datasets, bench.references)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pretrained
from bench import datasets, features, metrics as M, run as run_mod
from pretrained.mnist_classifier import load_mnist_classifier
from pretrained.mnist_data import mnist_split
from tests.bench.image_models import mixture_image_card

needs_mnist = pytest.mark.skipif(not (pretrained.checkpoints.ASSETS / "mnist").is_dir(),
                                 reason="../shared/assets/mnist/ is absent")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_fd_mnist_is_labelled_for_what_it_is_never_fid():
    spec = M.get_metric("fd_mnist")
    assert spec.label == "FD (MNIST classifier)" and "FID" not in spec.label
    assert spec.source == "fd_mnist" and features.EXTRACTORS["fd_mnist"] == ("mnist-classifier", "128")


def test_fd_mnist_fits_mnist_models_only_and_says_why_not():
    assert "fd_mnist" in M.metrics_for(pretrained.get_card("ddpm_mnist"))
    assert "fd_mnist" in M.metrics_for(mixture_image_card("own_mnist", "mnist-heldout"))
    spec = M.get_metric("fd_mnist")
    assert "1×28×28" in spec.unfit_reason(pretrained.get_card("ddpm_cifar"))
    assert "for image models" in spec.unfit_reason(pretrained.get_card("gmm2d"))
    own = dataclasses.replace(pretrained.get_card("ddpm_mnist"), reference="my_digits/")
    assert "held-out MNIST images only" in spec.unfit_reason(own) and "use fd_resnet20" in spec.unfit_reason(own)


def test_default_metric_is_fd_mnist_for_the_projects_own_mnist_models_only():
    assert M.default_metrics(mixture_image_card("own_mnist", "mnist-heldout")) == ["fd_mnist"]
    assert M.default_metrics(pretrained.get_card("ddpm_mnist")) == ["fd_resnet20"]  # unchanged
    assert M.get_metric("fd_mnist").reference_for(pretrained.get_card("ddpm_mnist")) == "mnist-heldout"
    assert M.get_metric("fd_resnet20").reference_for(pretrained.get_card("ddpm_mnist")) == "mnist-test"


@needs_mnist
def test_extractor_gives_the_classifiers_penultimate_features_for_any_batch_size():
    ext, layer, name = features.create_extractor("fd_mnist", "cpu")
    assert (layer, name) == ("128", "mnist-classifier")
    images = datasets.mnist_heldout_images()[:100]
    feats = features.extract_features(ext, layer, features.UInt8Images(images), batch_size=100)
    small = features.extract_features(ext, layer, features.UInt8Images(images), batch_size=7)
    with torch.no_grad():
        direct = load_mnist_classifier().penultimate(images[:, :1].float() / 255.0).double().numpy()
    assert feats.shape == (100, 128)
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small, feats, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"uint8 images \(B, 3, 28, 28\)"):
        ext(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@needs_mnist
def test_reference_statistics_are_those_of_the_2000_held_out_images(tmp_path):
    ext, layer, name = features.create_extractor("fd_mnist", "cpu")
    ref = datasets.reference_statistics("mnist-heldout", ext, layer, name, cache_dir=tmp_path, floor_n=500)
    assert ref["n"] == 2000 and not ref["cached"]
    assert "mnist-heldout-n2000-mnist-classifier-128" in Path(ref["cache_path"]).name
    feats = features.extract_features(ext, layer, features.UInt8Images(datasets.mnist_heldout_images()))
    np.testing.assert_allclose(ref["mu"], feats.mean(0), rtol=1e-6, atol=1e-8)
    again = datasets.reference_statistics("mnist-heldout", ext, layer, name, cache_dir=tmp_path, floor_n=500)
    assert again["cached"] and again["floor"] == ref["floor"]


@needs_mnist
def test_fd_mnist_ranks_unseen_real_digits_near_the_floor_and_damaged_ones_far_above(tmp_path):
    ext, layer, name = features.create_extractor("fd_mnist", "cpu")
    ref = datasets.reference_statistics("mnist-heldout", ext, layer, name, cache_dir=tmp_path, floor_n=500)
    spec = M.get_metric("fd_mnist")
    train = mnist_split("train")[0][:500]

    def fd(images):
        return spec.value(features.extract_features(ext, layer, features.UInt8Images(images.expand(-1, 3, -1, -1))),
                          ref)

    real = fd(train)
    noisy = fd((train.float() + 60 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0)))
               .clamp(0, 255).to(torch.uint8))
    blurred = fd(torch.nn.functional.avg_pool2d(train.float(), 3, 1, 1).to(torch.uint8))
    floor = ref["floor"][0]
    # 500 real training images are real digits the reference never contains: a perfect model scores like them,
    # a bit above the floor (subsets of the reference itself); damaged digits score far higher.
    assert floor < real < 4 * floor
    assert noisy > 5 * real and blurred > 2 * real


@needs_mnist
def test_bench_run_measures_fd_mnist_against_the_held_out_images_whatever_the_cards_mnist_reference(
        tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.CARDS, "img_mix", mixture_image_card("img_mix", "mnist-test"))
    out = tmp_path / "img"
    assert run_mod.main(["--quiet", "--out", str(out), "--model", "img_mix", "--solvers", "ddim", "--steps", "2",
                         "--metric", "fd_mnist", "--cache-dir", str(tmp_path / "cache")]) == 0
    df = pd.read_csv(out / "results.csv")
    assert json.loads(df["metric_labels"].iloc[0])["fd_mnist"] == "FD (MNIST classifier)"
    assert (df["metric.fd_mnist"] > 0).all()
    info = json.loads((out / "reference.json").read_text())["metrics"]
    assert info["fd_mnist"]["note"].startswith("vs mnist-heldout, MNIST test images held out from the classifier's training (every fifth; n_ref = 2,000)")
    assert info["fd_mnist"]["floor"][0] > 0
    cached = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(cached) == 1 and "mnist-heldout-n2000-mnist-classifier-128" in cached[0]
    assert "| FD (MNIST classifier) |" in (out / "report.md").read_text()


def test_fd_mnist_with_your_own_reference_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    from PIL import Image
    for name in ("a.png", "b.png"):  # two: the fewest a Fréchet distance takes
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / name)
    code = run_mod.main(["--quiet", "--out", str(tmp_path / "o"), "--model", "ddpm_mnist", "--reference", str(folder),
                         "--metric", "fd_mnist"])
    assert code == 2
    err = capsys.readouterr().err
    assert "metric 'fd_mnist' does not fit model 'ddpm_mnist'" in err and "use fd_resnet20" in err
