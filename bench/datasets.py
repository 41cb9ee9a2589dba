"""Reference data for image metrics, and the cache of reference feature statistics.

* ``mnist-test``: the 10,000 MNIST test images, read directly from the IDX gzip files in
  ``../shared/assets/mnist/`` (torchvision's MNIST class wants the training set too).
* ``mnist-heldout``: the 2,000 of them held out from the training of the project's MNIST models and
  classifier (every fifth test image; :mod:`pretrained.mnist_data`).
* ``cifar10-train``: torch-fidelity's registered input of that name (torchvision downloads CIFAR-10 once);
  offline, :func:`reference_dataset` says so.
* your own data (``--reference``): a folder of at least 2 images (PNG, JPEG, BMP, WebP; all one size), whose
  statistics are cached under a hash of the files' contents, or an ``.npz`` of precomputed statistics (arrays
  ``mu`` and ``sigma``, e.g. from pytorch-fid or torch-fidelity, made with the same feature extractor; read
  without pickle and checked by :func:`check_statistics` before anything is sampled).

Reference statistics (mean and covariance of the features) are cached as ``.npz`` files whose name holds
the dataset, the number of images, the feature extractor and layer, and the versions of torch-fidelity and
of this package — so a change of any of them computes new statistics instead of reusing stale ones.  Cache
writes are atomic; a cache file is used only when it passes :func:`check_statistics` and matches the sha256
of its arrays stored with them, else it is computed again and rewritten (one line on stderr says so).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import struct
import sys
import warnings
import zipfile
import zlib
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
           "folder_digest", "check_reference", "check_statistics", "read_statistics", "IMAGE_SUFFIXES"]

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
    """Refuse a reference that is neither a known data set, a folder of at least 2 images, nor a statistics
    ``.npz`` that passes :func:`read_statistics` (its dimension is checked later, against the feature extractor).

    Raises:
        ValueError: one line naming what was given, what is wrong and what would be right.
    """
    if reference in REFERENCE_SIZES:
        return
    path = Path(reference)
    if path.is_dir():
        count = len(_image_files(path))
        if count < 2:
            raise ValueError(f"reference folder {path} holds {count or 'no'} image{'' if count == 1 else 's'}; the "
                             f"Fréchet distance needs at least 2 ({', '.join(IMAGE_SUFFIXES)}), and is steadier "
                             "with thousands")
        return
    if path.suffix == ".npz" and path.is_file():
        try:
            read_statistics(path)
        except ReferenceDataError as e:
            raise ValueError(str(e)) from None
        return
    raise ValueError(f"reference {reference!r} is not a data set ({', '.join(REFERENCE_DATASETS)}), an image folder "
                     "or a statistics .npz file (arrays mu and sigma)")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_images(folder: os.PathLike) -> torch.Tensor:
    """Every image under ``folder`` (sorted by path) as uint8 (N, 3, H, W); grey and RGBA become RGB.

    Raises:
        ReferenceDataError: no images, an unreadable file, an image beyond PIL's decompression-bomb limit
            (``PIL.Image.MAX_IMAGE_PIXELS``; PIL itself only warns up to twice that), or images of different sizes.
    """
    from PIL import Image
    files = _image_files(Path(folder))
    if not files:
        raise ReferenceDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    arrays = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ReferenceDataError(_bomb_message(f, e, Image.MAX_IMAGE_PIXELS)) from None
        except OSError as e:
            raise ReferenceDataError(f"cannot read the reference image {f} ({e})") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ReferenceDataError(f"reference images differ in size: {files[0].name} is {arrays[0].shape[1]}×"
                                     f"{arrays[0].shape[0]}, {f.name} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _bomb_message(path: Path, error: Exception, limit: int) -> str:
    found = re.search(r"\((\d+) pixels\)", str(error))  # PIL: "Image size (N pixels) exceeds limit of …"
    size = f"has {int(found.group(1)):,} pixels," if found else "is"
    return (f"the reference image {path} {size} more than PIL's limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, "
            "a guard against decompression bombs); reference images are the size of the samples: remove or shrink "
            "it")


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

    A statistics ``.npz`` and a cached file are checked with :func:`check_statistics` (a cache file also against
    the digest of its arrays) before use; a cache file that fails is computed again and rewritten, saying so.

    Args:
        dataset: a name from :data:`REFERENCE_DATASETS`, an image folder or a statistics ``.npz``.
        extractor, layer, extractor_name: from :func:`bench.features.create_extractor`.
        size: use the first ``size`` images only (default: all).
        cache_dir: default :func:`default_cache_dir`.
        floor_n: also compute the noise floor: the FD of ``floor_n`` reference images (a random subset,
            fixed by ``floor_seed``) against the statistics of the whole reference, averaged over
            :data:`FLOOR_DRAWS` subsets.
    Returns:
        {"mu", "sigma", "n", "cache_path", "cached", "floor": [mean, standard deviation] or None}.

    Raises:
        ReferenceDataError: the reference is missing, unreadable or malformed, or its statistics are not
            those of ``extractor_name``'s features.
    """
    made_by = f"{extractor_name} (layer {layer})"
    if dataset.endswith(".npz") and Path(dataset).is_file():
        mu, sigma, n = read_statistics(Path(dataset), _feature_dim(layer), made_by)
        return {"mu": mu, "sigma": sigma, "n": n, "cache_path": dataset, "cached": True, "floor": None}
    try:
        check_reference(dataset)
    except ValueError as e:
        raise ReferenceDataError(str(e)) from None
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = Path(dataset).is_dir()
    total = len(_image_files(Path(dataset))) if folder else REFERENCE_SIZES[dataset]
    n = total if size is None else int(size)
    if not 2 <= n <= total:
        raise ReferenceDataError(f"reference size must be between 2 and {total} for {dataset}, got {n}")
    tag = f"folder{folder_digest(dataset)[:24]}" if folder else dataset
    path = cache_dir / _cache_name(tag, n, extractor_name, layer)
    floor_key = f"floor_n{floor_n}_seed{floor_seed}_draws{FLOOR_DRAWS}" if floor_n else None
    cached = _read_cache(path, _feature_dim(layer), made_by)
    floors = dict(cached[2].get("floors", {})) if cached else {}
    if cached and (floor_key is None or floor_key in floors):
        return {"mu": cached[0], "sigma": cached[1], "n": n, "cache_path": str(path), "cached": True,
                "floor": floors.get(floor_key) if floor_key else None}
    feats = _reference_features(dataset, n, extractor, layer, device, batch_size, progress)
    mu, sigma = gaussian_statistics(feats)
    if floor_key:
        floors[floor_key] = _noise_floor(feats, mu, sigma, floor_n, floor_seed)
    meta = {"dataset": dataset, "n": n, "extractor": extractor_name, "layer": layer, "floors": floors,
            "digest": _statistics_digest(mu, sigma)}
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buf.getvalue())
    return {"mu": mu, "sigma": sigma, "n": n, "cache_path": str(path), "cached": False,
            "floor": floors.get(floor_key) if floor_key else None}


