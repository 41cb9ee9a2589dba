"""Reference data for image metrics, and the cache of reference feature statistics.

* ``mnist-test``: the 10,000 MNIST test images, read directly from the IDX gzip files in
  ``../shared/assets/mnist/`` (torchvision's MNIST class wants the training set too).
* ``mnist-heldout``: the 2,000 of them held out from the training of the project's MNIST models and
  classifier (every fifth test image; :mod:`pretrained.mnist_data`).
* ``cifar10-train``: torch-fidelity's registered input of that name (torchvision downloads CIFAR-10 once);
  offline, :func:`reference_dataset` says so.
* your own data (``--reference``): a folder of images (PNG, JPEG, BMP, WebP; all one size), whose statistics
  are cached under a hash of the files' contents, or an ``.npz`` of precomputed statistics (arrays ``mu`` and
  ``sigma``, e.g. from pytorch-fid or torch-fidelity, made with the same feature extractor; read without pickle).

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
from pretrained.mnist_data import split_indices

from .features import UInt8Images, extract_features
from .metrics import gaussian_statistics
from .results import atomic_write_bytes

__all__ = ["read_idx_images", "read_idx_labels", "mnist_test_images", "mnist_heldout_images", "reference_dataset", "reference_statistics",
           "default_cache_dir", "ReferenceDataError", "REFERENCE_DATASETS", "MNIST_DIR", "folder_images",
           "folder_digest", "check_reference", "IMAGE_SUFFIXES"]

MNIST_DIR = ASSETS / "mnist"
REFERENCE_DATASETS = ("mnist-test", "mnist-heldout", "cifar10-train")
# Full sizes, known up front so that cached statistics are found without opening (or downloading) the data.
REFERENCE_SIZES = {"mnist-test": 10_000, "mnist-heldout": 2_000, "cifar10-train": 50_000}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FLOOR_DRAWS = 10


class ReferenceDataError(RuntimeError):
    """The reference data set is not available (missing asset, no internet for a download)."""


def _read_idx(path: os.PathLike, magic: int, what: str, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzip or plain) whose magic number is ``magic`` and header holds
    ``dims`` sizes.

    Raises:
        ValueError: another magic number, or a file shorter or longer than its header says.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    head = 4 + 4 * dims
    if len(raw) < head:
        raise ValueError(f"{path} is too short to be an IDX {what} file")
    found, *shape = struct.unpack(">I" + "I" * dims, raw[:head])
    if found != magic:
        raise ValueError(f"{path} is not an IDX {what} file (magic {found}, expected {magic})")
    if len(raw) != head + int(np.prod(shape)):
        sizes = "×".join(map(str, shape))
        raise ValueError(f"{path}: header says {sizes} {what}s but the file holds {len(raw) - head} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def read_idx_images(path: os.PathLike) -> np.ndarray:
    """Images from an IDX file (gzip or plain): uint8 array (N, rows, cols).

    Raises:
        ValueError: not an IDX image file (magic number 2051) or truncated.
    """
    return _read_idx(path, 2051, "image", 3)


def read_idx_labels(path: os.PathLike) -> np.ndarray:
    """Labels from an IDX label file (gzip or plain): uint8 array (N,).

    Raises:
        ValueError: not an IDX label file (magic number 2049) or truncated.
    """
    return _read_idx(path, 2049, "label", 1)


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


def mnist_heldout_images(directory: Optional[os.PathLike] = None) -> torch.Tensor:
    """The 2,000 held-out MNIST test images (:func:`pretrained.mnist_data.split_indices`: every fifth image)
    as uint8 (2000, 3, 28, 28): the reference of ``fd_mnist`` and of the project's own MNIST models, which
    never saw them in training."""
    return mnist_test_images(directory)[torch.from_numpy(split_indices()[1])]


def check_reference(reference: str) -> None:
    """Refuse a reference that is neither a known data set nor an existing image folder or ``.npz`` file.

    Raises:
        ValueError: naming what was given and what would be right.
    """
    if reference in REFERENCE_SIZES:
        return
    path = Path(reference)
    if path.is_dir():
        if not _image_files(path):
            raise ValueError(f"reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return
    if path.suffix == ".npz" and path.is_file():
        return
    raise ValueError(f"reference {reference!r} is not a data set ({', '.join(REFERENCE_DATASETS)}), an image folder "
                     "or a statistics .npz file (arrays mu and sigma)")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_images(folder: os.PathLike) -> torch.Tensor:
    """Every image under ``folder`` (sorted by path) as uint8 (N, 3, H, W); grey and RGBA become RGB.

    Raises:
        ReferenceDataError: no images, an unreadable file, or images of different sizes.
    """
    from PIL import Image
    files = _image_files(Path(folder))
    if not files:
        raise ReferenceDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ReferenceDataError(f"cannot read the reference image {f} ({e})") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ReferenceDataError(f"reference images differ in size: {files[0].name} is {arrays[0].shape[1]}×"
                                     f"{arrays[0].shape[0]}, {f.name} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def folder_digest(folder: os.PathLike) -> str:
    """sha256 over the image files of ``folder``: their relative paths and contents, in sorted order."""
    import hashlib
    h = hashlib.sha256()
    for f in _image_files(Path(folder)):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def reference_dataset(name: str, datasets_root: Optional[os.PathLike] = None) -> torch.utils.data.Dataset:
    """The reference images ``name`` (a data set name or an image folder) as a Dataset of uint8 (3, H, W).

    Raises:
        ValueError: unknown name.
        ReferenceDataError: the data cannot be read or downloaded.
    """
    if Path(name).is_dir():
        return UInt8Images(folder_images(name))
    if name == "mnist-test":
        return UInt8Images(mnist_test_images())
    if name == "mnist-heldout":
        return UInt8Images(mnist_heldout_images())
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

    check_reference(dataset)
    if dataset.endswith(".npz") and Path(dataset).is_file():
        return _given_statistics(Path(dataset))
    ds = None
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = Path(dataset).is_dir()
    total = len(_image_files(Path(dataset))) if folder else REFERENCE_SIZES[dataset]
    n = total if size is None else int(size)
    if not 2 <= n <= total:
        raise ValueError(f"reference size must be between 2 and {total} for {dataset}, got {n}")
    tag = f"folder{folder_digest(dataset)[:24]}" if folder else dataset
    path = cache_dir / _cache_name(tag, n, extractor_name, layer)
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


def _given_statistics(path: Path) -> dict:
    """Precomputed reference statistics from an ``.npz`` (arrays ``mu``, ``sigma``; optional ``n``), read
    without pickle; no noise floor (the images are not at hand)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            n = int(z["n"]) if "n" in z.files else 0
    except (OSError, ValueError, KeyError) as e:
        raise ReferenceDataError(f"{path}: not a statistics file with arrays mu and sigma ({type(e).__name__}: "
                                 f"{e}); pickled arrays are refused") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ReferenceDataError(f"{path}: mu must be (d,) and sigma (d, d); got {mu.shape} and {sigma.shape}")
    return {"mu": mu, "sigma": sigma, "n": n, "cache_path": str(path), "cached": True, "floor": None}
