"""Reference data for image metrics, and the cache of reference feature statistics.

* ``mnist-test``: the 10,000 MNIST test images, read directly from the IDX gzip files in
  ``../shared/assets/mnist/`` (torchvision's MNIST class wants the training set too).
* ``cifar10-train``: torch-fidelity's registered input of that name (torchvision downloads CIFAR-10 once);
  offline, :func:`reference_dataset` says so.

Reference statistics (mean and covariance of the features) are cached as ``.npz`` files whose name holds
the dataset, the number of images, the feature extractor and layer, and the versions of torch-fidelity and
of this package — so a change of any of them computes new statistics instead of reusing stale ones.  Cache
writes are atomic.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pretrained.checkpoints import ASSETS, assets_dir, assets_hint

from .features import UInt8Images, extract_features
from .metrics import gaussian_statistics
from .results import atomic_write_bytes

__all__ = ["read_idx_images", "mnist_test_images", "reference_dataset", "reference_statistics",
           "default_cache_dir", "ReferenceDataError", "REFERENCE_DATASETS", "MNIST_DIR"]

MNIST_DIR = ASSETS / "mnist"
REFERENCE_DATASETS = ("mnist-test", "cifar10-train")
# Full sizes, known up front so that cached statistics are found without opening (or downloading) the data.
REFERENCE_SIZES = {"mnist-test": 10_000, "cifar10-train": 50_000}
FLOOR_DRAWS = 10


class ReferenceDataError(RuntimeError):
    """The reference data set is not available (missing asset, no internet for a download)."""


def read_idx_images(path: os.PathLike) -> np.ndarray:
    """Images from an IDX file (gzip or plain): uint8 array (N, rows, cols).

    Raises:
        ValueError: not an IDX image file (magic number 2051) or truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 16:
        raise ValueError(f"{path} is too short to be an IDX image file")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{path}: header says {n}×{rows}×{cols} images but the file holds {len(raw) - 16} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def mnist_test_images(directory: Optional[os.PathLike] = None) -> torch.Tensor:
    """The MNIST test images as uint8 (10000, 3, 28, 28) (grey repeated to three channels).

    ``directory`` defaults to ``mnist/`` in the offline assets folder (:func:`pretrained.checkpoints.assets_dir`,
    read at every call, so ``DIFFUSION_SOLVERS_ASSETS`` set after import is honoured).
    """
    name = "t10k-images-idx3-ubyte.gz"
    path = (assets_dir() / "mnist" if directory is None else Path(directory)) / name
    if not path.exists():
        where = assets_hint(f"mnist/{name}") if directory is None else f"looked for {path}"
        raise ReferenceDataError(f"MNIST test images not found: {where}")
    images = torch.from_numpy(read_idx_images(path).copy())[:, None]
    return images.expand(-1, 3, -1, -1).contiguous()


def reference_dataset(name: str, datasets_root: Optional[os.PathLike] = None) -> torch.utils.data.Dataset:
    """The reference images ``name`` as a Dataset of uint8 (3, H, W) tensors.

    Raises:
        ValueError: unknown name.
        ReferenceDataError: the data cannot be read or downloaded.
    """
    if name == "mnist-test":
        return UInt8Images(mnist_test_images())
    if name == "cifar10-train":
        from torch_fidelity.registry import DATASETS_REGISTRY
        # torch-fidelity's own default location: $TORCH_HOME/fidelity_datasets.
        root = Path(datasets_root or Path(torch.hub.get_dir()).parent / "fidelity_datasets")
        root.mkdir(parents=True, exist_ok=True)
        try:
            return DATASETS_REGISTRY["cifar10-train"](str(root), True)
        except Exception as e:  # torchvision's download: URLError and friends offline
            raise ReferenceDataError(
                f"the CIFAR-10 training set (the FID reference of ddpm_cifar) is not in {root} and could not be "
                f"downloaded ({type(e).__name__}: {e}). Run once where the internet is reachable, or put "
                f"cifar-10-python.tar.gz (extracted: cifar-10-batches-py/) in {root}.") from e
    raise ValueError(f"unknown reference data set {name!r}; valid: {', '.join(REFERENCE_DATASETS)}")


