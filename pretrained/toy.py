"""Small learned models of the ``gmm2d`` point cloud, trained by this project (``pretrained/train_gmm2d.py``).

* ``cm_gmm2d`` — a consistency model distilled from the exact probability-flow ODE of ``gmm2d`` on the EDM
  schedule (σ ∈ [0.002, 80]), with the EDM boundary scalings (σ_d = the data's per-coordinate std), so
  f(x, σ_min) = x.  An x0-predicting :class:`solvers.DiffusionModel`; sample with ``solver="consistency"``.
* ``fm_gmm2d`` — a rectified-flow velocity model u_θ(x, t) ≈ E[ε − x0 | x_t] on x_t = (1 − t)·x0 + t·ε, so the
  ``velocity`` parameterisation runs on a learned network.

Both are MLPs on (x, Fourier features of the time); the weight files (``pretrained/weights/*.pt``, a few
hundred KB) hold the state dict, the architecture and how they were trained, and load with
``weights_only=True``.  The exact ODEs of the teacher are on the cards (``exact_ode``) for error measurements.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import solvers
from solvers.schedules import EDM, RectifiedFlow

from .analytic import GaussianMixture, gmm2d
from .cards import ModelCard, register_card
from .checkpoints import CheckpointError, file_digest, read_network_record
from .consistency import BoundaryScalings, ConsistencyFunction

__all__ = ["PointMLP", "FlowVelocity", "WEIGHTS_DIR", "WEIGHTS_SHA256", "verify_committed_weights",
           "committed_weights", "training_summary",
           "teacher_mixture", "teacher_schedule", "build_network", "read_toy_weights", "load_cm_gmm2d",
           "load_fm_gmm2d", "FORMAT"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT = "pretrained.toy/1"
# The sha256 of every committed file in pretrained/weights/, checked at load.  After retraining
# (python -m pretrained.train_gmm2d KIND, or python -m pretrained.train_NAME for NAME.pt, prints the new
# digest) put the new value here.
WEIGHTS_SHA256 = {
    "cm_gmm2d.pt": "a60a4b764607fc80148a163821888bab7c24bc4e8f401907896fd2d869e6e80d",
    "fm_gmm2d.pt": "2af1219d0c24851da0b5c9092da6eb17515f2ae552893db33b5dff193f264e3d",
    "mnist_classifier.pt": "aecbc49be92c7554a26211aeed3e22ead015e0124b0064506e05ba47ebadb570",
    "fm_mnist.pt": "fefecd223c988dd5827daa8f98f0d4fd3259b197e27004331bc5b73a78ae80ae",
    "cfg_mnist.pt": "5953415461c251a5071ca877b9ec584a0326c497ab09d1618fafc666b6da35ce",
    "cm_mnist.pt": "10e450489c447afb76d86aedd47cb72322d215ebb87124ea30174963b59f239d",
    "ldm_mnist.pt": "323654c93420905834ec951a7ec0a49b47735785db442a9dace93134818d0bd7",
}


def verify_committed_weights(path: os.PathLike) -> None:
    """Check a file of :data:`WEIGHTS_DIR` against its entry in :data:`WEIGHTS_SHA256`.

    Files elsewhere (a user's own ``weights=PATH``) are not checked here; they load weights-only.

    Raises:
        CheckpointError: the file has no digest entry, or its sha256 differs (the message names the file,
            the expected and the actual digest, and how to restore or rebuild it).
    """
    path = Path(path)
    if path.resolve().parent != WEIGHTS_DIR.resolve():
        return
    name, kind = path.name, path.name.split("_")[0]
    # X_gmm2d*.pt is rebuilt by train_gmm2d X; any other NAME.pt by its own script, pretrained.train_NAME.
    rebuild = f"python -m pretrained.train_gmm2d {kind}" if "_gmm2d" in name and kind in ("cm", "fm") \
        else f"python -m pretrained.train_{path.stem}"
    expected = WEIGHTS_SHA256.get(name)
    if expected is None:
        raise CheckpointError(
            f"{path} is in pretrained/weights/ but has no sha256 entry in WEIGHTS_SHA256 (pretrained/toy.py); "
            f"add its digest there (sha256sum {path}) before loading it")
    actual = file_digest(path, "sha256")
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 is {actual}, but the committed {name} has sha256 {expected}. The file was changed "
            f"or corrupted; restore it with `git checkout -- pretrained/weights/{name}`, or retrain it with "
            f"`{rebuild}` and put its new sha256 in WEIGHTS_SHA256 (pretrained/toy.py).")


def committed_weights(weights: Optional[os.PathLike], default: Path, rebuild: str) -> Path:
    """The weight file a loader reads: ``weights`` or the committed ``default``, which must exist (else a
    FileNotFoundError saying how to rebuild it or where to point ``weights``); files of :data:`WEIGHTS_DIR` are
    checked against :data:`WEIGHTS_SHA256` (:func:`verify_committed_weights`)."""
    path = Path(weights) if weights is not None else default
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the committed weights are {default} (rebuild them "
                                f"with: {rebuild}), or pass weights=PATH (bench.run: --weights PATH)")
    verify_committed_weights(path)
    return path


def training_summary(path: Path) -> str:
    """The ``training.summary`` of a committed weight record, for its card (a placeholder when the file is
    missing or unreadable: a card must register anyway, and its loader says what is wrong)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["training"]["summary"]
    except Exception:
        return f"(weights not found at {path})"


def teacher_mixture() -> GaussianMixture:
    """The exact model both toys learn: the ``gmm2d`` card's mixture (8 Gaussians on a ring)."""
    return gmm2d("ring")


def teacher_schedule(kind: str):
    """The schedule of the ``cm`` (EDM, σ ∈ [0.002, 80]) or ``fm`` (rectified flow) model."""
    if kind == "cm":
        return EDM(0.002, 80.0)
    if kind == "fm":
        return RectifiedFlow()
    raise ValueError(f"unknown toy model kind {kind!r}; valid: cm, fm")


class PointMLP(nn.Module):
    """F(x, c): an MLP on x ∈ R^dim and Fourier features [c, sin(2^k·π·c), cos(2^k·π·c)] of a scalar c.

    Args:
        dim: data dimension.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        n_freq: number of Fourier frequencies (2^0 … 2^(n_freq−1), times π).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 4, n_freq: int = 6):
        super().__init__()
        self.dim, self.hidden, self.depth, self.n_freq = dim, hidden, depth, n_freq
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        layers, width = [], dim + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """F(x, c) for x (B, dim) and c (B,)."""
        c = c.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        phase = c * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, c, torch.sin(phase), torch.cos(phase)], dim=1))

    def arch(self) -> dict:
        """The constructor arguments (stored in weight files)."""
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "n_freq": self.n_freq}


class FlowVelocity(nn.Module):
    """u(x, t) = s_out·F(c_in(t)·x, t) with c_in = 1/√((1 − t)²σ_d² + t²) (unit-variance input) and
    s_out = √(σ_d² + 1) (the std of the target ε − x0)."""

    def __init__(self, network: PointMLP, sigma_data: float):
        super().__init__()
        self.network, self.sigma_data = network, float(sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1)
        c_in = torch.rsqrt((1.0 - t) ** 2 * self.sigma_data ** 2 + t ** 2)
        return math.sqrt(self.sigma_data ** 2 + 1.0) * self.network(x * c_in, t.reshape(-1))


def cm_noise(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise(σ) = ¼·log σ (EDM's), the MLP's time input for the consistency model."""
    return 0.25 * torch.log(sigma)


def build_network(kind: str, arch: dict, sigma_data: float) -> nn.Module:
    """The ``fn(x, model_time)`` module of a toy model (untrained)."""
    mlp = PointMLP(**arch)
    if kind == "cm":
        return ConsistencyFunction(mlp, BoundaryScalings(sigma_data, teacher_schedule("cm").sigma_min), cm_noise)
    if kind == "fm":
        return FlowVelocity(mlp, sigma_data)
    raise ValueError(f"unknown toy model kind {kind!r}; valid: cm, fm")


def read_toy_weights(path: os.PathLike, kind: str) -> tuple[nn.Module, dict]:
    """Read a weight file written by ``train_gmm2d`` and return (network, its record).

    Raises:
        CheckpointError: unreadable, another format or kind, missing/unexpected keys or wrong shapes.
    """
    def build(record: dict) -> nn.Module:
        if record.get("kind") != kind:
            raise CheckpointError(f"{path} holds a {record.get('kind')!r} model, not {kind!r}")
        return build_network(kind, dict(record["arch"]), float(record["sigma_data"]))

    return read_network_record(path, fmt=FORMAT, what=f"the {kind}_gmm2d weights",
                               rebuild="python -m pretrained.train_gmm2d", build=build)


def _loader(kind: str):
    prediction = {"cm": "x0", "fm": "velocity"}[kind]

    def load(*, device: str = "cpu", weights: Optional[os.PathLike] = None, dtype: Optional[torch.dtype] = None,
             **model_kwargs) -> solvers.DiffusionModel:
        path = Path(weights) if weights is not None else WEIGHTS_DIR / f"{kind}_gmm2d.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; the committed weights are in {WEIGHTS_DIR} "
                                    f"(rebuild them with: python -m pretrained.train_gmm2d {kind}), or pass "
                                    "weights=PATH (bench.run: --weights PATH)")
        verify_committed_weights(path)
        net, _ = read_toy_weights(path, kind)
        net = net.to(device=device, dtype=dtype or torch.float32)
        return solvers.DiffusionModel(net, schedule=teacher_schedule(kind), prediction=prediction,
                                      input_dtype=dtype or torch.float32, **model_kwargs)

    load.__doc__ = (f"The ``{kind}_gmm2d`` card's loader: weights=PATH (default pretrained/weights/{kind}_gmm2d.pt),"
                    " device, dtype; other keyword arguments go to solvers.DiffusionModel.")
    return load


