"""bench.run --save-samples: every cell's samples in OUT/samples/CELL.npz, for users' own metrics."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import pretrained
from bench import run as run_mod


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _bench(out, *args) -> int:
    return run_mod.main(["--quiet", "--out", str(out), "--model", "gmm2d", "--num-samples", "40", "--batch-size", "15",
                         "--solvers", "ddim,heun", "--steps", "2,5", "--repeats", "1", *args])


def test_every_cell_writes_all_its_samples_with_the_cards_value_range(tmp_path):
    out = tmp_path / "o"
    assert _bench(out, "--save-samples") == 0
    df = pd.read_csv(out / "results.csv")
    card = pretrained.get_card("gmm2d")
    assert sorted(p.stem for p in (out / "samples").iterdir()) == sorted(df["cell_id"])
    for _, row in df.iterrows():
        with np.load(out / "samples" / f"{row['cell_id']}.npz", allow_pickle=False) as z:
            samples, value_range = z["samples"], z["value_range"]
        assert samples.shape == (40, 2) and samples.dtype == np.float32
        np.testing.assert_array_equal(value_range, np.asarray(card.data_range, np.float64))
        with np.load(out / "previews" / f"{row['cell_id']}.npz", allow_pickle=False) as z:
            np.testing.assert_array_equal(z["data"], samples)   # the preview is every sample of a 2-D model
        assert np.isfinite(samples).all() and len(np.unique(samples[:, 0])) == 40


def test_without_the_flag_no_samples_are_written(tmp_path):
    out = tmp_path / "o"
    assert _bench(out) == 0
    assert not (out / "samples").exists()


@pytest.mark.skipif(not (pretrained.checkpoints.ASSETS / "mnist").is_dir(), reason="../shared/assets/mnist/ is absent")
def test_image_samples_are_n_c_h_w_in_the_cards_data_scale(tmp_path):
    out = tmp_path / "img"
    assert run_mod.main(["--quiet", "--out", str(out), "--model", "fm_mnist", "--num-samples", "6", "--solvers",
                         "euler", "--steps", "3", "--repeats", "1", "--save-samples", "--threads", "1",
                         "--cache-dir", str(tmp_path / "cache")]) == 0
    (path,) = (out / "samples").iterdir()
    with np.load(path, allow_pickle=False) as z:
        samples, value_range = z["samples"], z["value_range"]
    assert samples.shape == (6, 1, 28, 28) and value_range.tolist() == [-1.0, 1.0]
    # Mostly background: near the low end of the range, as MNIST digits are.
    assert np.median(samples) < -0.8 and samples.max() > 0.5
    with np.load(out / "previews" / path.name, allow_pickle=False) as z:   # the preview: the same images as uint8
        expected = np.round(np.clip((samples + 1) / 2, 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(z["data"][:, :1], expected)