def _reference_features(dataset: str, n: int, extractor, layer: str, device: str, batch_size: int,
                        progress: bool) -> np.ndarray:
    """The features (n, d) of the first ``n`` images of ``dataset``."""
    ds = reference_dataset(dataset)
    if n > len(ds):
        raise ReferenceDataError(f"--reference-size {n} exceeds the {len(ds)} images of {dataset}")
    if n < len(ds):
        ds = torch.utils.data.Subset(ds, list(range(n)))
    return extract_features(extractor, layer, ds, device=device, batch_size=batch_size, progress=progress)


def _noise_floor(feats: np.ndarray, mu: np.ndarray, sigma: np.ndarray, floor_n: int, seed: int) -> list[float]:
    """[mean, sd] of the FD of FLOOR_DRAWS random subsets of ``floor_n`` reference features against all of them
    (the FD of a finite sample is a noisy number)."""
    from .metrics import frechet_distance
    rng = np.random.default_rng(seed)
    n = len(feats)
    draws = [frechet_distance(*gaussian_statistics(feats[rng.choice(n, size=min(floor_n, n), replace=False)]),
                              mu, sigma) for _ in range(FLOOR_DRAWS)]
    return [float(np.mean(draws)), float(np.std(draws, ddof=1))]


def _feature_dim(layer: str) -> Optional[int]:
    # torch-fidelity names a feature layer by its width ("2048", "64", "128"); a named layer has no known width.
    return int(layer) if layer.isdigit() else None


