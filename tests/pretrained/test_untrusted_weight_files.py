"""Weight files a user passes in are never unpickled unverified: every loader refuses a pickle that runs code.

The crafted file is a torch.save'd dict whose unpickling would call ``exec`` and create a marker file; each
test asserts a clear error and that the marker was never created (the code did not run).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pretrained
from bench import features
from bench import run as run_mod
from pretrained.checkpoints import CheckpointError


class _RunsCode:
    """Unpickling this object runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def crafted(tmp_path):
    """(a crafted weights file, the marker file its unpickling would create)."""
    marker = tmp_path / "code-ran.txt"
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_the_crafted_file_does_run_code_when_unpickled(crafted):
    path, marker = crafted
    torch.load(path, weights_only=False)  # what torch-fidelity does with --inception-weights
    assert marker.read_text() == "ran"


def test_inception_weights_from_the_user_are_read_weights_only(crafted):
    path, marker = crafted
    with pytest.raises(features.FeatureWeightsError) as err:
        features.create_extractor("fid", weights_path=path)
    assert not marker.exists()
    message = str(err.value)
    assert "--inception-weights" in message and str(path) in message
    assert features.INCEPTION_SHA256 in message and "nothing in it was run" in message


def test_a_planted_file_in_the_torch_hub_cache_is_read_weights_only(crafted, tmp_path, monkeypatch):
    path, marker = crafted
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / features.INCEPTION_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    with pytest.raises(features.FeatureWeightsError, match="the torch.hub cache file"):
        features.create_extractor("fid")
    assert not marker.exists()


def _image_card(name: str):
    """A cheap exact 'image model' (a Gaussian over 1×28×28 images), so bench.run reaches its FID set-up."""
    from pretrained.analytic import gaussian
    from pretrained.cards import ModelCard
    from solvers import schedules

    mixture, schedule = gaussian(dim=784, mean=0.0, std=0.5), schedules.VPLinear()
    return ModelCard(name=name, kind="image", description="test image model",
                     loader=lambda device="cpu", **kw: mixture.as_model(schedule, "eps"), sample_shape=(1, 28, 28),
                     prediction="eps", schedule_name="VPLinear", reference="mnist-test",
                     to_images=lambda x: ((x + 1) / 2).clamp(0, 1), default_num_samples=8, default_batch_size=8)


def test_bench_run_refuses_crafted_inception_weights_before_sampling(crafted, tmp_path, monkeypatch, capsys):
    path, marker = crafted
    monkeypatch.setitem(pretrained.CARDS, "img_gauss", _image_card("img_gauss"))
    out = tmp_path / "run"
    code = run_mod.main(["--quiet", "--out", str(out), "--model", "img_gauss", "--metric", "fid", "--steps", "1",
                         "--solvers", "ddim", "--inception-weights", str(path)])
    assert code == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert "--inception-weights" in err and str(path) in err and "nothing in it was run" in err
    assert not (out / "results.csv").exists()


@pytest.mark.parametrize("name,options", [
    ("ddpm_mnist", {}), ("ddpm_mnist", {"verify": False}), ("ddpm_cifar", {"verify": False}),
    ("ddpm_cifar_hub", {}), ("cm_gmm2d", {}), ("fm_gmm2d", {}),
])
def test_model_loaders_refuse_a_crafted_weights_file(crafted, name, options):
    path, marker = crafted
    with pytest.raises(CheckpointError) as err:
        pretrained.load(name, weights=path, **options)
    assert not marker.exists()
    assert str(path) in str(err.value)


def test_resnet20_weights_from_the_user_are_read_weights_only(crafted):
    path, marker = crafted
    with pytest.raises(features.FeatureWeightsError) as err:
        features.load_resnet20(path)
    assert not marker.exists()
    assert "--resnet20-weights" in str(err.value) and str(path) in str(err.value)


def test_a_plain_state_dict_of_inception_weights_still_works(tmp_path):
    from bench.studies.perf_studies import random_inception_weights
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = random_inception_weights(tmp_path / "inception-random.pth")
    extractor, layer, name = features.create_extractor("fid", weights_path=path)
    assert (layer, name) == ("2048", "inception-v3-compat")
    direct = FeatureExtractorInceptionV3(name, [layer], feature_extractor_weights_path=str(path)).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (ours,), (theirs,) = extractor(images), direct(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(ours[0], ours[1])
