"""Quality measurement of a sweep: feature extractors, reference statistics, noise floors, the exact ODE.

Each metric (:data:`bench.metrics.METRICS`) names the per-sample features it needs (its ``source``) and
computes its own value; :class:`Evaluator` makes those features for a cell's samples and the references they
are compared with, once per sweep.  The reference data (labels, noise floors, notes, the card) is written with
:func:`bench.results.write_reference_info`, beside the results.
"""
from __future__ import annotations

import contextlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from . import metrics as M
from .config import SweepConfig
from .distributed import Dist
from .plan import Cell
from .reference_solutions import REF_SOLVER, REF_STEPS, ReferenceSolutions
from .results import save_preview, write_reference_info

__all__ = ["Evaluator", "CellFeatures", "labelled_bars", "prepare_references", "write_reference", "FLOOR_DRAWS", "PREVIEW_IMAGES",
           "PREVIEW_POINTS"]

PREVIEW_IMAGES = 64
PREVIEW_POINTS = 2000
FLOOR_DRAWS = 10                 # draws averaged for a metric's noise floor


class Evaluator:
    """Makes per-rank features of a cell's samples and, on rank 0, the metric values from all of them.

    Each metric (:data:`bench.metrics.METRICS`) names the per-sample features it needs (its ``source``) and
    computes its own value and reference note; this class makes the features and the references.
    """

    def __init__(self, card, metric_keys: list[str], cfg: SweepConfig, device: str, dist: Dist, progress: bool,
                 say: Optional[Callable[[str], None]] = None, model=None):
        self.card, self.keys, self.device, self.dist, self.progress = card, metric_keys, device, dist, progress
        self.say = say if say is not None and dist.main else (lambda text: None)  # long steps, labelled
        self.model = model  # the sweep's model: ref_error solves its ODE
        self.specs = [M.METRICS[k] for k in metric_keys]
        self.frechet = [s for s in self.specs if isinstance(s, M.FeatureFrechet)]
        self.sources = {s.source for s in self.specs}
        self.cfg = cfg
        self.image = card.kind == "image"
        self.extractors: dict = {}
        self.reference: dict = {}
        self.floors: dict = {}
        self.notes: dict = {}
        self._exact_cache: dict = {}
        self.solutions: Optional[ReferenceSolutions] = None
        self.classifier = None  # class_accuracy's judge (the project's MNIST classifier)

    def prepare(self, n: int) -> None:
        """Build the feature extractors (every rank) and the reference statistics (rank 0).

        Raises:
            OfflineFeatureExtractorError, ReferenceDataError: with the message to show.
        """
        if self.frechet:
            self._prepare_images(n)
        if self.dist.main and "data" in self.sources:
            self._prepare_data(n)
        if "class_accuracy" in self.sources:
            self._prepare_classifier(n)
        for spec in self.specs:
            if isinstance(spec, M.ExactODEError):
                self.notes[spec.key] = spec.note
            if isinstance(spec, M.ReferenceSolutionError):
                self.notes[spec.key] = (f"RMSE over coordinates vs {REF_SOLVER} with {REF_STEPS} log-SNR steps "
                                        "from the same x_T (its own error, estimated from a half-step solve, is "
                                        "stated per cell)")
                self.solutions = ReferenceSolutions(
                    self.model, self.cfg.out_dir, {"model": self.cfg.model, "options": self.cfg.model_options_json(),
                                                   "model_digest": self.cfg.model_digest,
                                                   "dtype": self.cfg.dtype, "network": self.cfg.network,
                                                   "device": torch.device(self.device).type},
                    self.cfg.batch_size, say=self.say, condition=self.card.condition)

    def _prepare_images(self, n: int) -> None:
        from .features import create_extractor
        for spec in self.frechet:
            weights = getattr(self.cfg, spec.weights_option) if spec.weights_option else None
            self.say(f"loading the {spec.label} feature extractor ({spec.key})")
            self.extractors[spec.key] = create_extractor(spec.key, self.device, weights, verbose=False)
        if not self.dist.main:
            return
        from .datasets import default_cache_dir, reference_statistics
        cache = Path(self.cfg.cache_dir) if self.cfg.cache_dir else default_cache_dir()
        for spec in self.frechet:
            ext, layer, name = self.extractors[spec.key]
            size = f"{self.cfg.reference_size:,}" if self.cfg.reference_size else "all"
            reference = spec.reference_for(self.card)
            self.say(f"reference statistics of {reference} ({size} images through {name}) and the "
                     f"{spec.label} noise floor at n = {n:,}: read from the cache in {cache} when there, else "
                     "computed once (minutes on a CPU) and cached there")
            t0 = time.perf_counter()
            with labelled_bars(f"reference statistics ({reference}, {name})"):
                ref = reference_statistics(reference, ext, layer, name, device=self.device,
                                           size=self.cfg.reference_size, cache_dir=self.cfg.cache_dir,
                                           progress=self.progress, floor_n=n, floor_seed=self.cfg.seed)
            self.say(f"reference statistics {'read from' if ref['cached'] else 'computed in '}"
                     f"{'' if ref['cached'] else f'{time.perf_counter() - t0:.3g} s and cached at'} "
                     f"{ref['cache_path']}")
            self.reference[spec.source] = ref
            self.floors[spec.key] = ref["floor"]
            self.notes[spec.key] = spec.reference_note(reference, ref["n"], n, FLOOR_DRAWS)

    def _prepare_data(self, n: int) -> None:
        n_ref = self.cfg.reference_size or n
        ref_seed = 1_000_000_007 + self.cfg.seed
        ref = self.card.data_sampler(n_ref, ref_seed).to(torch.float64).reshape(n_ref, -1).numpy()
        # The noise floor: what exact samples score, averaged over FLOOR_DRAWS fresh sets (one draw of a
        # distance between finite samples varies by a factor of several).
        self.say(f"noise floor of {', '.join(s.key for s in self.specs if s.source == 'data')}: {FLOOR_DRAWS} "
                 f"fresh sets of {n:,} exact samples against {n_ref:,} reference samples (not cached)")
        fresh = [self.card.data_sampler(n, ref_seed + 1 + i).to(torch.float64).reshape(n, -1).numpy()
                 for i in range(FLOOR_DRAWS)]
        self.reference["data"] = ref
        self.reference["preview"] = ref[:PREVIEW_POINTS, :2].astype(np.float32)
        for spec in self.specs:
            if spec.source == "data":
                draws = [spec.value(f, ref) for f in fresh]
                self.floors[spec.key] = [float(np.mean(draws)), float(np.std(draws, ddof=1))]
                self.notes[spec.key] = spec.reference_note(n, n_ref, FLOOR_DRAWS)

    def _prepare_classifier(self, n: int) -> None:
        """The MNIST classifier (every rank) and, on rank 0, class_accuracy's noise floor: its accuracy on n of the
        held-out images with their true labels, over FLOOR_DRAWS draws (with replacement where n > 2,000)."""
        from pretrained.mnist_classifier import load_mnist_classifier
        from pretrained.mnist_data import mnist_split

        from .datasets import ReferenceDataError
        spec = next(s for s in self.specs if s.source == "class_accuracy")
        self.classifier = load_mnist_classifier(device=self.device)
        if not self.dist.main:
            return
        try:
            images, labels = mnist_split("heldout")
        except (FileNotFoundError, ValueError) as e:
            raise ReferenceDataError(f"class_accuracy's noise floor needs the held-out MNIST images: {e}") from None
        right = (self._classify(images.expand(-1, 3, -1, -1)) == labels.numpy()).astype(np.float64)
        rng = np.random.default_rng(1_000_000_007 + self.cfg.seed)
        draws = [right[rng.choice(len(right), size=n, replace=n > len(right))].mean() for _ in range(FLOOR_DRAWS)]
        self.floors[spec.key] = [float(np.mean(draws)), float(np.std(draws, ddof=1))]
        self.notes[spec.key] = spec.reference_note(len(right), n, FLOOR_DRAWS)

    def _classify(self, images: torch.Tensor) -> np.ndarray:
        """The MNIST classifier's class of each uint8 (N, 3, 28, 28) image (grey: the channels' mean, as in
        fd_mnist's feature extractor)."""
        out = []
        with torch.no_grad():
            for b in range(0, len(images), 500):
                grey = images[b:b + 500].to(self.device, torch.float32).mean(dim=1, keepdim=True) / 255.0
                out.append(self.classifier(grey)[1].argmax(dim=1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)

    def cell_features(self, cell: Cell) -> "CellFeatures":
        """An empty accumulator of ``cell``'s features on this rank, filled batch by batch (:class:`CellFeatures`)."""
        return CellFeatures(self, cell)

    def local(self, cell: Cell, samples: torch.Tensor, x_T: torch.Tensor,
              latents: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> dict:
        """This rank's features of ``samples`` in one batch (:meth:`CellFeatures.add` then ``result``)."""
        return self.cell_features(cell).add(samples, x_T, latents=latents, labels=labels).result()

    def image_features(self, cell: Cell, samples: torch.Tensor, labels: Optional[torch.Tensor]) -> dict:
        """One batch's image features: each Fréchet metric's feature vectors under its source, the classifier's
        hits (``class_accuracy``: 1.0 where it names the sample's label) and the batch's first preview images."""
        from .features import UInt8Images, extract_features, to_uint8_rgb
        out: dict = {}
        images = to_uint8_rgb(self.card.to_images(samples))
        for spec in self.frechet:
            ext, layer, _ = self.extractors[spec.key]
            out[spec.source] = extract_features(ext, layer, UInt8Images(images), device=self.device,
                                                batch_size=self.cfg.batch_size, progress=False)
        out["preview"] = images[:PREVIEW_IMAGES].numpy()
        if self.classifier is not None:
            out["class_accuracy"] = (self._classify(images) == labels.numpy()).astype(np.float64)
        return out

    def whole_cell_features(self, cell: Cell, samples: torch.Tensor, x_T: torch.Tensor,
                            latents: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> dict:
        """The features that need a cell's samples together: the error against the reference solution
        (``ref_error``) and, for a model with exact data, the flattened samples, their exact-ODE errors and the
        point preview.  ``latents``: a latent model's ODE state before decoding (what ref_error compares)."""
        out: dict = {}
        n = samples.shape[0]

        def as_rows(t: torch.Tensor):
            return t.detach().to(torch.float64).reshape(n, -1).cpu().numpy()

        if self.solutions is not None and cell.deterministic:
            solution, error = self.solutions.solve(x_T, cell.grid, labels=labels, guidance=cell.guidance)
            out["ref_error"] = ((as_rows(samples if latents is None else latents) - solution) ** 2).mean(axis=1)
            out["ref_error_own"] = (error ** 2).mean(axis=1)
        if self.image:  # image metrics work on the uint8 images: no float64 copy of the samples
            return out
        flat = as_rows(samples)
        if "data" in self.sources:
            out["data"] = flat
        if "ode_error" in self.sources and cell.deterministic:
            exact = self._exact(x_T, cell.grid[0], cell.grid[-1])
            out["ode_error"] = ((flat - exact) ** 2).mean(axis=1)
        out["preview"] = flat[:PREVIEW_POINTS, :2].astype(np.float32)
        return out

    def _exact(self, x_T: torch.Tensor, t_from: float, t_to: float) -> np.ndarray:
        # x_T is the same in every cell (same seeds): solve the exact ODE once per (t_from, t_to).
        key = (float(t_from), float(t_to))
        if key not in self._exact_cache:
            self.say(f"ode_error's reference: the exact probability-flow ODE from t = {t_from:.4g} to {t_to:.4g} for "
                     f"{x_T.shape[0]:,} start points (once per grid start and end, kept in memory)")
            x = self.card.exact_ode(x_T.detach().to(torch.float64).cpu(), t_from, t_to)
            self._exact_cache[key] = x.to(torch.float64).reshape(x.shape[0], -1).numpy()
        return self._exact_cache[key]

    def finalize(self, cell: Cell, parts: list[dict]) -> tuple[dict, dict]:
        """Metric values (and notes) from every rank's features: per-sample arrays concatenated in rank order,
        :class:`~bench.metrics.FeatureMoments` merged."""
        values, notes = {}, {}
        for spec in self.specs:
            # a source is absent where a rank had no sample of it (or the metric is not defined for the cell)
            present = [p[spec.source] for p in parts if spec.source in p]
            feats = _joined(present) if present else None
            values[spec.key], note = spec.compute(feats, self.reference.get(spec.source), cell.deterministic)
            if isinstance(spec, M.ReferenceSolutionError) and feats is not None:
                own = float(np.sqrt(np.mean(np.concatenate([p["ref_error_own"] for p in parts]))))
                note = f"the reference solution's own RMS error ≈ {own:.2g} (from its half-step solve)"
            if note:
                notes[spec.key] = note
        return values, notes


def _joined(parts: list):
    """Every rank's part of one feature source as one: arrays concatenated, moments merged."""
    if isinstance(parts[0], M.FeatureMoments):
        total = M.FeatureMoments(parts[0].mean.size)
        for part in parts:
            total.merge(part)
        return total
    return np.concatenate(parts, axis=0)


class CellFeatures:
    """One cell's features on this rank, made batch by batch while it samples, so that memory is bounded by the
    batch and not by ``--num-samples``: an image metric's feature vectors are folded into their running mean and
    covariance (:class:`~bench.metrics.FeatureMoments`), the classifier's hits are one number per sample, and
    the preview keeps the first :data:`PREVIEW_IMAGES` images.  Only what a whole-cell metric needs is kept
    whole: the samples of a model with exact data (low-dimensional points) and, for ``ref_error``, x_T and the
    ODE states that its reference solution is compared with.
    """

    def __init__(self, evaluator: Evaluator, cell: Cell):
        self.evaluator, self.cell = evaluator, cell
        self.moments: dict[str, M.FeatureMoments] = {}
        self.hits: list[np.ndarray] = []
        self.preview: list[np.ndarray] = []
        self.kept: list[tuple] = []
        self.keep_whole = not evaluator.image or (evaluator.solutions is not None and cell.deterministic)

    def add(self, samples: torch.Tensor, x_T: torch.Tensor, latents: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None) -> "CellFeatures":
        """Fold in one batch (samples decoded, for a latent model; its x_T, ODE states and labels); returns self."""
        if self.evaluator.image:
            batch = self.evaluator.image_features(self.cell, samples, labels)
            for source, features in batch.items():
                if source == "preview":
                    if sum(len(p) for p in self.preview) < PREVIEW_IMAGES:
                        self.preview.append(features)
                elif source == "class_accuracy":
                    self.hits.append(features)
                else:
                    self.moments.setdefault(source, M.FeatureMoments(features.shape[1])).add(features)
        if self.keep_whole:
            cpu = (lambda t: None if t is None else t.detach().cpu())
            self.kept.append((cpu(samples), cpu(x_T), cpu(latents), cpu(labels)))
        return self

    def result(self) -> dict:
        """The features :meth:`Evaluator.finalize` takes from this rank."""
        out: dict = dict(self.moments)
        if self.hits:
            out["class_accuracy"] = np.concatenate(self.hits)
        if self.preview:
            out["preview"] = np.concatenate(self.preview)[:PREVIEW_IMAGES]
        if self.kept:
            samples, x_T, latents, labels = (None if parts[0] is None else torch.cat(parts)
                                             for parts in zip(*self.kept))
            out.update(self.evaluator.whole_cell_features(self.cell, samples, x_T, latents, labels))
        return out


@contextlib.contextmanager
def labelled_bars(desc: str) -> Iterator[None]:
    """Give torch-fidelity's feature-extraction progress bar (hard-coded "Processing samples") the description
    ``desc`` while the block runs."""
    import torch_fidelity.utils as fidelity_utils
    plain = fidelity_utils.tqdm

    def labelled(*a, **kw):
        return plain(*a, **{**kw, "desc": desc})

    fidelity_utils.tqdm = labelled
    try:
        yield
    finally:
        fidelity_utils.tqdm = plain


def prepare_references(evaluator: Evaluator, num_samples: int, dist: Dist) -> None:
    """Feature extractors and reference statistics; a failure on any rank is raised on every rank."""
    from .datasets import ReferenceDataError
    from .features import OfflineFeatureExtractorError
    failure = None
    try:
        evaluator.prepare(num_samples)
    except (OfflineFeatureExtractorError, ReferenceDataError) as e:
        failure = e
    # Every rank learns of a failure on any rank (rank 0 alone reads the reference data).
    failures = [f for f in dist.all_gather(None if failure is None else (type(failure).__name__, str(failure)))
                if f is not None]
    if failures:
        if failure is not None:
            raise failure
        kind, text = failures[0]
        raise (OfflineFeatureExtractorError if kind == "OfflineFeatureExtractorError" else ReferenceDataError)(text)


def write_reference(out_dir: Path, evaluator: Evaluator, num_samples: int, command: str) -> None:
    """The reference data of a sweep (metric labels, noise floors and notes, the card; see
    :func:`bench.results.write_reference_info`) and the reference preview."""
    if "preview" in evaluator.reference:
        save_preview(out_dir, "reference", evaluator.reference["preview"], "points")
    info = {"metrics": {k: {"label": M.METRICS[k].label, "floor": evaluator.floors.get(k),
                            "note": evaluator.notes.get(k, "")} for k in evaluator.keys},
            "card": {k: (list(v) if isinstance(v, tuple) else v) for k, v in evaluator.card.summary().items()},
            "num_samples": num_samples, "command": command,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_reference_info(out_dir, info)
