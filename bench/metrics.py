"""Quality measures: Fréchet distance, sliced Wasserstein distance, error against the exact ODE solution, and the
class accuracy of a class-conditional MNIST model's samples.

The functions here are plain numerics on NumPy arrays (float64).  Which measure fits which model, its
label in reports and how its per-sample features are made lives in :data:`METRICS`; the feature
extractors for images are in :mod:`bench.features`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

__all__ = ["frechet_distance", "gaussian_statistics", "FeatureMoments", "frechet_distance_features", "sliced_wasserstein",
           "projections", "rmse", "MetricSpec", "DataDistance", "ExactODEError", "FeatureFrechet", "MnistFrechet",
           "ClassAccuracy",
           "MNIST_REFERENCES", "METRICS",
           "available_metrics", "get_metric", "default_metrics", "metrics_for", "check_metrics"]


# -- Fréchet distance ------------------------------------------------------------------------------------
def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, n − 1) covariance of ``features`` (n, d), in float64.

    Raises:
        ValueError: fewer than two samples, or non-finite features.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors as an (n, d) array, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or Inf")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


class FeatureMoments:
    """Running mean and covariance of feature vectors, batch by batch: memory O(d²) whatever the sample count.

    Batches are merged with Chan, Golub and LeVeque's pairwise update (the mean and the centred sum of outer
    products M2 of each part; "Updating formulae and a pairwise algorithm for computing sample variances",
    1979), which is exact and keeps the cancellation of a one-pass sum of squares out, so the statistics equal
    :func:`gaussian_statistics` of all the features at once up to rounding, in any batch split or rank order.
    """

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    def add(self, features: np.ndarray) -> "FeatureMoments":
        """Add a batch (n, d) of feature vectors; returns self.

        Raises:
            ValueError: a batch of another dimension, or non-finite features.
        """
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.size:
            raise ValueError(f"feature batch of shape {f.shape}; expected (n, {self.mean.size})")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or Inf")
        if len(f):
            part = FeatureMoments(self.mean.size)
            part.n, part.mean = len(f), f.mean(axis=0)
            centred = f - part.mean
            part.m2 = centred.T @ centred
            self.merge(part)
        return self

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        """Fold ``other``'s statistics into these (another rank's, or another batch's); returns self."""
        if other.mean.size != self.mean.size:
            raise ValueError(f"cannot merge moments of dimension {other.mean.size} into {self.mean.size}")
        n = self.n + other.n
        if other.n:
            delta = other.mean - self.mean
            self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
            self.mean = self.mean + delta * (other.n / n)
            self.n = n
        return self

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (unbiased, n − 1) covariance, as :func:`gaussian_statistics`.

        Raises:
            ValueError: fewer than two samples.
        """
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


def _numerical_zero(w: np.ndarray) -> float:
    # Eigenvalues below this are round-off of a (near-)singular matrix: their square roots (~1e-8 for a
    # round-off of 1e-16) would otherwise add up to a visible error in the trace.
    return float(np.max(np.abs(w), initial=0.0)) * w.size * np.finfo(np.float64).eps


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (round-off eigenvalues zeroed)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    w = np.where(w > _numerical_zero(w), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 − mu2|² + tr(S1) + tr(S2) − 2·tr((S1 S2)^{1/2}).  The trace of the square root is computed as
    tr((S1^{1/2} S2 S1^{1/2})^{1/2}) — the eigenvalues of a symmetric PSD matrix, which are real and
    non-negative, so no complex round-off and no ``sqrtm`` of a non-symmetric product; eigenvalues at the
    round-off level of a singular covariance (fewer samples than dimensions) are set to zero rather than
    contributing their square roots (1e-16 → 1e-8 each).

    Returns:
        The distance (a float ≥ 0 up to rounding; clipped at 0).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.where(eig > _numerical_zero(eig), eig, 0.0)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance_features(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two sets of feature vectors."""
    return frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y))


