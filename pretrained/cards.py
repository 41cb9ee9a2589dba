"""Model cards as data: what a model is, how to load it, and how to judge its samples.

A :class:`ModelCard` names the loader, the schedule and prediction type, the sample shape, the data range
and how samples become images, the reference data for Fréchet distances, the provenance of the weights
(source URL, sha256, licence, what the weights are) and the published numbers with their source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import solvers

__all__ = ["ModelCard", "PublishedFID", "published_table", "register_card", "CARDS", "get_card", "available_models",
           "load"]


@dataclass(frozen=True)
class PublishedFID:
    """A published FID of a model under one sampler setting, for side-by-side tables.

    Attributes:
        description: the card's ``published`` key (what was measured, for people).
        setting: the sampler setting in a few words (a table's row label).
        solver, steps: the run cells with the same setting (a solver name and a step count).
        fid: the published value (50,000 samples against the card's reference, Inception-v3, unless the
            description says otherwise).
        source: the paper and table.
        deterministic: only cells with this ``deterministic`` flag match (DDIM η = 0); None: any.
    """

    description: str
    setting: str
    solver: str
    steps: int
    fid: float
    source: str
    deterministic: Optional[bool] = None

    def as_row(self) -> dict[str, Any]:
        """The entry as a plain dict (setting, solver, steps, fid, source, deterministic)."""
        return {"setting": self.setting, "solver": self.solver, "steps": self.steps, "fid": self.fid,
                "source": self.source, "deterministic": self.deterministic}


def published_table(fids) -> dict[str, tuple[float, str]]:
    """``{description: (fid, source)}`` of :class:`PublishedFID` entries: a card's ``published`` numbers made
    from its structured FIDs, so each number is written once."""
    return {p.description: (p.fid, p.source) for p in fids}


@dataclass(frozen=True)
class ModelCard:
    """Everything the zoo and the benchmark know about one model.

    Attributes:
        name: registry name.
        kind: ``"analytic"`` (exact, closed-form), ``"points"`` (a learned low-dimensional model) or
            ``"image"`` (a network producing images).
        description: one paragraph for people.
        loader: ``loader(device=..., weights=..., dtype=...) -> solvers.DiffusionModel``.
        sample_shape: shape of one sample (without the batch dimension).
        prediction: what the network predicts (``"eps"``, ``"x0"``, …).
        schedule_name: a human description of the schedule.
        data_range: (low, high) of the data the model generates.
        to_images: maps samples to float images in [0, 1], (B, C, H, W) — image models only.
        reference: what quality metrics compare against: for image models a dataset name
            (``"cifar10-train"``, ``"mnist-test"``); for analytic ones ``"exact"``.
        data_sampler: ``data_sampler(n, seed) -> tensor`` of exact data samples (analytic and points models).
        exact_ode: ``exact_ode(x_T, t_from, t_to) -> tensor``: the exact probability-flow solution, where
            one exists in closed form or by a high-accuracy reference solver.
        default_num_samples, default_batch_size: benchmark defaults that make sense for this model.
        default_solver_options: per-solver options this model needs (e.g. the consistency boundary).
        source_url, sha256, licence, weights_note: provenance of the weights (None for analytic models).
        md5: the publisher's md5 where no sha256 is published (checksums are never guessed).
        published: published numbers as {description: (value, source)}.
        published_fids: the published FIDs with the sampler setting each was measured with (what a run's
            cells are compared against; see :meth:`published_fid_rows`).
        notes: anything else a user must know (e.g. "these are the NON-EMA weights").
        decoder: for a latent model, ``decoder(device=...) -> fn(latents) -> samples`` (e.g. a VAE decoder);
            ``sample_shape`` is then the latents' shape and ``data_shape`` the decoded samples' (what
            ``to_images``, ``data_range`` and the metrics see).  The benchmark times decoding apart.
        decoder_name: what the decoder is, for reports.
        num_classes: for a class-conditional model, the number of classes (0: unconditional).
        condition: for a class-conditional model, ``condition(model, labels, guidance) -> DiffusionModel``: the
            loaded model conditioned on ``labels`` (a LongTensor with one entry per sample of the batch, values
            in [0, num_classes)) under classifier-free guidance of scale w = ``guidance``, out_u + w·(out_c −
            out_u) (w = 1: the conditional model alone, 0: the unconditional one). It costs one network row
            per sample at w ∈ {0, 1} and two otherwise (``rows_per_sample``).
        default_guidance: the guidance scales a benchmark sweep uses when none are asked for.
    """

    name: str
    kind: str
    description: str
    loader: Callable[..., solvers.DiffusionModel]
    sample_shape: tuple
    prediction: str
    schedule_name: str
    data_range: tuple = (-1.0, 1.0)
    to_images: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    reference: str = "exact"
    data_sampler: Optional[Callable[[int, int], torch.Tensor]] = None
    exact_ode: Optional[Callable[..., torch.Tensor]] = None
    default_num_samples: int = 1000
    default_batch_size: int = 500
    default_solver_options: dict = field(default_factory=dict)
    source_url: Optional[str] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None
    licence: Optional[str] = None
    weights_note: Optional[str] = None
    published: dict = field(default_factory=dict)
    published_fids: tuple = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)
    decoder: Optional[Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = None
    decoder_name: str = ""
    data_shape: Optional[tuple] = None
    num_classes: int = 0
    condition: Optional[Callable[..., solvers.DiffusionModel]] = None
    default_guidance: tuple = ()

    def __post_init__(self):
        if (self.num_classes > 0) != (self.condition is not None):
            raise ValueError(f"model card {self.name!r}: a class-conditional card needs both num_classes > 0 and "
                             f"condition; got num_classes={self.num_classes} and condition={self.condition!r}")
        if self.default_guidance and not self.num_classes:
            raise ValueError(f"model card {self.name!r}: default_guidance is for class-conditional cards")

    def published_fid_rows(self) -> list[dict[str, Any]]:
        """The published FIDs to set beside a run's cells, as plain dicts with the keys setting, solver, steps,
        fid, source and deterministic (a cell matches when its solver and steps are equal and, where
        ``deterministic`` is not None, its deterministic flag too).  Empty when nothing is published."""
        return [p.as_row() for p in self.published_fids]

    def summary(self) -> dict[str, Any]:
        """The card's plain-data fields (for reports)."""
        keep = ("name", "kind", "description", "sample_shape", "prediction", "schedule_name", "data_range",
                "reference", "source_url", "sha256", "md5", "licence", "weights_note", "published", "notes",
                "decoder_name", "data_shape", "num_classes", "default_guidance")
        return {k: getattr(self, k) for k in keep}


CARDS: dict[str, ModelCard] = {}


def register_card(card: ModelCard) -> ModelCard:
    """Add a card to the registry (names are unique)."""
    if card.name in CARDS:
        raise ValueError(f"a model card named {card.name!r} is already registered")
    CARDS[card.name] = card
    return card


def available_models() -> list[str]:
    """Names accepted by :func:`load` and :func:`get_card`."""
    return sorted(CARDS)


def get_card(name: str) -> ModelCard:
    """The card registered under ``name``; unknown names list the valid ones."""
    try:
        return CARDS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}") from None


def load(name: "str | ModelCard", **kwargs) -> solvers.DiffusionModel:
    """Load a model by name (or from its card): ``pretrained.load("gmm2d")`` → a ready
    :class:`solvers.DiffusionModel`.

    Keyword arguments go to the card's loader (``device``, ``weights`` path, ``dtype``, …).
    """
    return (name if isinstance(name, ModelCard) else get_card(name)).loader(**kwargs)
