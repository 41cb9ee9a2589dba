"""The model zoo as a whole: the registry, every card loading and taking a solver step, and the weight files'
failure modes (checksums, offline, atomic downloads) — all offline.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import pretrained
import solvers
from pretrained.checkpoints import CheckpointError, WeightsNotFoundError, WeightsSource, check_state_dict, \
    read_state_dict, resolve_weights
from pretrained.consistency import CD_TEST_CONFIG

EXPECTED = {"gmm2d", "gmm", "gaussian", "ddpm_mnist", "ddpm_cifar", "ddpm_cifar_hub", "cd_imagenet64_l2",
            "cm_gmm2d", "fm_gmm2d", "cfg_mnist", "cm_mnist", "ldm_mnist"}
COMMITTED_WEIGHTS = ("fm_mnist", "cfg_mnist", "cm_mnist", "ldm_mnist")   # loaded from pretrained/weights/


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may download: switch downloads off and point the cache at an empty folder."""
    monkeypatch.setenv("DIFFUSION_SOLVERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSION_SOLVERS_CACHE", str(tmp_path / "cache"))


def test_available_models_lists_the_zoo():
    assert EXPECTED <= set(pretrained.available_models())
    assert pretrained.available_models() == sorted(pretrained.available_models())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        pretrained.load("ddpm_mnsit")
    for name in EXPECTED:
        assert name in str(e.value)


# -- every card loads and takes one solver step ---------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_weights(tmp_path_factory, offline_asset):
    """Random-weight files in each card's on-disk format (built lazily, once per module)."""
    root = tmp_path_factory.mktemp("zoo_weights")
    made = {}

    def get(name: str):
        if name in made:
            return made[name]
        if name in ("ddpm_cifar", "ddpm_cifar_hub"):
            from pretrained.ddpm_unet import DDPMUNet
            path = root / "cifar.ckpt"
            if not path.exists():
                torch.manual_seed(0)
                torch.save(DDPMUNet().state_dict(), path)
            made[name] = ({"weights": path, "verify": False} if name == "ddpm_cifar" else {"weights": path})
        elif name == "cd_imagenet64_l2":
            diffusers = pytest.importorskip("diffusers", reason="cd_imagenet64_l2 runs on diffusers' UNet2DModel")
            torch.manual_seed(0)
            folder = root / "cd_small"
            diffusers.UNet2DModel(**CD_TEST_CONFIG).save_pretrained(folder)
            made[name] = {"weights": folder, "strict_config": False}
        elif name == "ddpm_mnist":
            offline_asset("ddpm_mnist/ddpm_mnist.pth")  # found there by the card's own lookup
            made[name] = {}
        elif pretrained.get_card(name).kind in ("analytic", "points") or name in COMMITTED_WEIGHTS:
            made[name] = {}   # exact models, or weights committed in pretrained/weights/
        else:
            raise AssertionError(f"no offline fixture for the card {name!r}: add one to this test")
        return made[name]

    return get


@pytest.mark.parametrize("kwargs", [dict(num_classes=10), dict(condition=lambda m, labels, w: m),
                                    dict(default_guidance=(3.0,))])
def test_a_half_conditional_card_is_refused(kwargs):
    card = pretrained.get_card("gmm2d")
    fields = {f: getattr(card, f) for f in ("name", "kind", "description", "loader", "sample_shape", "prediction",
                                           "schedule_name")}
    with pytest.raises(ValueError, match="class-conditional"):
        pretrained.ModelCard(**fields, **kwargs)
    assert pretrained.ModelCard(**fields).num_classes == 0


@pytest.mark.parametrize("name", pretrained.available_models())
def test_every_card_loads_and_runs_one_solver_step(name, fixture_weights):
    card = pretrained.get_card(name)
    kwargs = fixture_weights(name)
    model = pretrained.load(name, **kwargs)
    assert isinstance(model, solvers.DiffusionModel) and model.prediction == card.prediction
    shape = card.sample_shape
    if name == "cd_imagenet64_l2":   # the small stand-in network, not the 64×64 one
        shape = (3, CD_TEST_CONFIG["sample_size"], CD_TEST_CONFIG["sample_size"])
    solver = "consistency" if "consistency" in card.default_solver_options else "ddim"
    options = card.default_solver_options.get(solver, {})
    x_T = solvers.initial_noise((2, *shape), seeds=[0, 1], schedule=model.schedule)
    res = solvers.sample(model, x_T, solver=solver, steps=1, spacing="uniform" if name == "fm_gmm2d" else "karras",
                         **options)
    assert res.nfe == 1 and res.samples.shape == x_T.shape and torch.isfinite(res.samples).all()
    if card.to_images is not None:
        img = card.to_images(res.samples)
        assert img.dim() == 4 and float(img.min()) >= 0.0 and float(img.max()) <= 1.0


@pytest.mark.parametrize("name", pretrained.available_models())
def test_cards_are_complete_and_name_their_sources(name):
    card = pretrained.get_card(name)
    assert card.kind in ("analytic", "points", "image") and card.description
    assert card.prediction in solvers.PREDICTIONS
    for desc, entry in card.published.items():
        value, source = entry
        assert isinstance(value, (int, float)) and isinstance(source, str) and len(source) > 10, desc
    for solver, options in card.default_solver_options.items():
        solvers.get_solver(solver, **options)   # valid solver names and options
    if card.kind == "image":
        assert card.to_images is not None and card.reference not in ("", "exact")
        assert card.licence and card.weights_note and card.source_url
        lo, hi = card.data_range
        ends = card.to_images(torch.tensor([lo, hi]).reshape(1, 1, 1, 2))
        torch.testing.assert_close(ends.flatten(), torch.tensor([0.0, 1.0]))
    else:
        assert card.data_sampler is not None and card.reference == "exact"
        assert card.data_sampler(5, 0).shape == (5, *card.sample_shape)
    for digest, length in ((card.sha256, 64), (card.md5, 32)):
        assert digest is None or (len(digest) == length and int(digest, 16) >= 0)
    assert json.dumps(card.summary(), default=str)


