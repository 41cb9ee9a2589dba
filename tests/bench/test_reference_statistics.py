"""User reference data for image metrics and the cache of reference statistics: a statistics ``.npz``
(``--reference STATS.npz``) or an image folder is checked before any sampling, one line per fault, and a
cached statistics file is verified before use and recomputed when it fails.  The feature extractor is a
stand-in (the channel means of each image, d = 3), so nothing here needs the offline assets."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import datasets

EXTRACTOR, LAYER, NAME = object(), "3", "channel-means"  # d = 3: torch-fidelity's layers are named by their width


@pytest.fixture
def channel_means(monkeypatch):
    """Features = the channel means of each image (d = 3); counts the images it was given."""
    seen = []

    def extract(extractor, layer, dataset, **kwargs):
        assert extractor is EXTRACTOR and layer == LAYER
        seen.append(len(dataset))
        return np.stack([dataset[i].to(torch.float64).mean(dim=(1, 2)).numpy() for i in range(len(dataset))])

    monkeypatch.setattr(datasets, "extract_features", extract)
    return seen


def _images(folder: Path, n: int, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _stats(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "stats.npz"
    np.savez(path, **arrays)
    return path


def _statistics(reference, tmp_path, **kwargs):
    return datasets.reference_statistics(str(reference), EXTRACTOR, LAYER, NAME, cache_dir=tmp_path / "cache",
                                         **kwargs)


GOOD_MU, GOOD_SIGMA = np.array([1.0, 2.0, 3.0]), np.diag([1.0, 2.0, 0.0])  # singular: still a covariance


# -- a statistics file ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arrays, wrong, right", [
    ({"mu": np.array([np.nan, 2.0, 3.0]), "sigma": GOOD_SIGMA}, "mu holds 1 NaN or infinite value", "finite"),
    ({"mu": GOOD_MU, "sigma": np.where(np.eye(3) > 0, np.inf, 0.0)}, "sigma holds 3 NaN or infinite values",
     "finite"),
    ({"mu": GOOD_MU, "sigma": np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]])}, "sigma is not symmetric",
     "a covariance is symmetric"),
    ({"mu": GOOD_MU, "sigma": np.diag([1.0, -0.5, 1.0])}, "sigma has a negative eigenvalue (-0.5;",
     "positive semi-definite"),
    ({"mu": GOOD_MU[None], "sigma": GOOD_SIGMA}, "mu has shape (1, 3)", "mu (d,) and sigma (d, d)"),
    ({"mu": GOOD_MU, "sigma": np.eye(2)}, "sigma has shape (2, 2)", "mu (d,) and sigma (d, d)"),
    ({"mu": GOOD_MU}, "no array sigma", "arrays mu and sigma"),
    ({"mu": np.array([object()], dtype=object), "sigma": GOOD_SIGMA}, "pickled", "plain numeric arrays"),
])
def test_a_bad_statistics_file_is_one_line_naming_the_file_the_fault_and_the_remedy(tmp_path, arrays, wrong,
                                                                                    right):
    path = _stats(tmp_path, **arrays)
    for check in (lambda: datasets.check_reference(str(path)), lambda: _statistics(path, tmp_path)):
        with pytest.raises((datasets.ReferenceDataError, ValueError)) as info:
            check()
        message = str(info.value)
        assert str(path) in message and wrong in message and right in message and "\n" not in message


def test_a_statistics_file_of_another_feature_dimension_is_refused_with_the_extractors(tmp_path):
    path = _stats(tmp_path, mu=np.zeros(5), sigma=np.eye(5))
    datasets.check_reference(str(path))  # the extractor is not known yet: the file itself is fine
    with pytest.raises(datasets.ReferenceDataError) as info:
        _statistics(path, tmp_path)
    assert (f"{path}: the statistics are 5-dimensional but {NAME} (layer {LAYER}) gives 3-dimensional features"
            in str(info.value))


def test_the_command_line_refuses_a_bad_statistics_file_before_loading_the_model(tmp_path, capsys):
    from bench import run
    path = _stats(tmp_path, mu=np.zeros(64), sigma=np.diag(np.r_[np.ones(63), np.nan]))
    assert run.main(["--quiet", "--out", str(tmp_path / "o"), "--model", "ddpm_mnist", "--reference", str(path),
                     "--metric", "fd_resnet20"]) == 2
    assert capsys.readouterr().err == (f"bench.run: error: --reference: {path}: sigma holds 1 NaN or infinite value; "
                                       "statistics are finite (compute them again from finite features)\n")
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_no_npz_is_one_line(tmp_path):
    path = tmp_path / "stats.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"stats\.npz: not a statistics \.npz"):
        datasets.check_reference(str(path))


def test_a_good_statistics_file_is_read_as_float64(tmp_path):
    path = _stats(tmp_path, mu=GOOD_MU.astype(np.float32), sigma=GOOD_SIGMA.astype(np.float32), n=np.array(500))
    ref = _statistics(path, tmp_path)
    assert ref["mu"].dtype == np.float64 and ref["n"] == 500 and ref["floor"] is None
    np.testing.assert_array_equal(ref["sigma"], GOOD_SIGMA)


# -- an image folder ---------------------------------------------------------------------------------------------
def test_a_folder_of_one_image_is_refused_saying_how_many_are_needed(tmp_path, channel_means):
    folder = _images(tmp_path / "one", 1)
    with pytest.raises(ValueError, match=r"holds 1 image; the Fréchet distance needs at least 2"):
        datasets.check_reference(str(folder))
    with pytest.raises(datasets.ReferenceDataError, match=r"holds 1 image; the Fréchet distance needs at least 2"):
        _statistics(folder, tmp_path)
    assert channel_means == []


@pytest.mark.parametrize("limit", [100, 200])  # 8×8 = 64 … 256 pixels: PIL's error beyond 2× the limit, else warning
def test_a_decompression_bomb_in_the_folder_is_one_line(tmp_path, monkeypatch, channel_means, limit):
    folder = _images(tmp_path / "imgs", 3)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(datasets.ReferenceDataError) as info:
        _statistics(folder, tmp_path)
    message = str(info.value)
    assert f"{folder / 'huge.png'} has 256 pixels, more than PIL's limit of {limit}" in message
    assert "PIL.Image.MAX_IMAGE_PIXELS" in message and "\n" not in message
    assert channel_means == []


# -- the cache ---------------------------------------------------------------------------------------------------
def _cached(tmp_path, channel_means):
    folder = _images(tmp_path / "imgs", 6)
    first = _statistics(folder, tmp_path, floor_n=3)
    assert not first["cached"] and channel_means == [6]
    return folder, first, Path(first["cache_path"])


def _corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _corrupt_short_mu(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mu"] = arrays["mu"][:1]  # would broadcast against the samples' 3-d mean
    np.savez(path, **arrays)


def _corrupt_nan(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["sigma"] = np.full_like(arrays["sigma"], np.nan)
    np.savez(path, **arrays)


def _corrupt_values(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mu"] = arrays["mu"] + 1.0  # plausible, but not what was computed: only the digest tells
    np.savez(path, **arrays)


def _corrupt_pickled(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mu"] = np.array([object()], dtype=object)
    np.savez(path, **arrays)


@pytest.mark.parametrize("corrupt, reason", [
    (_corrupt_truncated, "not a statistics .npz"), (_corrupt_short_mu, "mu has shape (1,)"),
    (_corrupt_nan, "NaN or infinite"), (_corrupt_values, "digest"), (_corrupt_pickled, "pickled"),
])
def test_a_corrupt_cache_file_is_recomputed_and_rewritten_saying_so(tmp_path, capsys, channel_means, corrupt,
                                                                    reason):
    folder, first, path = _cached(tmp_path, channel_means)
    capsys.readouterr()
    corrupt(path)
    again = _statistics(folder, tmp_path, floor_n=3)
    err = capsys.readouterr().err
    assert not again["cached"] and channel_means == [6, 6]
    assert err.count("\n") == 1 and str(path) in err and reason in err and "computing them again" in err
    np.testing.assert_array_equal(again["mu"], first["mu"])
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    third = _statistics(folder, tmp_path, floor_n=3)  # the rewritten file is good
    assert third["cached"] and channel_means == [6, 6] and capsys.readouterr().err == ""
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # written atomically: no stray files


def test_a_good_cache_file_is_used_without_a_word(tmp_path, capsys, channel_means):
    folder, first, path = _cached(tmp_path, channel_means)
    capsys.readouterr()
    second = _statistics(folder, tmp_path, floor_n=3)
    assert second["cached"] and second["floor"] == first["floor"] and channel_means == [6]
    assert capsys.readouterr().err == ""
    with zipfile.ZipFile(path) as z:
        assert "meta.npy" in z.namelist()
