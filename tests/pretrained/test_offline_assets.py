"""Where the offline assets are looked for, and what a "not found" error says.

The assets folder is ``$DIFFUSION_SOLVERS_ASSETS``, else ``../shared/assets`` beside the source checkout
(meaningless after a non-editable install).  Every "not found" error names the variable, the path looked at
and the command-line flag that supplies the file.
"""
from __future__ import annotations

import pytest

import pretrained
from bench import features
from pretrained import checkpoints


@pytest.fixture
def empty_assets(tmp_path, monkeypatch):
    """DIFFUSION_SOLVERS_ASSETS pointing at an empty folder; offline, with an empty cache."""
    folder = tmp_path / "assets"
    folder.mkdir()
    monkeypatch.setenv("DIFFUSION_SOLVERS_ASSETS", str(folder))
    monkeypatch.setenv("DIFFUSION_SOLVERS_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSION_SOLVERS_CACHE", str(tmp_path / "cache"))
    for name in ("DDPM_MNIST_WEIGHTS", "BENCH_RESNET20_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    return folder


def test_the_assets_folder_is_read_from_the_environment_at_every_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_SOLVERS_ASSETS", str(tmp_path))
    assert checkpoints.assets_dir() == tmp_path
    assert "set by $DIFFUSION_SOLVERS_ASSETS" == checkpoints.assets_origin()
    monkeypatch.delenv("DIFFUSION_SOLVERS_ASSETS")
    assert checkpoints.assets_dir() == checkpoints.CHECKOUT_ASSETS
    assert checkpoints.CHECKOUT_ASSETS.parts[-2:] == ("shared", "assets")
    assert "$DIFFUSION_SOLVERS_ASSETS is not set" in checkpoints.assets_origin()


def test_ddpm_mnist_not_found_names_the_variable_the_paths_and_the_flag(empty_assets, tmp_path):
    with pytest.raises(pretrained.WeightsNotFoundError) as err:
        pretrained.load("ddpm_mnist")
    message = str(err.value)
    assert str(empty_assets / "ddpm_mnist" / "ddpm_mnist.pth") in message
    assert str(tmp_path / "cache" / "ddpm_mnist.pth") in message
    assert "DIFFUSION_SOLVERS_ASSETS=FOLDER" in message and "set by $DIFFUSION_SOLVERS_ASSETS" in message
    assert "--weights PATH" in message and "$DDPM_MNIST_WEIGHTS (not set)" in message


def test_ddpm_mnist_is_found_in_the_folder_the_variable_names(empty_assets, tmp_path):
    import shutil
    real = checkpoints.ASSETS / "ddpm_mnist" / "ddpm_mnist.pth"  # the lookup at import, before the fixture
    if not real.is_file():
        pytest.skip(f"{real} is absent (needed to copy into a DIFFUSION_SOLVERS_ASSETS folder)")
    (empty_assets / "ddpm_mnist").mkdir()
    shutil.copy(real, empty_assets / "ddpm_mnist" / "ddpm_mnist.pth")
    model = pretrained.load("ddpm_mnist")
    assert model.prediction == "eps"


def test_resnet20_not_found_names_the_variable_the_path_and_the_flag(empty_assets):
    with pytest.raises(features.OfflineFeatureExtractorError) as err:
        features.load_resnet20()
    message = str(err.value)
    assert str(empty_assets / "resnet20_cifar" / "resnet20-12fca82f.th") in message
    assert "DIFFUSION_SOLVERS_ASSETS" in message and "--resnet20-weights PATH" in message
    with pytest.raises(features.OfflineFeatureExtractorError) as err:
        features.create_extractor("fd_resnet20")
    assert str(empty_assets / "resnet20_cifar") in str(err.value)


def test_a_missing_resnet20_file_given_explicitly_is_named(empty_assets, tmp_path):
    missing = tmp_path / "nowhere" / "resnet20.th"
    with pytest.raises(features.OfflineFeatureExtractorError) as err:
        features.load_resnet20(missing)
    assert f"--resnet20-weights / $BENCH_RESNET20_WEIGHTS point to {missing}, which does not exist" in str(err.value)


def test_mnist_images_and_the_unet_config_not_found_name_the_variable_and_the_path(empty_assets):
    """The MNIST reference images and the e2e benchmark's UNet config are looked up at call time, through the
    same assets folder, and their errors say where they looked and which variable moves the folder."""
    from bench import datasets
    from bench.studies import perf
    with pytest.raises(datasets.ReferenceDataError) as err:
        datasets.mnist_test_images()
    message = str(err.value)
    assert str(empty_assets / "mnist" / "t10k-images-idx3-ubyte.gz") in message
    assert "DIFFUSION_SOLVERS_ASSETS" in message
    with pytest.raises(FileNotFoundError) as err:
        perf.load_cifar_unet()
    message = str(err.value)
    assert str(empty_assets / "ddpm_cifar10_32" / "unet_config.json") in message
    assert "DIFFUSION_SOLVERS_ASSETS" in message
