"""The CIFAR-10 DDPM cards: the U-Net port, both weight formats, and their failures — offline, random weights.

The real checkpoints (143 MB each) are never downloaded here.  The architecture comes from the exact hub
config in ../shared/assets/ddpm_cifar10_32/ where present (the port's own config otherwise), and the port is
checked against an independent implementation: diffusers' ``UNet2DModel`` with the same random weights.
"""
from __future__ import annotations

import json

import pytest
import torch

import pretrained
import solvers
from pretrained.checkpoints import CheckpointError, WeightsNotFoundError
from pretrained.ddpm_unet import CIFAR10_CONFIG, DDPMUNet, config_from_diffusers, ddpm_to_diffusers, \
    diffusers_to_ddpm

diffusers = pytest.importorskip("diffusers", reason="diffusers (the optional 'hub' extra) is the independent "
                                                    "reference implementation of the U-Net")

LEVELS = len(CIFAR10_CONFIG.ch_mult)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may download: switch downloads off and point the cache at an empty folder."""
    monkeypatch.setenv("DIFFUSION_SOLVERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSION_SOLVERS_CACHE", str(tmp_path / "cache"))
    for var in ("DDPM_CIFAR_WEIGHTS", "DDPM_CIFAR_HUB_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def reference(offline_asset):
    """diffusers' UNet2DModel from the hub config, its default initialisation perturbed so that no parameter
    is left at a constant (a mapping error between two zero-initialised layers would go unseen)."""
    config_file = offline_asset("ddpm_cifar10_32/unet_config.json")
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet, config


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.tensor([3.0, 871.0][:batch])


@pytest.fixture(scope="module")
def reference_outputs(reference):
    """diffusers' outputs on the test inputs and on x_T at step 999 (computed once)."""
    unet, _ = reference
    x, t = _inputs()
    x_T = solvers.initial_noise((1, 3, 32, 32), seeds=[0])
    with torch.no_grad():
        return unet(x, t).sample, unet(x_T, torch.tensor([999.0])).sample


def test_port_matches_the_hub_architecture(reference):
    unet, config = reference
    assert config_from_diffusers(config) == CIFAR10_CONFIG
    port = DDPMUNet(CIFAR10_CONFIG)
    n_port = sum(p.numel() for p in port.parameters())
    # The asset README states the parameter count of the hub architecture.
    assert n_port == sum(p.numel() for p in unet.parameters()) == 35_746_307


def test_port_reproduces_diffusers_after_conversion(reference, reference_outputs):
    unet, _ = reference
    port = DDPMUNet(CIFAR10_CONFIG).eval()
    port.load_state_dict(diffusers_to_ddpm(unet.state_dict(), LEVELS), strict=True)
    x, t = _inputs()
    want = reference_outputs[0]
    with torch.no_grad():
        got = port(x, t)
    assert want.abs().mean() > 0.1  # a real signal, not a zero-initialised output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_diffusers_reproduces_a_port_model_after_inverse_conversion(reference):
    # The other direction: weights made by the port (pesser's format), renamed to diffusers names, must give
    # diffusers' network the port's output.
    _, config = reference
    torch.manual_seed(3)
    port = DDPMUNet(CIFAR10_CONFIG).eval()
    with torch.no_grad():
        for p in port.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet = diffusers.UNet2DModel(**config).eval()
    unet.load_state_dict(ddpm_to_diffusers(port.state_dict(), LEVELS), strict=True)
    x, t = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, port(x, t), rtol=1e-4, atol=1e-4)


def test_key_maps_are_inverse_in_both_attention_dialects(reference):
    unet, _ = reference
    sd = unet.state_dict()
    ours = diffusers_to_ddpm(sd, LEVELS)
    back = ddpm_to_diffusers(ours, LEVELS)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    legacy = ddpm_to_diffusers(ours, LEVELS, legacy_attention=True)
    assert any(k.endswith("attentions.0.query.weight") for k in legacy)
    assert not any(".to_q." in k for k in legacy)
    again = diffusers_to_ddpm(legacy, LEVELS)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


def test_config_from_diffusers_rejects_other_architectures(reference):
    _, config = reference
    with pytest.raises(ValueError, match="act_fn"):
        config_from_diffusers({**config, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="num_class_embeds"):
        config_from_diffusers({**config, "num_class_embeds": 10})


@pytest.fixture(scope="module")
def weight_files(reference, tmp_path_factory):
    """The same random weights in the three on-disk formats: pesser .ckpt, diffusers folder, legacy hub .bin."""
    unet, _ = reference
    root = tmp_path_factory.mktemp("cifar_weights")
    ours = diffusers_to_ddpm(unet.state_dict(), LEVELS)
    ckpt = root / "model-790000.ckpt"
    torch.save(ours, ckpt)                                    # pesser/pytorch_diffusion's format
    folder = root / "hub_folder"
    unet.save_pretrained(folder)                              # current diffusers format (safetensors)
    legacy = root / "legacy" / "diffusion_pytorch_model.bin"
    legacy.parent.mkdir()
    torch.save(ddpm_to_diffusers(ours, LEVELS, legacy_attention=True), legacy)   # the hub file's old names
    return {"ckpt": ckpt, "folder": folder, "legacy": legacy}


def _one_step(model: solvers.DiffusionModel) -> torch.Tensor:
    x_T = solvers.initial_noise((1, 3, 32, 32), seeds=[0], schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="ddim", steps=1, spacing="trailing")
    assert res.nfe == 1 and torch.isfinite(res.samples).all()
    return res.samples


@pytest.mark.parametrize("name,fmt", [("ddpm_cifar", "ckpt"), ("ddpm_cifar", "folder"),
                                      ("ddpm_cifar_hub", "folder"), ("ddpm_cifar_hub", "legacy"),
                                      ("ddpm_cifar_hub", "ckpt")])
def test_both_cards_load_every_format_and_match_diffusers(name, fmt, reference_outputs, weight_files):
    want, eps = reference_outputs
    kwargs = {"verify": False} if name == "ddpm_cifar" else {}   # random weights cannot match the real md5
    model = pretrained.load(name, weights=weight_files[fmt], **kwargs)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.fn(x, t), want, rtol=1e-4, atol=1e-4)
    # One ddim step from t = 999 to σ = 0 is the x0 prediction (x − σ·ε̂)/α at step 999 (compared times α:
    # 1/α ≈ 160 there amplifies float32 rounding).
    sample = _one_step(model)
    x_T = solvers.initial_noise((1, 3, 32, 32), seeds=[0], schedule=model.schedule)
    abar = model.schedule.alphas_cumprod[999].item()
    torch.testing.assert_close(sample * abar ** 0.5, x_T - (1 - abar) ** 0.5 * eps, rtol=1e-4, atol=1e-4)