def _statistics_digest(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 of the float64 bytes of ``mu`` and ``sigma`` (C order)."""
    h = hashlib.sha256()
    for a in (mu, sigma):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()


def _read_cache(path: Path, dim: Optional[int], made_by: str) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
    """(mu, sigma, meta) of a cache file that passes :func:`check_statistics` and its stored digest; None when
    there is no such file, or (with one line on stderr) when it fails and must be computed again."""
    if not path.exists():
        return None
    try:
        arrays = _load_npz(path, ("mu", "sigma", "meta"), "a cache file of reference statistics")
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError as e:
            raise ReferenceDataError(f"{path}: its meta is not JSON ({e})") from None
        mu, sigma = check_statistics(arrays["mu"], arrays["sigma"], str(path), dim, made_by)
        stored = meta.get("digest") if isinstance(meta, dict) else None
        if stored != _statistics_digest(mu, sigma):
            state = "missing (an older cache file)" if stored is None else "not the one stored with them"
            raise ReferenceDataError(f"{path}: the digest of its arrays is {state}")
    except ReferenceDataError as e:
        print(f"bench: the cached reference statistics are unusable: {e}; computing them again (the cache file "
              "is rewritten)", file=sys.stderr)
        return None
    return mu, sigma, meta


def _load_npz(path: Path, names: tuple, what: str, optional: tuple = ()) -> dict:
    """The arrays ``names`` (and those of ``optional`` present) of an ``.npz``, read without pickle.

    Raises:
        ReferenceDataError: not an ``.npz``, a pickled (object) array, or a missing array; naming ``path``.
    """
    try:
        if not zipfile.is_zipfile(path):  # np.load would take other bytes for a pickle or an .npy
            raise ReferenceDataError(f"{path}: not a statistics .npz (a zip archive of arrays "
                                     f"{' and '.join(names)}, as np.savez writes)")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise ReferenceDataError(f"{path}: no array {' or '.join(missing)} (it holds: "
                                         f"{', '.join(z.files) or 'nothing'}); {what} has arrays {' and '.join(names)}")
            return {k: z[k] for k in names + tuple(k for k in optional if k in z.files)}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ReferenceDataError(f"{path}: holds pickled (object) arrays; pickled arrays are refused (nothing "
                                     "was unpickled): save plain numeric arrays, np.savez(path, mu=mu, sigma=sigma)") \
                from None
        raise ReferenceDataError(f"{path}: not a statistics .npz with arrays {' and '.join(names)} ({e})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ReferenceDataError(f"{path}: not a statistics .npz with arrays {' and '.join(names)} "
                                 f"({type(e).__name__}: {e})") from None


def read_statistics(path: os.PathLike, dim: Optional[int] = None,
                    made_by: str = "the feature extractor") -> tuple[np.ndarray, np.ndarray, int]:
    """Precomputed reference statistics from an ``.npz`` (arrays ``mu``, ``sigma``; optional ``n``, the number of
    images), read without pickle and checked with :func:`check_statistics`.

    Returns:
        (mu, sigma) in float64 and n (0 when the file does not say).

    Raises:
        ReferenceDataError: one line naming the file, what is wrong and what would be right.
    """
    path = Path(path)
    arrays = _load_npz(path, ("mu", "sigma"), "a statistics file", optional=("n",))
    n = arrays.get("n", np.array(0))
    if n.shape != () or n.dtype.kind not in "iu" or int(n) < 0:
        raise ReferenceDataError(f"{path}: n (the number of images) is {n!r}; it is a non-negative integer or absent")
    mu, sigma = check_statistics(arrays["mu"], arrays["sigma"], str(path), dim, made_by)
    return mu, sigma, int(n)


def check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str, dim: Optional[int] = None,
                     made_by: str = "the feature extractor") -> tuple[np.ndarray, np.ndarray]:
    """Check Gaussian feature statistics: real, finite, shapes (d,) and (d, d) with d = ``dim`` where given,
    ``sigma`` symmetric and positive semi-definite within a round-off tolerance.

    The tolerance is relative to the largest entry (symmetry) and eigenvalue (definiteness):
    max(1e-6, 10·d·ε of the stored float type).

    Returns:
        (mu, sigma) as float64.

    Raises:
        ReferenceDataError: ``"{source}: what is wrong; what would be right"``.
    """
    def refuse(text: str):
        raise ReferenceDataError(f"{source}: {text}")

    for name, a in (("mu", mu), ("sigma", sigma)):
        if a.dtype.kind not in "fiu":
            refuse(f"{name} holds {a.dtype} values; statistics are real numbers")
    if mu.ndim != 1 or mu.size == 0 or sigma.shape != (mu.size, mu.size):
        refuse(f"mu has shape {mu.shape} and sigma has shape {sigma.shape}; statistics are mu (d,) and sigma (d, d) "
               "for the same d ≥ 1")
    for name, a in (("mu", mu), ("sigma", sigma)):
        bad = int(np.size(a) - np.isfinite(a).sum())
        if bad:
            refuse(f"{name} holds {bad} NaN or infinite value{'' if bad == 1 else 's'}; statistics are finite "
                   "(compute them again from finite features)")
    d = mu.size
    if dim is not None and d != dim:
        refuse(f"the statistics are {d}-dimensional but {made_by} gives {dim}-dimensional features; use statistics "
               f"of that extractor's features (or the metric whose extractor made them)")
    eps = np.finfo(sigma.dtype if sigma.dtype.kind == "f" else np.float64).eps
    tol = max(1e-6, 10 * d * float(eps))
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    scale = float(np.abs(sigma).max())
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > tol * scale:
        refuse(f"sigma is not symmetric (largest |sigma - sigma.T| = {asym:.3g}, {asym / scale:.2g} of its largest "
               f"entry; tolerance {tol:.1g}); a covariance is symmetric")
    eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eig[0] < -tol * max(float(np.abs(eig).max()), np.finfo(np.float64).tiny):
        refuse(f"sigma has a negative eigenvalue ({eig[0]:.3g}; the largest is {eig[-1]:.3g}, tolerance "
               f"{tol:.1g} of it); a covariance is positive semi-definite")
    return mu, sigma
