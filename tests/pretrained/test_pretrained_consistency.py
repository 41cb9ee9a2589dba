"""Consistency models: the boundary parameterisation and the ``cd_imagenet64_l2`` loader, offline.

The real network (ImageNet 64×64, ~300M parameters) is never downloaded: a random-weight ``UNet2DModel`` of the
same block types at toy size (diffusers' own test config) is written with ``save_pretrained`` and loaded, and
one step is compared with diffusers' ``CMStochasticIterativeScheduler`` — an independent implementation.
"""
from __future__ import annotations

import json

import pytest
import torch

import pretrained
import solvers
from pretrained.checkpoints import CheckpointError, WeightsNotFoundError
from pretrained.consistency import CD_IMAGENET64_CONFIG, CD_TEST_CONFIG, BoundaryScalings

diffusers = pytest.importorskip("diffusers", reason="cd_imagenet64_l2 runs on diffusers' UNet2DModel "
                                                    "(the optional 'hub' extra)")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may download: switch downloads off and point the cache at an empty folder."""
    monkeypatch.setenv("DIFFUSION_SOLVERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSION_SOLVERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CD_IMAGENET64_L2_WEIGHTS", raising=False)


def test_boundary_scalings_make_f_the_identity_at_sigma_min():
    sc = BoundaryScalings(sigma_data=0.5, sigma_min=0.002)
    c_skip, c_out, c_in = sc(torch.tensor([0.002, 80.0], dtype=torch.float64))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    # Far from the boundary they approach EDM's: c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²).
    torch.testing.assert_close(c_skip[1], torch.tensor(0.25 / (6400 - 0.32 + 0.004 + 0.25), dtype=torch.float64))
    torch.testing.assert_close(c_in[1], torch.tensor((6400.25) ** -0.5, dtype=torch.float64))
    with pytest.raises(ValueError):
        BoundaryScalings(sigma_data=0.0)


@pytest.fixture(scope="module")
def small_unet(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CD_TEST_CONFIG).eval()
    with torch.no_grad():
        for p in unet.parameters():   # no parameter left at a constant initial value
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("cd") / "unet"
    unet.save_pretrained(folder)
    return unet, folder


def test_cd_loader_matches_diffusers_consistency_scheduler(small_unet):
    unet, folder = small_unet
    model = pretrained.load("cd_imagenet64_l2", weights=folder, strict_config=False, class_labels=7)
    size = CD_TEST_CONFIG["sample_size"]
    x_T = solvers.initial_noise((2, 3, size, size), seeds=[0, 1], schedule=model.schedule)
    assert float(x_T.std()) > 40   # x_T = σ_max·z on the EDM schedule
    labels = torch.tensor([7, 7])
    # One-step generation: diffusers' scheduler and pipeline logic (no noise with a single timestep).
    scheduler = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        out = unet(scheduler.scale_model_input(x_T, t), t, class_labels=labels).sample
    want = scheduler.step(out, t, x_T).prev_sample
    res = solvers.sample(model, x_T, solver="consistency", steps=1, spacing="karras", sigma_boundary=0.002)
    assert res.timesteps == [80.0, 0.0] and res.nfe == 1
    torch.testing.assert_close(res.samples, want, rtol=1e-4, atol=1e-5)
    # The consistency function at every σ of diffusers' 40-level training grid, on the same noisy input.
    scheduler.set_timesteps(timesteps=[39, 30, 20, 10, 0])
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        x = 0.3 * torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) + sigma * x_T / 80.0
        with torch.no_grad():
            out = unet(x / (sigma ** 2 + 0.25) ** 0.5, t, class_labels=labels).sample
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition(scheduler.sigmas[i])
        want = (c_out * out + c_skip * x).clamp(-1, 1)
        torch.testing.assert_close(model.denoise(x, sigma), want, rtol=1e-4, atol=1e-5)


def test_cd_strict_config_names_the_differing_fields(small_unet):
    _, folder = small_unet
    with pytest.raises(CheckpointError) as e:
        pretrained.load("cd_imagenet64_l2", weights=folder)
    msg = str(e.value)
    assert "config.json" in msg and "block_out_channels" in msg and "strict_config=False" in msg
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in CD_IMAGENET64_CONFIG} != CD_IMAGENET64_CONFIG


def test_cd_rejects_bad_labels_and_mismatched_weights(small_unet, tmp_path):
    unet, folder = small_unet
    model = pretrained.load("cd_imagenet64_l2", weights=folder, strict_config=False, class_labels=[1, 2, 3])
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        model.denoise(x, 80.0)
    bad = pretrained.load("cd_imagenet64_l2", weights=folder, strict_config=False, class_labels=1000)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        bad.denoise(x, 80.0)
    other = tmp_path / "other"
    diffusers.UNet2DModel(**{**CD_TEST_CONFIG, "block_out_channels": [32, 96]}).save_pretrained(other)
    (other / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="wrong shapes") as e:
        pretrained.load("cd_imagenet64_l2", weights=other, strict_config=False)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_cd_default_labels_are_fixed_per_batch_row(small_unet):
    _, folder = small_unet
    model = pretrained.load("cd_imagenet64_l2", weights=folder, strict_config=False, label_seed=5)
    net = model.fn.network
    a, b = net.labels(8, "cpu"), net.labels(8, "cpu")
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1000 and len(set(a.tolist())) > 1


def test_cd_offline_message_names_repository_and_destination(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        pretrained.load("cd_imagenet64_l2")
    msg = str(e.value)
    assert "openai/diffusers-cd_imagenet64_l2" in msg and "CD_IMAGENET64_L2_WEIGHTS" in msg
    assert str(tmp_path / "cache") in msg


def test_cd_card_records_the_edm_boundary():
    card = pretrained.get_card("cd_imagenet64_l2")
    assert (card.extra["sigma_data"], card.extra["sigma_min"], card.extra["sigma_max"]) == (0.5, 0.002, 80.0)
    assert card.default_solver_options == {"consistency": {"sigma_boundary": 0.002}}
    assert card.prediction == "x0" and card.sample_shape == (3, 64, 64)


def test_consistency_class_labels_are_made_once_per_batch_and_device():
    """The class-conditional wrapper keeps its labels on the device (no host→device copy per network call, which
    CUDA-graph capture forbids) and remakes them when the labels asked for change."""
    from types import SimpleNamespace

    from pretrained.consistency import ClassConditionalUNet

    unet = torch.nn.Identity()
    unet.config = SimpleNamespace(num_class_embeds=10)
    wrapper = ClassConditionalUNet(unet, class_labels=None, label_seed=3)
    a = wrapper.labels(6, "cpu")
    assert wrapper.labels(6, "cpu") is a and a.shape == (6,) and int(a.max()) < 10
    assert torch.equal(a, wrapper._make_labels(6))
    wrapper.class_labels = 7
    assert torch.equal(wrapper.labels(6, "cpu"), torch.full((6,), 7))
    wrapper.class_labels = [1, 2]
    assert wrapper.labels(2, "cpu").tolist() == [1, 2]
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        wrapper.labels(3, "cpu")
