"""Image features for the benchmark: the ResNet-20 extractor through torch-fidelity, the MNIST reader, the
offline-Inception message and the reference-statistics cache.  Nothing here downloads anything."""
from __future__ import annotations

import gzip
import hashlib
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import datasets, features
from bench import metrics as M

needs_resnet = pytest.mark.assets("resnet20_cifar/resnet20-12fca82f.th")  # see conftest.py: the assets lookup
needs_mnist = pytest.mark.assets("mnist/t10k-images-idx3-ubyte.gz")


def _random_images(n, seed, size=28):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@needs_resnet
def test_resnet20_matches_its_description():
    net = features.load_resnet20()  # strict load: every weight of the checkpoint has its place
    # The README gives 0.27M parameters.
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(0.27e6, rel=0.01)
    x = torch.randn(4, 3, 32, 32)
    pooled, logits = net(x)
    assert pooled.shape == (4, 64) and logits.shape == (4, 10)
    # The logits are the linear layer of the pooled features: the pooled vector is the 64-d feature.
    torch.testing.assert_close(logits, net.linear(pooled))


@needs_resnet
def test_resnet20_extractor_through_torch_fidelity_gives_our_frechet_distance(tmp_path):
    """torch-fidelity's own FID pipeline with our registered extractor == our features + our FD."""
    import torch_fidelity
    a, b = features.UInt8Images(_random_images(120, 0)), features.UInt8Images(_random_images(100, 1) // 2)
    features.register()
    theirs = torch_fidelity.calculate_metrics(input1=a, input2=b, fid=True, feature_extractor="resnet20-cifar10",
                                              feature_layer_fid="64", cuda=False, verbose=False, cache=False,
                                              save_cpu_ram=True, batch_size=50)
    ext, layer, _ = features.create_extractor("fd_resnet20", "cpu")
    fa = features.extract_features(ext, layer, a, batch_size=32)
    fb = features.extract_features(ext, layer, b, batch_size=70)
    assert fa.shape == (120, 64)
    ours = M.frechet_distance_features(fa, fb)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    # Batch-size independence: the same features whatever the batching.
    np.testing.assert_allclose(features.extract_features(ext, layer, a, batch_size=120), fa, rtol=1e-4, atol=1e-5)


def test_to_uint8_rgb_rounds_and_repeats_grey():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2]).reshape(1, 1, 2, 2)
    out = features.to_uint8_rgb(x)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.uint8
    assert out[0, :, 0, 1].tolist() == [128, 128, 128]  # 127.5 rounds to 128, like a PNG writer
    assert out[0, 0, 1, 1] == 255
    with pytest.raises(ValueError, match="1 or 3"):
        features.to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_offline_inception_says_so_and_names_the_alternative(monkeypatch, tmp_path):
    # Offline: an empty torch hub cache and a download that fails as urllib does without a network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(features.OfflineFeatureExtractorError) as info:
        features.create_extractor("fid", "cpu")
    msg = str(info.value)
    assert calls and "inception" in calls[0].lower()
    assert "could not be downloaded" in msg and "offline" in msg
    assert "--metric fd_resnet20" in msg and "FD (ResNet-20)" in msg and "not FID" in msg
    assert "--inception-weights" in msg


def _write_idx(path, images):
    header = struct.pack(">IIII", 2051, images.shape[0], images.shape[1], images.shape[2])
    path.write_bytes(gzip.compress(header + images.tobytes()))


def test_read_idx_images_round_trip_and_errors(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", imgs)
    np.testing.assert_array_equal(datasets.read_idx_images(tmp_path / "a.gz"), imgs)
    (tmp_path / "bad").write_bytes(struct.pack(">IIII", 2049, 1, 1, 1) + b"\0")
    with pytest.raises(ValueError, match="magic 2049"):
        datasets.read_idx_images(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">IIII", 2051, 5, 2, 2) + b"\0" * 3)
    with pytest.raises(ValueError, match="holds 3 bytes"):
        datasets.read_idx_images(tmp_path / "short")


@needs_mnist
def test_mnist_test_images_are_the_published_ones():
    images = datasets.mnist_test_images()
    assert images.shape == (10000, 3, 28, 28) and images.dtype == torch.uint8
    # The asset README gives the md5 of the decompressed IDX file (16-byte header + pixels).
    raw = struct.pack(">IIII", 2051, 10000, 28, 28) + images[:, 0].numpy().tobytes()
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"


@needs_resnet
@needs_mnist
def test_reference_statistics_are_cached_under_a_versioned_key(tmp_path):
    ext, layer, name = features.create_extractor("fd_resnet20", "cpu")
    first = datasets.reference_statistics("mnist-test", ext, layer, name, size=200, cache_dir=tmp_path,
                                          floor_n=50)
    path = Path(first["cache_path"])
    import torch_fidelity

    import bench
    for part in ("mnist-test", "n200", name, layer, f"torch_fidelity{torch_fidelity.__version__}",
                 f"bench{bench.__version__}"):
        assert part in path.name
    assert not first["cached"] and first["floor"][0] > 0 and first["floor"][1] > 0
    second = datasets.reference_statistics("mnist-test", ext, layer, name, size=200, cache_dir=tmp_path,
                                           floor_n=50)
    assert second["cached"] and second["floor"] == first["floor"]
    np.testing.assert_array_equal(second["sigma"], first["sigma"])
    # The statistics are those of the first 200 test images.
    feats = features.extract_features(ext, layer, features.UInt8Images(datasets.mnist_test_images()[:200]))
    np.testing.assert_allclose(first["mu"], feats.mean(0), rtol=1e-6, atol=1e-8)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_the_inception_download_is_checked_before_anything_unpickles_it(monkeypatch, tmp_path):
    """With an empty cache the project downloads the file itself: a download that is not the published file
    (here a pickle that would write a marker when unpickled) is refused by its sha256, deleted and never read."""
    import pickle
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    def served(url, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            pickle.dump(Crafted(), f)

    monkeypatch.setattr(torch.hub, "download_url_to_file", served)
    with pytest.raises(features.FeatureWeightsError, match=r"sha256 .* not the published .* never unpickled"):
        features.create_extractor("fid", "cpu")
    assert not marker.exists()
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir()), "nothing is left in the cache"