# -- sliced Wasserstein ----------------------------------------------------------------------------------
def projections(dim: int, n_projections: int, seed: int = 0) -> np.ndarray:
    """``n_projections`` unit directions in R^dim (rows), fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((n_projections, dim))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_θ W2²(θ·x, θ·y)) over fixed random directions θ.

    With equal sample counts the 1-D W2 is the root mean square difference of the sorted projections;
    otherwise both empirical quantile functions are evaluated at the midpoints of max(n, m) bins.

    Args:
        x, y: (n, d) and (m, d) samples.
        n_projections: number of directions.
        seed: fixes the directions (the same for every cell, so cells are comparable).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    theta = projections(x.shape[1], n_projections, seed)
    px, py = np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0)
    if px.shape[0] != py.shape[0]:
        q = (np.arange(max(len(px), len(py))) + 0.5) / max(len(px), len(py))
        px = np.quantile(px, q, axis=0, method="inverted_cdf")
        py = np.quantile(py, q, axis=0, method="inverted_cdf")
    return float(np.sqrt(np.mean((px - py) ** 2)))


def rmse(x: np.ndarray, y: np.ndarray) -> float:
    """Root mean square difference over all coordinates of all samples."""
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return float(np.sqrt(np.mean(d * d)))


# -- the registry of metrics -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    """What a metric is, for whom, how reports name it, and how it computes its value.

    Attributes:
        key: the ``--metric`` name.
        label: the name in tables and charts (never "FID" unless it is Inception-v3 FID).
        kinds: model kinds (``ModelCard.kind``) it fits.
        description: one line for ``--help`` and reports.
        needs_exact_ode: needs ``card.exact_ode``.
        deterministic_only: only defined for deterministic solvers (NaN with a note otherwise).
        source: the per-sample features a cell provides for it (``"data"``: the flattened samples;
            ``"ode_error"``: squared errors against the exact ODE; else image features under this key).
        higher_is_better: False for a distance or an error (the default), True for a score such as an accuracy;
            reports rank the cells by the distance from ``ideal``.
        ideal: the best value the metric can take (0 for a distance, 1 for an accuracy).
    """

    key: str
    label: str
    kinds: tuple
    description: str
    needs_exact_ode: bool = False
    deterministic_only: bool = False
    source: str = "data"
    higher_is_better: bool = False
    ideal: float = 0.0

    def value(self, features: np.ndarray, reference) -> float:
        """The metric of a cell from its per-sample ``features`` and the reference for ``source``."""
        raise NotImplementedError

    def compute(self, features: np.ndarray, reference, deterministic: bool) -> tuple[float, Optional[str]]:
        """(value, note): NaN with a note where the metric is not defined for this cell's solver."""
        if self.deterministic_only and not deterministic:
            return float("nan"), "not defined for a stochastic solver"
        return self.value(features, reference), None

    def unfit_reason(self, card) -> Optional[str]:
        """Why the metric does not fit ``card`` (None when it does)."""
        if card.kind not in self.kinds:
            return (f"it is for {'/'.join(self.kinds)} models and {card.name} is a"
                    f"{'n' if card.kind[0] in 'aeiou' else ''} {card.kind} model")
        if self.needs_exact_ode and card.exact_ode is None:
            return f"it needs an exact ODE solution, which {card.name} does not have"
        if self.needs_exact_ode and card.num_classes:
            return (f"{card.name} is class-conditional and its cells are guided: the card's exact ODE is not that of "
                    "the guided model (ref_error solves the guided ODE itself)")
        return None


@dataclass(frozen=True)
class DataDistance(MetricSpec):
    """A distance between the samples and exact data samples, in data space; its noise floor is the same
    distance from fresh exact samples."""

    distance: Callable[[np.ndarray, np.ndarray], float] = None
    reference_detail: str = ""

    def unfit_reason(self, card) -> Optional[str]:
        if card.kind in self.kinds and card.data_sampler is None:
            return f"it needs exact data samples, which {card.name} does not have"
        return super().unfit_reason(card)

    def value(self, features, reference) -> float:
        return self.distance(features, reference)

    def reference_note(self, n: int, n_ref: int, draws: int) -> str:
        """How the reference and the noise floor were made (for reports)."""
        return (f"vs {n_ref:,} exact data samples{self.reference_detail}; the noise floor is {n:,} fresh exact "
                f"samples against them (mean ± sd of {draws} draws)")


@dataclass(frozen=True)
class ExactODEError(MetricSpec):
    """RMS difference from the exact probability-flow solution from the same x_T."""

    source: str = "ode_error"
    note: str = "RMSE over coordinates vs the exact PF-ODE solution from the same x_T"

    def value(self, features, reference) -> float:
        return float(np.sqrt(np.mean(features)))


@dataclass(frozen=True)
class ReferenceSolutionError(MetricSpec):
    """RMS difference from a high-accuracy numerical solution of the same model's probability-flow ODE from
    the same x_T (:mod:`bench.reference_solutions`): any model's solver error, with no data."""

    source: str = "ref_error"

    def value(self, features, reference) -> float:
        return float(np.sqrt(np.mean(features)))


