"""Train ``ldm_mnist``: an autoencoder 1×28×28 ↔ 4×7×7, then a diffusion model of its latents, on the 8,000
MNIST training images.

    python -m pretrained.train_ldm_mnist                       # both stages → pretrained/weights/ldm_mnist.pt
    python -m pretrained.train_ldm_mnist --stage autoencoder --out ae.pt         # stage 1 alone
    python -m pretrained.train_ldm_mnist --stage latent --autoencoder ae.pt      # stage 2 on a given autoencoder
    python -m pretrained.train_ldm_mnist --measure          # the autoencoder's own floor (RMSE, FD); no training

Stage 1 trains :class:`pretrained.ldm_mnist.LatentAutoencoder` on pixels x/127.5 − 1 (mean squared error of
the decoding of z + ``latent_noise``·ε, plus ``latent_penalty``·mean(z²): a VAE with a fixed posterior
standard deviation; the module docstring says why) and measures the latent scale, 1 / std of the codes of all
training images.  Stage 2 encodes the training images once, scales them to unit standard deviation and
trains :class:`pretrained.ldm_mnist.LatentUNet` to predict v = α(t)·ε − σ(t)·z from z_t = α(t)·z + σ(t)·ε on
:class:`solvers.schedules.VPCosine`, t ~ U(t_min, t_max).  Adam with a linear warm-up and a cosine decay in
both stages; the latent model's saved weights are an exponential moving average.  Every random number comes
from seeded generators and the networks run on one CPU thread by default, so a rerun with the same settings,
torch version and CPU gives the same bytes.  Files are written atomically; the sha256 printed at the end goes
into :data:`pretrained.toy.WEIGHTS_SHA256`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from solvers.schedules import VPCosine

from .checkpoints import CheckpointError, file_digest
from .ldm_mnist import AE_FORMAT, FORMAT, REBUILD, WEIGHTS_FILE, LatentAutoencoder, LatentUNet, encode_images, \
    read_autoencoder
from .mnist_data import SPLIT_RULE, epoch_batches, mnist_split
from .train_gmm2d import save_atomic
from .training import lr_factor, weight_record

__all__ = ["train_autoencoder", "train_latent", "measure_autoencoder", "canonical", "main", "AE_DEFAULTS",
           "LATENT_DEFAULTS", "AE_ARCH", "LATENT_ARCH"]

AE_DEFAULTS = dict(ae_steps=1500, ae_batch=64, ae_lr=2e-3, ae_warmup=100, latent_noise=0.1, latent_penalty=1e-3,
                   seed=0)
LATENT_DEFAULTS = dict(steps=4000, batch=128, lr=2e-3, warmup=200, ema=0.999, seed=0)
AE_ARCH = dict(widths=(16, 48), latent=4)
LATENT_ARCH = dict(channels=(48, 64), emb=128, n_freq=16, latent=4)



def _plain(arch: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}


def _optimiser(net: torch.nn.Module, lr: float, steps: int, warmup: int):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))


def _training_images(data: Optional[torch.Tensor]) -> torch.Tensor:
    return mnist_split("train")[0].float() / 127.5 - 1.0 if data is None else data


def _fit(loss_fn, net, order, gen, *, steps: int, lr: float, warmup: int, tag: str, log_every: int,
         slow: Optional[AveragedModel] = None) -> float:
    """Run ``steps`` Adam steps of ``loss_fn(batch indices, gen)``; returns the mean loss of the last log window."""
    opt, sched = _optimiser(net, lr, steps, warmup)
    t0, running, loss = time.perf_counter(), [], torch.tensor(float("nan"))
    for step in range(steps):
        loss = loss_fn(next(order), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if slow is not None:
            slow.update_parameters(net)
        running.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[ldm_mnist {tag}] step {step + 1}/{steps}  loss {sum(running) / len(running):.5f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            running = []
    print(f"[ldm_mnist {tag}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return sum(running) / len(running) if running else float(loss.detach())


def train_autoencoder(*, ae_steps: int, ae_batch: int, ae_lr: float, ae_warmup: int, latent_noise: float,
                      latent_penalty: float, seed: int, arch: Optional[dict] = None, log_every: int = 250,
                      data: Optional[torch.Tensor] = None) -> dict:
    """Stage 1: the autoencoder and its latent scale → a stage-1 record (format ``AE_FORMAT``).

    Args:
        data: training images in [−1, 1], (N, 1, 28, 28) (default: the 8,000 training images).
    """
    arch = dict(AE_ARCH if arch is None else arch)
    torch.manual_seed(seed)
    x_all = _training_images(data)
    ae = LatentAutoencoder(**arch).train()

    def loss_fn(index, gen):
        x = x_all[index]
        z = ae.encode(x)
        x_hat = ae.decode(z + latent_noise * torch.randn(z.shape, generator=gen))
        return ((x_hat - x) ** 2).mean() + latent_penalty * (z ** 2).mean()

    gen = torch.Generator().manual_seed(seed + 1)
    final = _fit(loss_fn, ae, epoch_batches(x_all.shape[0], ae_batch, gen), gen, steps=ae_steps, lr=ae_lr,
                 warmup=ae_warmup, tag="autoencoder", log_every=log_every)
    ae.eval()
    with torch.no_grad():
        codes = torch.cat([ae.encode(x_all[i:i + 500]) for i in range(0, x_all.shape[0], 500)])
    scale = float(1.0 / codes.float().std())
    settings = dict(steps=ae_steps, batch=ae_batch, lr=ae_lr, warmup=ae_warmup, latent_noise=latent_noise,
                    latent_penalty=latent_penalty, seed=seed)
    n_params = sum(p.numel() for p in ae.parameters())
    summary = (f"autoencoder (conv 28→14→7 to {arch['latent']} channels, widths {tuple(arch['widths'])}, "
               f"{n_params:,} parameters; decodes z + {latent_noise}·ε, penalty {latent_penalty}·mean(z²)): "
               f"{ae_steps} Adam steps (lr {ae_lr}, {ae_warmup} warm-up, cosine decay), batch {ae_batch}; "
               f"latent scale {scale:.5f}")
    return {"format": AE_FORMAT, "arch": _plain(arch), "latent_scale": scale,
            "state_dict": {k: v.detach().clone() for k, v in ae.state_dict().items()},
            "training": {"summary": summary, **settings, "final_loss": final, "data": SPLIT_RULE}}


def train_latent(ae_record: dict, *, steps: int, batch: int, lr: float, warmup: int, ema: float, seed: int,
                 arch: Optional[dict] = None, log_every: int = 250, data: Optional[torch.Tensor] = None) -> dict:
    """Stage 2: the latent v-model on the scaled latents of the training images → the full weight record.

    Args:
        ae_record: a stage-1 record (from :func:`train_autoencoder` or a file's ``autoencoder`` part).
        data: training images in [−1, 1], (N, 1, 28, 28) (default: the 8,000 training images).
    """
    arch = dict(LATENT_ARCH if arch is None else arch)
    torch.manual_seed(seed)
    x_all = _training_images(data)
    ae = LatentAutoencoder(**dict(ae_record["arch"]))
    ae.load_state_dict(ae_record["state_dict"])
    with torch.no_grad():   # encoded once: the latents are fixed data for stage 2
        z_all = torch.cat([encode_images(ae.eval(), ae_record["latent_scale"], x_all[i:i + 500])
                           for i in range(0, x_all.shape[0], 500)])
    net = LatentUNet(**arch).train()
    slow = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema))
    sched = VPCosine()

    def loss_fn(index, gen):
        z0 = z_all[index]
        eps = torch.randn(z0.shape, generator=gen)
        t = sched.t_min + (sched.t_max - sched.t_min) * torch.rand(z0.shape[0], generator=gen, dtype=torch.float64)
        a, s = (v.float()[:, None, None, None] for v in (sched.alpha(t), sched.sigma(t)))
        return ((net(a * z0 + s * eps, t.float()) - (a * eps - s * z0)) ** 2).mean()   # v-prediction

    gen = torch.Generator().manual_seed(seed + 2)
    final = _fit(loss_fn, net, epoch_batches(z_all.shape[0], batch, gen), gen, steps=steps, lr=lr, warmup=warmup,
                 tag="latent", log_every=log_every, slow=slow)
    settings = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, seed=seed)
    return _record(slow.module, arch, ae_record, settings, final, x_all.shape[0])


def _record(net: LatentUNet, arch: dict, ae_record: dict, settings: dict, final_loss: float, n_data: int) -> dict:
    s = settings
    summary = (f"latent diffusion on {n_data:,} MNIST images in [−1, 1]: {ae_record['training']['summary']}; then "
               f"a v-prediction U-Net on the scaled 4×7×7 latents (VPCosine, mean squared error), channels "
               f"{tuple(arch['channels'])}, {sum(p.numel() for p in net.parameters()):,} parameters; {s['steps']} "
               f"Adam steps (lr {s['lr']}, {s['warmup']} warm-up steps, cosine decay), batch {s['batch']}, saved "
               f"EMA {s['ema']}, seed {s['seed']}")
    autoencoder = {k: ae_record[k] for k in ("arch", "latent_scale", "state_dict", "training")}
    return weight_record(FORMAT, arch, net, summary, settings, final_loss, REBUILD, autoencoder=autoencoder)


def measure_autoencoder(path: Path = WEIGHTS_FILE, n: int = 500) -> dict:
    """The autoencoder's own floor on the 2,000 held-out images: their reconstructions' RMSE (pixels in [0, 1])
    and FD (MNIST classifier) against the held-out statistics, for all 2,000 and for the first ``n``, beside the
    FD of those ``n`` images themselves and the noise floor of ``n`` held-out images (what a run reports).

    Returns:
        {"rmse", "fd_all", "fd_n", "fd_real_n", "floor": (mean, std), "n"}.
    """
    from bench import datasets, features, metrics   # bench imports pretrained: no import circle at module level

    ae = read_autoencoder(path)[0]
    held = mnist_split("heldout")[0]
    x = held.float() / 127.5 - 1.0
    with torch.no_grad():
        rec = torch.cat([ae.decode(ae.encode(x[i:i + 500])) for i in range(0, x.shape[0], 500)])
    ext, layer, name = features.create_extractor("fd_mnist", "cpu")
    ref = datasets.reference_statistics("mnist-heldout", ext, layer, name, floor_n=n)
    spec = metrics.get_metric("fd_mnist")

    def fd(images: torch.Tensor) -> float:   # uint8 (N, 3, 28, 28)
        return spec.value(features.extract_features(ext, layer, features.UInt8Images(images)), ref)

    rec8, real8 = features.to_uint8_rgb((rec + 1) / 2), features.to_uint8_rgb(held.float() / 255)
    return {"rmse": float(((rec - x) ** 2).mean().sqrt()) / 2, "fd_all": fd(rec8), "fd_n": fd(rec8[:n]),
            "fd_real_n": fd(real8[:n]), "floor": tuple(ref["floor"]), "n": n}


def canonical(obj):
    """A copy of a record whose pickle bytes depend only on its values: every string interned (pickle writes
    an object seen before as a back-reference, so a key read from a file and the same key written in the code
    would otherwise pickle differently), every tensor a fresh copy, tuples as lists.  So stage 2 on a stage-1
    file writes the same bytes as both stages in one run."""
    if isinstance(obj, dict):
        return {canonical(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return obj


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("both", "autoencoder", "latent"), default="both",
                        help="both (default), the autoencoder alone, or the latent model on --autoencoder")
    parser.add_argument("--out", type=Path, default=None, help=f"weight file (default {WEIGHTS_FILE}; "
                        "required with --stage autoencoder)")
    parser.add_argument("--measure", action="store_true", help="train nothing: measure the autoencoder of --out "
                        f"(default {WEIGHTS_FILE}) on the held-out images")
    parser.add_argument("--autoencoder", type=Path, default=None, help="with --stage latent: a stage-1 file or "
                        f"an ldm_mnist weight file whose autoencoder to use (default {WEIGHTS_FILE})")
    for key, value in {**AE_DEFAULTS, **LATENT_DEFAULTS}.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible bytes, "
                        "and the machine is shared)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for key in ("ae_steps", "ae_batch", "steps", "batch", "threads", "ae_warmup", "warmup"):
        if getattr(args, key) < (0 if key.endswith("warmup") else 1):
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    if not (args.lr > 0 and args.ae_lr > 0 and 0 <= args.ema < 1):
        parser.error(f"--lr and --ae-lr must be > 0 and --ema in [0, 1), got {args.lr}, {args.ae_lr} and {args.ema}")
    if not (args.latent_noise >= 0 and args.latent_penalty >= 0):
        parser.error(f"--latent-noise and --latent-penalty must be >= 0, got {args.latent_noise} and "
                     f"{args.latent_penalty}")
    if args.measure and (args.stage != "both" or args.autoencoder is not None):
        parser.error("--measure trains nothing: give it --out PATH alone (default the committed file)")
    if args.measure and not (args.out or WEIGHTS_FILE).is_file():
        parser.error(f"--measure: {args.out or WEIGHTS_FILE} does not exist")
    if args.stage == "autoencoder" and args.out is None:
        parser.error(f"--stage autoencoder needs --out PATH (a stage-1 file is not a complete {WEIGHTS_FILE.name})")
    if args.autoencoder is not None and args.stage != "latent":
        parser.error("--autoencoder is for --stage latent (the other stages train their own)")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the weight file's path")
    if args.stage == "latent":
        source = args.autoencoder or WEIGHTS_FILE
        if not source.is_file():
            parser.error(f"--autoencoder {source} does not exist")
        try:   # read before any training: a bad file is refused in seconds, not after stage 2
            read_autoencoder(source)
        except CheckpointError as e:
            parser.error(f"--autoencoder: {e}")


def main(argv: Optional[list] = None) -> int:
    """Command line: ``python -m pretrained.train_ldm_mnist [--stage S] [--steps N] [--out PATH] …``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    torch.set_num_threads(args.threads)
    out = args.out or WEIGHTS_FILE
    if args.measure:
        q = measure_autoencoder(out)
        print(f"{out}: reconstructions of the 2,000 held-out images: RMSE {q['rmse']:.4f} (pixels in [0, 1]); FD "
              f"(MNIST classifier) {q['fd_all']:.2f} for all 2,000 (the images themselves: 0), {q['fd_n']:.2f} for "
              f"the first {q['n']} (those images themselves: {q['fd_real_n']:.2f}; noise floor of {q['n']} held-out "
              f"images {q['floor'][0]:.2f} ± {q['floor'][1]:.2f})")
        return 0
    if args.stage == "latent":
        ae_record = read_autoencoder(args.autoencoder or WEIGHTS_FILE)[2]   # checked by _check
    else:
        ae_record = train_autoencoder(**{k: getattr(args, k) for k in AE_DEFAULTS})
    record = ae_record if args.stage == "autoencoder" else \
        train_latent(ae_record, **{k: getattr(args, k) for k in LATENT_DEFAULTS})
    save_atomic(canonical(record), out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): {record['training']['summary']}")
    if args.stage != "autoencoder":
        print(f"sha256 {file_digest(out, 'sha256')}: for the committed file, put it in WEIGHTS_SHA256 "
              "(pretrained/toy.py), or loading it fails the checksum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