def default_cache_dir() -> Path:
    """Where reference statistics are cached: $BENCH_CACHE_DIR, else ~/.cache/diffusion-solvers/bench."""
    env = os.environ.get("BENCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "diffusion-solvers" / "bench"


def _cache_name(dataset: str, n: int, extractor: str, layer: str) -> str:
    import torch_fidelity

    from . import __version__
    return (f"refstats-{dataset}-n{n}-{extractor}-{layer}-torch_fidelity{torch_fidelity.__version__}"
            f"-bench{__version__}.npz")


def reference_statistics(dataset: str, extractor, layer: str, extractor_name: str, *, device: str = "cpu",
                         size: Optional[int] = None, batch_size: int = 256, cache_dir: Optional[os.PathLike] = None,
                         progress: bool = False, floor_n: Optional[int] = None, floor_seed: int = 0) -> dict:
    """Mean and covariance of the reference features, computed once and cached.

    Args:
        dataset: a name from :data:`REFERENCE_DATASETS`.
        extractor, layer, extractor_name: from :func:`bench.features.create_extractor`.
        size: use the first ``size`` images only (default: all).
        cache_dir: default :func:`default_cache_dir`.
        floor_n: also compute the noise floor: the FD of ``floor_n`` reference images (a random subset,
            fixed by ``floor_seed``) against the statistics of the whole reference, averaged over
            :data:`FLOOR_DRAWS` subsets.
    Returns:
        {"mu", "sigma", "n", "cache_path", "cached", "floor": [mean, standard deviation] or None}.
    """
    from .metrics import frechet_distance

    if dataset not in REFERENCE_SIZES:
        raise ValueError(f"unknown reference data set {dataset!r}; valid: {', '.join(REFERENCE_DATASETS)}")
    ds = None
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    n = REFERENCE_SIZES[dataset] if size is None else int(size)
    if not 2 <= n <= REFERENCE_SIZES[dataset]:
        raise ValueError(f"reference size must be between 2 and {REFERENCE_SIZES[dataset]} for {dataset}, got {n}")
    path = cache_dir / _cache_name(dataset, n, extractor_name, layer)
    floor_key = f"floor_n{floor_n}_seed{floor_seed}_draws{FLOOR_DRAWS}" if floor_n else None
    floors: dict = {}
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
        meta = json.loads(str(stats.pop("meta")))
        floors = dict(meta.get("floors", {}))
        if floor_key is None or floor_key in meta.get("floors", {}):
            return {"mu": stats["mu"], "sigma": stats["sigma"], "n": n, "cache_path": str(path), "cached": True,
                    "floor": meta.get("floors", {}).get(floor_key) if floor_key else None}
    if ds is None:
        ds = reference_dataset(dataset)
    if n > len(ds):
        raise ValueError(f"--reference-size {n} exceeds the {len(ds)} images of {dataset}")
    if n < len(ds):
        ds = torch.utils.data.Subset(ds, list(range(n)))
    feats = extract_features(extractor, layer, ds, device=device, batch_size=batch_size, progress=progress)
    mu, sigma = gaussian_statistics(feats)
    if floor_key:
        # The FD of a finite sample is a noisy number: average FLOOR_DRAWS random subsets.
        rng = np.random.default_rng(floor_seed)
        draws = [frechet_distance(*gaussian_statistics(feats[rng.choice(n, size=min(floor_n, n), replace=False)]),
                                  mu, sigma) for _ in range(FLOOR_DRAWS)]
        floors[floor_key] = [float(np.mean(draws)), float(np.std(draws, ddof=1))]
    meta = {"dataset": dataset, "n": n, "extractor": extractor_name, "layer": layer, "floors": floors}
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buf.getvalue())
    return {"mu": mu, "sigma": sigma, "n": n, "cache_path": str(path), "cached": False,
            "floor": floors.get(floor_key) if floor_key else None}