@dataclass(frozen=True)
class FeatureFrechet(MetricSpec):
    """Fréchet distance in the features of an image network against the card's reference statistics;
    ``weights_option`` is the run option naming the network's weights file."""

    weights_option: str = ""

    def unfit_reason(self, card) -> Optional[str]:
        if card.kind in self.kinds and card.reference in (None, "none"):
            return (f"it needs reference data, and {card.name} names none (its card's reference is "
                    f"{card.reference!r}); set reference = \"mnist-test\" or \"cifar10-train\" in the card")
        return super().unfit_reason(card)

    def value(self, features, reference) -> float:
        """``features``: the cell's feature vectors (n, d), or their :class:`FeatureMoments`."""
        mu, sigma = features.statistics() if isinstance(features, FeatureMoments) else gaussian_statistics(features)
        return frechet_distance(mu, sigma, reference["mu"], reference["sigma"])

    def reference_for(self, card) -> str:
        """The reference data set the samples of ``card`` are compared with: the card's own."""
        return card.reference

    @staticmethod
    def reference_note(reference_name: str, n_ref: int, n: int, draws: int) -> str:
        """How the reference statistics and the noise floor were made (for reports)."""
        if not n_ref:
            return f"vs the precomputed statistics {reference_name} (no noise floor: the images are not at hand)"
        return (f"vs {reference_name} (n_ref = {n_ref:,}); the noise floor is {n:,} reference images (random "
                f"subsets) against the whole reference (mean ± sd of {draws} draws)")


MNIST_REFERENCES = ("mnist-test", "mnist-heldout")


@dataclass(frozen=True)
class MnistFrechet(FeatureFrechet):
    """Fréchet distance in the penultimate features of the project's MNIST classifier, always against the
    2,000 held-out MNIST images (``mnist-heldout``: the classifier was trained on the other 8,000, whose
    features it has fitted), whatever MNIST reference the card names.  For MNIST models only: 1×28×28
    images whose card's reference is an MNIST data set."""

    def unfit_reason(self, card) -> Optional[str]:
        if card.kind in self.kinds:
            shape = tuple(card.data_shape or card.sample_shape)
            if shape != (1, 28, 28):
                return f"it is for MNIST models (1×28×28 images) and {card.name} makes {'×'.join(map(str, shape))}"
            if card.reference not in MNIST_REFERENCES:
                return (f"it is measured against the 2,000 held-out MNIST images only, and {card.name}'s reference "
                        f"is {card.reference!r} (your own --reference data: use fd_resnet20)")
        return super().unfit_reason(card)

    def reference_for(self, card) -> str:
        return "mnist-heldout"

    @staticmethod
    def reference_note(reference_name: str, n_ref: int, n: int, draws: int) -> str:
        return (f"vs mnist-heldout, MNIST test images held out from the classifier's training (every fifth; "
                f"n_ref = {n_ref:,}); the noise floor is {n:,} of them (random subsets) against all {n_ref:,} (mean ± "
                f"sd of {draws} draws)")


@dataclass(frozen=True)
class ClassAccuracy(MetricSpec):
    """The fraction of a class-conditional MNIST model's samples that the project's MNIST classifier
    (:mod:`pretrained.mnist_classifier`) assigns to the class they were generated for (sample i: class
    i mod 10, :func:`bench.plan.sample_labels`); higher is better.  Its noise floor is the classifier's own
    accuracy on held-out MNIST images with their true labels (98.55 % on all 2,000): what perfect samples
    would score."""

    source: str = "class_accuracy"
    higher_is_better: bool = True
    ideal: float = 1.0

    def unfit_reason(self, card) -> Optional[str]:
        if card.kind in self.kinds:
            shape = tuple(card.data_shape or card.sample_shape)
            if not card.num_classes:
                return f"it is for class-conditional models and {card.name} is unconditional"
            if shape != (1, 28, 28) or card.num_classes != 10:
                return (f"it is for MNIST-like models (1×28×28 images, 10 classes: the MNIST classifier's) and "
                        f"{card.name} makes {'×'.join(map(str, shape))} images of {card.num_classes} classes")
        return super().unfit_reason(card)

    def value(self, features, reference) -> float:
        return float(np.mean(features))

    @staticmethod
    def reference_note(n_ref: int, n: int, draws: int) -> str:
        """How the noise floor was made (for reports)."""
        how = "random subsets" if n <= n_ref else "drawn with replacement"
        return (f"fraction of samples the MNIST classifier assigns to their label (sample i: class i mod 10); the "
                f"noise floor is the classifier's accuracy on {n:,} of the {n_ref:,} held-out MNIST images with "
                f"their true labels ({how}; mean ± sd of {draws} draws); higher is better")