load_cm_gmm2d = _loader("cm")
load_fm_gmm2d = _loader("fm")


def _training_note(kind: str) -> str:
    path = WEIGHTS_DIR / f"{kind}_gmm2d.pt"
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        return record.get("training", {}).get("summary", "")
    except Exception:  # a card must register even if its weights are missing; load() says what is wrong
        return f"(weights not found at {path})"


def _card(kind: str, loader, description: str, schedule_name: str, prediction: str, **extra_fields) -> ModelCard:
    mixture = teacher_mixture()
    schedule = teacher_schedule(kind)

    def exact_ode(x_T: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        return mixture.ode_solution(schedule, x_T, t_from, t_to, rtol=1e-9, atol=1e-11, per_sample=False)

    return register_card(ModelCard(
        name=f"{kind}_gmm2d", kind="points", description=description, loader=loader, sample_shape=(2,),
        prediction=prediction, schedule_name=schedule_name,
        data_range=(float((mixture.means - 3 * mixture.stds[:, None]).min()),
                    float((mixture.means + 3 * mixture.stds[:, None]).max())),
        reference="exact", data_sampler=lambda n, seed=0: mixture.sample(n, seed), exact_ode=exact_ode,
        default_num_samples=2000, default_batch_size=2000,
        source_url=None, sha256=None, licence="MIT (this project)",
        weights_note=f"Trained by this project: {_training_note(kind)}",
        notes=f"Rebuild the weights with: python -m pretrained.train_gmm2d {kind} (a few CPU minutes). exact_ode "
              "is the teacher's (the exact gmm2d mixture's) probability-flow ODE on this schedule.",
        extra={"mixture": mixture, "schedule": schedule, "weights": WEIGHTS_DIR / f"{kind}_gmm2d.pt"},
        **extra_fields))


_card("cm", load_cm_gmm2d,
      "A consistency model of gmm2d (8 Gaussians on a ring), distilled by this project from the exact "
      "probability-flow ODE: one network call maps noise σ = 80 to a sample.",
      "EDM(σ_min = 0.002, σ_max = 80), solver time = σ; EDM boundary scalings, σ_d = data std", "x0",
      default_solver_options={"consistency": {"sigma_boundary": 0.002}})
_card("fm", load_fm_gmm2d,
      "A rectified-flow velocity model of gmm2d trained by this project (conditional flow matching), so "
      "the velocity parameterisation runs on a learned network.",
      "RectifiedFlow: x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1]", "velocity")
