"""A cell's features are made batch by batch while it samples, so the harness's memory is bounded by the batch
size and not by --num-samples: image features are folded into running moments, and the metric is the same
whatever the batch size."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import pretrained
from bench import references
from bench import run as run_mod
from bench.metrics import FeatureMoments
from bench.references import PREVIEW_IMAGES, CellFeatures
from tests.bench.image_models import mixture_image_card

SHAPE = (3, 8, 8)


def _fake_evaluator(solutions=None) -> SimpleNamespace:
    """An image evaluator whose 'features' are the flattened samples (d = 192) and whose classifier is right on
    even samples."""
    def image_features(cell, samples, labels):
        flat = samples.reshape(len(samples), -1).double().numpy()
        return {"features": flat, "preview": (samples[:PREVIEW_IMAGES] * 0).to(torch.uint8).numpy(),
                "class_accuracy": (labels.numpy() % 2 == 0).astype(np.float64)}
    return SimpleNamespace(image=True, solutions=solutions, image_features=image_features)


def _batches(n_batches: int, size: int = 8):
    g = torch.Generator().manual_seed(1)
    for i in range(n_batches):
        yield torch.randn((size, *SHAPE), generator=g), torch.arange(i * size, (i + 1) * size)


def test_an_image_cell_keeps_only_running_moments_however_many_batches_it_samples():
    cell = SimpleNamespace(deterministic=True)
    held = []
    for n_batches in (8, 128):
        features = CellFeatures(_fake_evaluator(), cell)
        all_samples = []
        for samples, labels in _batches(n_batches):
            features.add(samples, samples, latents=samples, labels=labels)
            all_samples.append(samples)
        assert features.kept == []                       # no sample, x_T or state is kept
        out = features.result()
        assert isinstance(out["features"], FeatureMoments) and out["features"].n == 8 * n_batches
        assert len(out["preview"]) == min(PREVIEW_IMAGES, 8 * n_batches) and out["class_accuracy"].mean() == 0.5
        flat = torch.cat(all_samples).reshape(8 * n_batches, -1).double().numpy()
        np.testing.assert_allclose(out["features"].statistics()[1], np.cov(flat, rowvar=False), atol=1e-12)
        held.append(sum(a.nbytes for a in (out["features"].mean, out["features"].m2, out["preview"])))
    assert held[0] == held[1]                            # the same memory for 16× the samples


def test_what_a_reference_solution_needs_is_kept_whole_and_only_then():
    cell = SimpleNamespace(deterministic=True)
    features = CellFeatures(_fake_evaluator(solutions=object()), cell)
    for samples, labels in _batches(3):
        features.add(samples, samples, latents=samples, labels=labels)
    assert len(features.kept) == 3
    stochastic = CellFeatures(_fake_evaluator(solutions=object()), SimpleNamespace(deterministic=False))
    assert not stochastic.keep_whole


@pytest.mark.assets("mnist", "resnet20_cifar")
def test_the_fd_of_a_sweep_does_not_depend_on_its_batch_size(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.CARDS, "img_stream", mixture_image_card("img_stream"))
    seen = []
    plain = references.Evaluator.image_features

    def recording(self, cell, samples, labels):
        seen.append(len(samples))
        return plain(self, cell, samples, labels)

    monkeypatch.setattr(references.Evaluator, "image_features", recording)
    fd = {}
    for batch in (10, 48):
        out = tmp_path / f"b{batch}"
        assert run_mod.main(["--model", "img_stream", "--solvers", "ddim", "--steps", "2", "--num-samples", "48",
                             "--batch-size", str(batch), "--reference-size", "200", "--repeats", "1", "--quiet",
                             "--no-report", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
        fd[batch] = float(pd.read_csv(Path(out) / "results.csv")["metric.fd_resnet20"].iloc[0])
    assert seen == [10, 10, 10, 10, 8, 48]               # never more than a batch at once
    assert fd[10] == pytest.approx(fd[48], rel=1e-9) and fd[10] > 0