METRICS: dict[str, MetricSpec] = {m.key: m for m in (
    DataDistance("fd_data", "FD (data space)", ("analytic", "points"),
                 "Fréchet distance between the samples and exact data samples, in data space",
                 distance=frechet_distance_features),
    DataDistance("swd", "Sliced W2 (data space)", ("analytic", "points"),
                 "sliced 2-Wasserstein distance to exact data samples (256 fixed random directions)",
                 distance=sliced_wasserstein, reference_detail=", 256 fixed directions"),
    ExactODEError("ode_error", "ODE error (RMSE vs exact PF-ODE)", ("analytic",),
                  "RMS difference from the exact probability-flow ODE solution from the same x_T "
                  "(deterministic solvers only)", needs_exact_ode=True, deterministic_only=True),
    ReferenceSolutionError("ref_error", "ODE error (RMSE vs reference solution)", ("analytic", "points", "image"),
                           "RMS difference from a high-accuracy solution of the same model's probability-flow ODE "
                           "from the same x_T (DPM-Solver++(3M), 2×250 log-SNR steps; its own error estimated "
                           "and stated; cached in OUT/reference_solutions; deterministic solvers only)",
                           deterministic_only=True),
    FeatureFrechet("fid", "FID (Inception-v3)", ("image",),
                   "Fréchet Inception Distance (torch-fidelity, Inception-v3 pool3, 2048-d) against the model "
                   "card's reference data; needs the Inception weights (downloaded once)",
                   source="fid", weights_option="inception_weights"),
    FeatureFrechet("fd_resnet20", "FD (ResNet-20)", ("image",),
                   "Fréchet distance in the 64-d pooled features of a CIFAR-10 ResNet-20 (offline; "
                   "not comparable with FID)", source="fd_resnet20", weights_option="resnet20_weights"),
    MnistFrechet("fd_mnist", "FD (MNIST classifier)", ("image",),
                 "Fréchet distance in the 128-d penultimate features of the project's MNIST classifier against "
                 "the 2,000 held-out MNIST test images (MNIST models only; offline; not comparable with FID)",
                 source="fd_mnist"),
    ClassAccuracy("class_accuracy", "class accuracy (MNIST classifier)", ("image",),
                  "the fraction of samples the project's MNIST classifier assigns to the label they were "
                  "generated for (class-conditional MNIST models; higher is better)"),
)}


def available_metrics() -> list[str]:
    """The valid ``--metric`` names."""
    return list(METRICS)


def get_metric(key: str) -> MetricSpec:
    """The metric named ``key``; unknown names list the valid ones."""
    try:
        return METRICS[key]
    except KeyError:
        raise ValueError(f"unknown metric {key!r}; valid metrics: {', '.join(METRICS)}") from None


def metrics_for(card) -> list[str]:
    """The metrics that fit a model card."""
    return [k for k, m in METRICS.items() if m.unfit_reason(card) is None]


def default_metrics(card) -> list[str]:
    """The default metric set of a model.

    Analytic and point models: every exact measure that fits.  Image models: FID when the card's reference
    is the standard FID reference (CIFAR-10 train: the paper protocol), otherwise FD with the offline
    ResNet-20 features — an Inception FID against another reference would not be the FID anyone publishes.
    The project's own MNIST models (reference ``mnist-heldout``): FD in the MNIST classifier's features, and for
    a class-conditional one the class accuracy of its samples too.
    A model with no data and no exact solution (your own, with no reference): the error against a reference
    solution of its own ODE.  ``ref_error`` is otherwise asked for by name (it costs a long solve).
    """
    fits = metrics_for(card)
    if card.kind == "image" and card.reference == "mnist-heldout" and "fd_mnist" in fits:
        return ["fd_mnist"] + (["class_accuracy"] if "class_accuracy" in fits else [])
    if card.kind == "image" and "fd_resnet20" in fits:
        return ["fid"] if card.reference == "cifar10-train" else ["fd_resnet20"]
    chosen = [k for k in fits if k not in ("ref_error", "fid", "fd_resnet20", "fd_mnist", "class_accuracy")]
    return chosen or ["ref_error"]


def check_metrics(keys: list[str], card) -> list[str]:
    """Validate ``keys`` against the model; returns them de-duplicated in order.

    Raises:
        ValueError: unknown metric, or a metric that does not fit the model (the message lists those that do).
    """
    out = []
    for k in keys:
        why = get_metric(k).unfit_reason(card)
        if why is not None:
            raise ValueError(f"metric {k!r} does not fit model {card.name!r}: {why}; "
                             f"metrics for {card.name}: {', '.join(metrics_for(card))}")
        if k not in out:
            out.append(k)
    return out
