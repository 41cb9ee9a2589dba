"""The ldm_mnist card: an autoencoder 1×28×28 ↔ 4×7×7 and a latent ε-model, trained by this project on 8,000
MNIST images; the card carries the decoder."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import pretrained
import solvers
from pretrained import checkpoints, ldm_mnist, toy
from pretrained.checkpoints import CheckpointError
from pretrained.train_gmm2d import save_atomic
from solvers.schedules import VPCosine
from tests.pretrained.mnist_marks import Payload, held_out_fd, needs_mnist, real_and_blurred



def test_card_samples_latents_that_its_decoder_turns_into_digits():
    card = pretrained.get_card("ldm_mnist")
    assert card.kind == "image" and card.prediction == "v" and card.reference == "mnist-heldout"
    assert card.sample_shape == (4, 7, 7) and card.data_shape == (1, 28, 28) and card.data_range == (-1.0, 1.0)
    assert "decoder" in card.decoder_name
    model = pretrained.load("ldm_mnist")
    assert isinstance(model.schedule, VPCosine) and model.prediction == "v"
    x_T = solvers.initial_noise((4, 4, 7, 7), seeds=[0, 1, 2, 3], schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="dpmpp_2m", steps=10)
    assert res.nfe == 10 and res.samples.shape == (4, 4, 7, 7) and torch.isfinite(res.samples).all()
    images = card.decoder(device="cpu")(res.samples)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0   # tanh output: the card's data range
    # Digits are mostly black background, with some bright strokes.
    pixels = card.to_images(images)
    assert float((pixels < 0.2).float().mean()) > 0.6 and float((pixels > 0.8).float().mean()) > 0.03


def test_the_decoder_refuses_latents_of_another_shape():
    decode = ldm_mnist.load_decoder()
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, 7, 7\), got \(2, 1, 28, 28\)"):
        decode(torch.zeros(2, 1, 28, 28))


def test_card_states_the_data_split_the_recipe_and_the_checksum():
    card = pretrained.get_card("ldm_mnist")
    assert "every fifth image" in card.notes and "python -m pretrained.train_ldm_mnist" in card.notes
    assert "FD (MNIST classifier)" in card.notes and "python -m bench.run --model ldm_mnist" in card.notes
    assert "Adam steps" in card.weights_note and "8,000 MNIST images" in card.weights_note
    assert card.sha256 == toy.WEIGHTS_SHA256["ldm_mnist.pt"] == checkpoints.file_digest(ldm_mnist.WEIGHTS_FILE)
    assert ldm_mnist.WEIGHTS_FILE.stat().st_size < 5 * 2 ** 20


def _held_out(n: int) -> torch.Tensor:
    from pretrained.mnist_data import mnist_split
    return mnist_split("heldout")[0][:n].float() / 127.5 - 1.0


@needs_mnist
def test_latent_scale_gives_the_training_latents_unit_standard_deviation():
    from pretrained.mnist_data import mnist_split
    _, ae, scale, record = ldm_mnist.read_ldm_mnist_weights(ldm_mnist.WEIGHTS_FILE)
    assert scale == record["autoencoder"]["latent_scale"]
    x = mnist_split("train")[0][:1000].float() / 127.5 - 1.0
    with torch.no_grad():
        z = ldm_mnist.encode_images(ae, scale, x)
    # The scale is 1 / std over all 8,000 training images; 1,000 of them (196,000 numbers) agree within 5 %.
    assert abs(float(z.std()) - 1.0) < 0.05


@needs_mnist
def test_reconstructions_of_held_out_images_beat_the_same_size_pixel_code():
    # Yardstick: the images average-pooled to 14×14 (196 numbers, as many as the 4×7×7 latent) and upsampled
    # bilinearly.  An autoencoder that is worth its latent must reconstruct unseen digits better than that.
    x = _held_out(200)
    _, ae, scale, _ = ldm_mnist.read_ldm_mnist_weights(ldm_mnist.WEIGHTS_FILE)
    with torch.no_grad():
        rec = ldm_mnist.load_decoder()(ldm_mnist.encode_images(ae, scale, x))
    pooled = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    rmse, rmse_pooled = (float(((y - x) ** 2).mean().sqrt()) / 2 for y in (rec, pooled))   # pixels in [0, 1]
    assert rmse < rmse_pooled


def test_a_changed_committed_file_is_refused_by_the_loader_and_the_decoder(changed_committed_file, monkeypatch):
    path = changed_committed_file("ldm_mnist.pt")
    with pytest.raises(CheckpointError) as err:
        pretrained.load("ldm_mnist", weights=path)
    message = str(err.value)
    assert toy.WEIGHTS_SHA256["ldm_mnist.pt"] in message and checkpoints.file_digest(path) in message
    assert "python -m pretrained.train_ldm_mnist" in message
    monkeypatch.setattr(ldm_mnist, "WEIGHTS_FILE", path)
    with pytest.raises(CheckpointError, match="sha256"):
        ldm_mnist.load_decoder()


def test_a_user_file_with_another_autoencoder_is_refused(tmp_path):
    record = torch.load(ldm_mnist.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    same = tmp_path / "same.pt"
    save_atomic(record, same)
    assert pretrained.load("ldm_mnist", weights=same).prediction == "v"   # the committed autoencoder: fine
    state = record["autoencoder"]["state_dict"]
    state["decoder.0.weight"] = state["decoder.0.weight"] + 1e-3
    other = tmp_path / "other.pt"
    save_atomic(record, other)
    with pytest.raises(ValueError, match="its autoencoder is not the committed one"):
        pretrained.load("ldm_mnist", weights=other)


def test_files_that_are_not_ldm_mnist_weights_are_refused_unexecuted(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": ldm_mnist.FORMAT, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot read the ldm_mnist weights"):
        pretrained.load("ldm_mnist", weights=evil)
    assert "this must never run" not in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a pretrained.ldm_mnist/1 weight file"):
        pretrained.load("ldm_mnist", weights=junk)
    record = torch.load(ldm_mnist.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    del record["autoencoder"]["state_dict"]["encoder.0.weight"]
    broken = tmp_path / "broken.pt"
    torch.save(record, broken)
    with pytest.raises(CheckpointError, match="encoder.0.weight"):
        pretrained.load("ldm_mnist", weights=broken)
    with pytest.raises(FileNotFoundError, match="python -m pretrained.train_ldm_mnist"):
        pretrained.load("ldm_mnist", weights=tmp_path / "none.pt")


def _tiny_run(seed: int, tmp_path, name: str):
    from pretrained.train_ldm_mnist import train_autoencoder, train_latent
    data = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ae = train_autoencoder(ae_steps=3, ae_batch=4, ae_lr=1e-3, ae_warmup=1, latent_noise=0.1, latent_penalty=1e-3,
                           seed=seed, arch=dict(widths=(8, 8), latent=4), log_every=0, data=data)
    record = train_latent(ae, steps=3, batch=4, lr=1e-3, warmup=1, ema=0.9, seed=seed, log_every=0, data=data,
                          arch=dict(channels=(8, 8), emb=16, n_freq=4, latent=4))
    save_atomic(record, tmp_path / name)
    return record, (tmp_path / name).read_bytes()


def test_training_is_bit_for_bit_reproducible(tmp_path, one_thread):
    (first, first_bytes), (_, second_bytes) = _tiny_run(1, tmp_path, "a.pt"), _tiny_run(1, tmp_path, "b.pt")
    other, _ = _tiny_run(2, tmp_path, "c.pt")
    assert first_bytes == second_bytes
    for part in ("state_dict",):
        assert not torch.equal(first[part]["inp.weight"], other[part]["inp.weight"])
    assert not torch.equal(first["autoencoder"]["state_dict"]["encoder.0.weight"],
                           other["autoencoder"]["state_dict"]["encoder.0.weight"])
    assert "seconds" not in first["training"] and first["autoencoder"]["latent_scale"] > 0
    net, ae, scale, _ = ldm_mnist.read_ldm_mnist_weights(tmp_path / "a.pt")   # the files read back
    assert scale == first["autoencoder"]["latent_scale"] and net.channels == (8, 8) and ae.widths == (8, 8)


def test_training_refuses_bad_settings_before_any_work(capsys, tmp_path):
    from pretrained.train_ldm_mnist import main
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    for argv, message in ((["--steps", "0"], "--steps must be a positive integer, got 0"),
                          (["--ae-steps", "-3"], "--ae-steps must be a positive integer, got -3"),
                          (["--ema", "1.0"], "--ema in [0, 1)"),
                          (["--latent-noise", "-0.1"], "--latent-noise and --latent-penalty must be >= 0"),
                          (["--stage", "autoencoder"], "--stage autoencoder needs --out PATH"),
                          (["--autoencoder", "x.pt"], "--autoencoder is for --stage latent"),
                          (["--stage", "latent", "--autoencoder", str(tmp_path / "no.pt")], "does not exist"),
                          (["--stage", "latent", "--autoencoder", str(junk)], "--autoencoder: " + str(junk)),
                          (["--out", str(tmp_path)], "is a folder"),
                          (["--measure", "--stage", "latent"], "--measure trains nothing")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.slow
@needs_mnist
def test_one_stage_at_a_time_writes_the_same_bytes_as_both_at_once(tmp_path, one_thread):
    from pretrained.train_ldm_mnist import main
    stage1, staged, both = tmp_path / "ae.pt", tmp_path / "staged.pt", tmp_path / "both.pt"
    tiny_ae, tiny_latent = ["--ae-steps", "1", "--ae-batch", "4"], ["--steps", "1", "--batch", "4"]
    assert main(["--stage", "autoencoder", "--out", str(stage1), *tiny_ae]) == 0
    with pytest.raises(CheckpointError, match="not a pretrained.ldm_mnist/1 weight file"):
        pretrained.load("ldm_mnist", weights=stage1)   # a stage-1 file is not a model
    assert main(["--stage", "latent", "--autoencoder", str(stage1), "--out", str(staged), *tiny_latent]) == 0
    assert main(["--out", str(both), *tiny_ae, *tiny_latent]) == 0
    assert staged.read_bytes() == both.read_bytes()
    ae1, scale1, _ = ldm_mnist.read_autoencoder(stage1)
    ae2, scale2, _ = ldm_mnist.read_autoencoder(staged)
    assert scale1 == scale2 > 0
    for key, value in ae1.state_dict().items():
        assert torch.equal(value, ae2.state_dict()[key]), key


# Why 5× the noise floor (the same yardsticks as fm_mnist's test): at n = 300 the floor (300 held-out images
# against all 2,000) is ≈ 17; 300 real training digits score ≈ 1.6× the floor; the same digits blurred by a 3×3
# box filter (still digits, fine strokes lost) ≈ 20×.  Their geometric midpoint is ≈ 5.7×: 5× the floor means
# "closer to real digits than to blurred ones on a log scale".  The test re-measures both yardsticks.
FACTOR, N = 5.0, 300


@pytest.mark.slow
@needs_mnist
def test_decoded_samples_score_within_5x_the_held_out_noise_floor(tmp_path, one_thread):
    from bench import features
    fd, floor = held_out_fd(tmp_path, N)
    real, blurred = real_and_blurred(N)
    assert fd(real) < FACTOR * floor < fd(blurred)
    card, model = pretrained.get_card("ldm_mnist"), pretrained.load("ldm_mnist")
    x_T = solvers.initial_noise((N, 4, 7, 7), seeds=list(range(N)), schedule=model.schedule)
    res = solvers.sample(model, x_T, solver="dpmpp_2m", steps=20)
    samples = features.to_uint8_rgb(card.to_images(card.decoder(device="cpu")(res.samples)))[:, :1]
    assert fd(samples) <= FACTOR * floor