def test_ema_card_checks_the_publishers_md5(weight_files):
    with pytest.raises(CheckpointError) as e:
        pretrained.load("ddpm_cifar", weights=weight_files["ckpt"])
    msg = str(e.value)
    assert str(weight_files["ckpt"]) in msg and "md5" in msg and pretrained.get_card("ddpm_cifar").md5 in msg


def test_missing_key_and_wrong_shape_name_the_file_and_the_key(weight_files, tmp_path):
    sd = torch.load(weight_files["ckpt"], map_location="cpu", weights_only=True)
    missing = dict(sd)
    del missing["mid.attn_1.q.weight"]
    path = tmp_path / "missing.ckpt"
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"missing keys: mid\.attn_1\.q\.weight") as e:
        pretrained.load("ddpm_cifar", weights=path, verify=False)
    assert str(path) in str(e.value)
    wrong = dict(sd)
    wrong["conv_out.weight"] = torch.zeros(3, 64, 3, 3)
    path = tmp_path / "wrong.ckpt"
    torch.save(wrong, path)
    with pytest.raises(CheckpointError, match=r"wrong shapes: conv_out\.weight: \(3, 64, 3, 3\)"):
        pretrained.load("ddpm_cifar", weights=path, verify=False)
    extra = dict(sd, **{"some.other.weight": torch.zeros(1)})
    path = tmp_path / "extra.ckpt"
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: some\.other\.weight"):
        pretrained.load("ddpm_cifar", weights=path, verify=False)


def test_corrupt_file_and_foreign_config_fail_clearly(weight_files, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read") as e:
        pretrained.load("ddpm_cifar", weights=junk, verify=False)
    assert str(junk) in str(e.value)
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (weight_files["folder"] / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((weight_files["folder"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 128, 128, 128]}))
    with pytest.raises(CheckpointError, match="config.json"):
        pretrained.load("ddpm_cifar_hub", weights=folder)


def test_offline_without_weights_says_what_to_download_and_where(tmp_path):
    card = pretrained.get_card("ddpm_cifar")
    with pytest.raises(WeightsNotFoundError) as e:
        pretrained.load("ddpm_cifar")
    msg = str(e.value)
    assert card.source_url in msg and "ema_diffusion_cifar10_model-790000.ckpt" in msg
    assert "DDPM_CIFAR_WEIGHTS" in msg and str(tmp_path / "cache") in msg
    with pytest.raises(WeightsNotFoundError) as e:
        pretrained.load("ddpm_cifar_hub")
    msg = str(e.value)
    assert "google/ddpm-cifar10-32" in msg and "DDPM_CIFAR_HUB_WEIGHTS" in msg and "offline" in msg
    assert not any((tmp_path / "cache").rglob("*.ckpt"))


def test_cards_say_which_weights_they_are():
    ema, hub = pretrained.get_card("ddpm_cifar"), pretrained.get_card("ddpm_cifar_hub")
    assert "EMA" in ema.weights_note and "NON-EMA" in hub.weights_note and "NON-EMA" in hub.description
    assert ema.published["FID, 1000 ancestral steps (σ² = β), 50k samples vs CIFAR-10 train"][0] == 3.17
    assert ema.sha256 is None and ema.md5 is not None and hub.sha256 is None
    for card in (ema, hub):
        assert card.reference == "cifar10-train" and card.default_solver_options["ddpm"]["variance"] == "large"
        x = torch.tensor([[-1.0, 0.0, 1.0]]).reshape(1, 1, 1, 3).expand(1, 3, 1, 3)
        torch.testing.assert_close(card.to_images(x)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_published_fids_are_written_once_on_the_card():
    """The report's side-by-side FIDs come from the card (``published_fid_rows``); the card's ``published``
    table holds the same numbers, made from the same entries."""
    ema, hub = pretrained.get_card("ddpm_cifar"), pretrained.get_card("ddpm_cifar_hub")
    rows = ema.published_fid_rows()
    assert [(r["solver"], r["steps"], r["fid"]) for r in rows] == [
        ("ddpm", 1000, 3.17), ("ddim", 10, 13.36), ("ddim", 20, 6.84), ("ddim", 50, 4.67), ("ddim", 100, 4.16),
        ("ddim", 1000, 4.04)]
    assert [r["deterministic"] for r in rows] == [None] + [True] * 5
    for p in ema.published_fids:
        assert ema.published[p.description] == (p.fid, p.source)
    assert hub.published_fid_rows() == rows   # the same network: its runs are set beside the paper's numbers
    assert hub.published["FID of the paper's EMA weights, for contrast"][0] == 3.17
    assert pretrained.get_card("gmm2d").published_fid_rows() == []