def test_mnist_card_defaults_follow_the_brief():
    card = pretrained.get_card("ddpm_mnist")
    assert 0 < card.default_batch_size <= card.default_num_samples   # tuned by the benchmark's timing
    assert card.reference == "mnist-test" and card.data_range == (-0.5, 0.5)
    torch.testing.assert_close(card.to_images(torch.tensor([[[[-0.7, -0.5, 0.0, 0.5]]]])),
                               torch.tensor([[[[0.0, 0.0, 0.5, 1.0]]]]))


# -- weight files: checksums, offline, atomic downloads -------------------------------------------------
def _source(tmp_path, payload: bytes, **kw) -> tuple[WeightsSource, Path]:
    origin = tmp_path / "origin.bin"
    origin.write_bytes(payload)
    fields = dict(filename="w.bin", url=origin.as_uri(), env_var="ZOO_TEST_WEIGHTS", description="the test weights")
    fields.update(kw)
    return WeightsSource(**fields), origin


def test_download_verifies_before_it_enters_the_cache(tmp_path):
    payload = b"some weights"
    good = hashlib.sha256(payload).hexdigest()
    source, _ = _source(tmp_path, payload, sha256=good)
    path = resolve_weights(source, cache=tmp_path / "c1", download=True)
    assert path == tmp_path / "c1" / "w.bin" and path.read_bytes() == payload
    # Second call: from the cache, no download needed.
    assert resolve_weights(source, cache=tmp_path / "c1", download=False) == path

    bad, _ = _source(tmp_path, payload, sha256="0" * 64)
    with pytest.raises(CheckpointError) as e:
        resolve_weights(bad, cache=tmp_path / "c2", download=True)
    assert "sha256" in str(e.value) and good in str(e.value) and "0" * 64 in str(e.value)
    assert not any((tmp_path / "c2").iterdir())   # nothing written, no partial file left

    def reject(path):
        raise CheckpointError(f"{path}: missing keys: x")
    with pytest.raises(CheckpointError, match="missing keys"):
        resolve_weights(source, cache=tmp_path / "c3", download=True, check=reject)
    assert not any((tmp_path / "c3").iterdir())


def test_md5_is_checked_where_no_sha256_is_published(tmp_path):
    payload = b"older weights"
    source, origin = _source(tmp_path, payload, md5=hashlib.md5(b"other").hexdigest())
    with pytest.raises(CheckpointError, match="md5"):
        resolve_weights(source, weights=origin)
    ok, origin = _source(tmp_path, payload, md5=hashlib.md5(payload).hexdigest())
    assert resolve_weights(ok, weights=origin) == origin
    assert resolve_weights(source, weights=origin, verify=False) == origin


def test_offline_or_failed_download_names_file_url_and_destination(tmp_path, monkeypatch):
    source, _ = _source(tmp_path, b"x")
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_weights(source, cache=tmp_path / "c")   # DIFFUSION_SOLVERS_OFFLINE=1 (autouse fixture)
    msg = str(e.value)
    assert "w.bin" in msg and source.url in msg and "ZOO_TEST_WEIGHTS" in msg and str(tmp_path / "c") in msg
    broken = WeightsSource(filename="w.bin", url=(tmp_path / "nowhere.bin").as_uri(), description="the test weights")
    with pytest.raises(WeightsNotFoundError, match="the download failed"):
        resolve_weights(broken, cache=tmp_path / "d", download=True)
    assert not any((tmp_path / "d").iterdir())


def test_explicit_and_environment_paths_win_and_are_checked(tmp_path, monkeypatch):
    source, origin = _source(tmp_path, b"abc", sha256=hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(source, weights=tmp_path / "missing.bin")
    monkeypatch.setenv("ZOO_TEST_WEIGHTS", str(origin))
    assert resolve_weights(source) == origin
    monkeypatch.setenv("ZOO_TEST_WEIGHTS", str(tmp_path / "gone.bin"))
    with pytest.raises(WeightsNotFoundError, match="ZOO_TEST_WEIGHTS"):
        resolve_weights(source)


def test_a_corrupt_cached_file_is_reported_not_used(tmp_path):
    source, _ = _source(tmp_path, b"abc", sha256=hashlib.sha256(b"abc").hexdigest())
    cached = tmp_path / "c" / "w.bin"
    cached.parent.mkdir()
    cached.write_bytes(b"ab")   # truncated
    with pytest.raises(CheckpointError, match="cached") as e:
        resolve_weights(source, cache=tmp_path / "c")
    assert str(cached) in str(e.value)


def test_state_dict_checks_list_what_is_wrong(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"a": torch.zeros(2), "b": torch.zeros(3, 3), "z": torch.zeros(1)}, path)
    sd = read_state_dict(path)
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, {"a": torch.Size([2]), "b": torch.Size([3, 4]), "c": torch.Size([1])}, path=path)
    msg = str(e.value)
    assert str(path) in msg and "missing keys: c" in msg and "unexpected keys: z" in msg
    assert "b: (3, 3) in the file, (3, 4) expected" in msg
    pickled = tmp_path / "obj.pt"
    torch.save({"a": [1, 2]}, pickled)
    with pytest.raises(CheckpointError, match="flat dict of tensors"):
        read_state_dict(pickled)
