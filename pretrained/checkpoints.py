"""Finding, downloading, verifying and reading weight files.

Where a card's weights come from, in this order (:func:`resolve_weights`):

1. an explicit path (``pretrained.load(name, weights=PATH)``, the benchmark's ``--weights``);
2. the card's environment variable (e.g. ``DDPM_MNIST_WEIGHTS=/path/to/ddpm_mnist.pth``);
3. a local default where one exists: a file in the offline assets folder (:func:`assets_dir`:
   ``$DIFFUSION_SOLVERS_ASSETS``, else ``../shared/assets`` beside a source checkout), e.g. ``ddpm_mnist/``;
4. the cache: ``$DIFFUSION_SOLVERS_CACHE`` or ``~/.cache/diffusion-solvers``;
5. a download into the cache — unless offline (``DIFFUSION_SOLVERS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or
   ``download=False``).

A downloaded file goes to a temporary name in the cache folder, is checked (its sha256 or md5 when the card
knows one; its keys and shapes always, by the caller's ``check``), and only then renamed into place, so the
cache never holds a file that did not verify.  Every failure names the file and what is wrong; a missing
file also names the URL and where to put it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .files import atomic_path, default_permissions  # noqa: F401  (default_permissions re-exported)

__all__ = [
    "CheckpointError", "WeightsNotFoundError", "WeightsSource", "HubSource", "cache_dir", "offline",
    "file_digest", "verify_file", "default_permissions", "resolve_weights", "resolve_hub_weights", "find_in_folder", "read_state_dict",
    "check_state_dict", "load_into", "read_network_record", "ASSETS", "ASSETS_ENV", "assets_dir", "assets_origin", "assets_hint",
]

PathLike = Union[str, os.PathLike]
# The offline assets (third-party files never copied into the repository) are looked for in
# $DIFFUSION_SOLVERS_ASSETS, else in ../shared/assets beside a source checkout.  The default means nothing
# after a non-editable install (it would point next to site-packages): there, set the variable.
ASSETS_ENV = "DIFFUSION_SOLVERS_ASSETS"
CHECKOUT_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def assets_dir() -> Path:
    """The offline assets folder: ``$DIFFUSION_SOLVERS_ASSETS``, else ``../shared/assets`` beside the checkout.

    Read at every call (:data:`ASSETS` is the value at import, for module-level defaults).
    """
    env = os.environ.get(ASSETS_ENV)
    return Path(env).expanduser() if env else CHECKOUT_ASSETS


def assets_origin() -> str:
    """Where :func:`assets_dir` comes from, in words for messages."""
    if os.environ.get(ASSETS_ENV):
        return f"set by ${ASSETS_ENV}"
    return f"../shared/assets beside the source checkout, the default while ${ASSETS_ENV} is not set"


def assets_hint(relative: str) -> str:
    """Words for a "not found" message: where ``relative`` (a path inside the assets folder) was looked for,
    where that folder came from, and the environment variable that changes it."""
    folder = assets_dir()
    return (f"looked for {folder / relative} (assets folder {folder}: {assets_origin()}); set {ASSETS_ENV}=FOLDER "
            f"to the folder that holds {Path(relative).parts[0]}/")


ASSETS = assets_dir()


class CheckpointError(ValueError):
    """A weight file is corrupt or does not match the model (checksum, keys, shapes, format)."""


class WeightsNotFoundError(FileNotFoundError):
    """No weight file was found and none could be downloaded; the message says where to put one."""


@dataclass(frozen=True)
class WeightsSource:
    """Where one weight file of a card comes from.

    Attributes:
        filename: the file's name in the cache (and the name a user should give it).
        url: where :func:`resolve_weights` downloads it from (``None``: no known download).
        sha256, md5: checksums from the publisher (``None`` where none is published; never guessed).
        env_var: environment variable that may hold a path to the file.
        local_default: a path used when it exists.
        asset: a path inside the offline assets folder (:func:`assets_dir`, resolved at every lookup), used
            when it exists, e.g. ``"ddpm_mnist/ddpm_mnist.pth"``.
        description: a few words for error messages ("the ddpm_mnist checkpoint").
        folder_names: file names looked for when an explicit path is a folder (besides ``filename``).
    """

    filename: str
    url: Optional[str] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None
    env_var: Optional[str] = None
    local_default: Optional[Path] = None
    asset: Optional[str] = None
    description: str = "the weights"
    folder_names: tuple = ()

    def local_paths(self) -> list[Path]:
        """The local defaults looked at, in order (``local_default``, then the asset's current path)."""
        paths = [Path(self.local_default)] if self.local_default is not None else []
        return paths + ([assets_dir() / self.asset] if self.asset else [])


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face hub repository, tried under several candidate names.

    Attributes:
        repo_id: e.g. ``"google/ddpm-cifar10-32"``.
        candidates: paths inside the repository, tried in order (the first that exists is used).
        revision: a branch, tag or commit (``"main"`` unless pinned).
        extra_files: further files fetched from the same folder as the chosen candidate when present
            (e.g. ``config.json``).
        env_var, description: as in :class:`WeightsSource`.
    """

    repo_id: str
    candidates: tuple
    revision: str = "main"
    extra_files: tuple = ()
    env_var: Optional[str] = None
    description: str = "the weights"

    def url(self, path: str) -> str:
        """The download URL of ``path`` in this repository."""
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{path}"


def cache_dir(override: Optional[PathLike] = None) -> Path:
    """The weight cache: ``override``, else ``$DIFFUSION_SOLVERS_CACHE``, else ``~/.cache/diffusion-solvers``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("DIFFUSION_SOLVERS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "diffusion-solvers"


def offline() -> bool:
    """True when downloads are switched off by ``DIFFUSION_SOLVERS_OFFLINE`` or ``HF_HUB_OFFLINE``."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("DIFFUSION_SOLVERS_OFFLINE", "HF_HUB_OFFLINE"))


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: PathLike, *, sha256: Optional[str] = None, md5: Optional[str] = None,
                what: str = "the weights") -> None:
    """Check a file against the published checksums (those that are known).

    Raises:
        CheckpointError: a checksum differs (the message names the file, the expected and the actual digest).
    """
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual.lower() != expected.lower():
            raise CheckpointError(
                f"{path}: {algorithm} is {actual}, but {what} should have {algorithm} {expected}. The file is "
                "corrupt, truncated or a different checkpoint; delete it and download it again, or pass "
                "verify=False to load a different checkpoint of the same architecture.")


def _explicit_path(path: PathLike, origin: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(f"{origin} points to {p}, which does not exist; give the path of an existing "
                                   "weights file (bench.run: --weights PATH)")
    return p


def _download_url(url: str, destination: Path) -> None:
    """Stream ``url`` to ``destination`` (raises on any network or HTTP error)."""
    request = urllib.request.Request(url, headers={"User-Agent": "diffusion-solvers"})
    with urllib.request.urlopen(request, timeout=60) as response, open(destination, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


def _missing_message(source: WeightsSource, target: Path, reason: str) -> str:
    looked = ([f"${source.env_var} (not set)"] if source.env_var else []) + [str(p) for p in source.local_paths()]
    looked.append(f"{target} (the cache)")
    where = ["pass weights=PATH (bench.run: --weights PATH)"]
    if source.env_var:
        where.append(f"set {source.env_var}=PATH")
    if source.asset:
        where.append(f"set {ASSETS_ENV}=FOLDER to a folder holding {source.asset} (the assets folder now is "
                     f"{assets_dir()}: {assets_origin()})")
    where.append(f"or put the file at {target}")
    url = f"from {source.url}" if source.url else "(no download URL is known)"
    return (f"{source.description} ({source.filename}) is not available: {reason}. Looked at: {', '.join(looked)}. "
            f"Download it {url} and " + ", ".join(where) + ".")


def resolve_weights(source: WeightsSource, weights: Optional[PathLike] = None, *,
                    cache: Optional[PathLike] = None, download: Optional[bool] = None, verify: bool = True,
                    check: Optional[Callable[[Path], None]] = None) -> Path:
    """The path of a card's weight file, downloading it into the cache if needed (see the module docstring).

    Args:
        source: where the file comes from.
        weights: an explicit path (wins over everything else).
        cache: the cache folder (default :func:`cache_dir`).
        download: allow a download (default: unless :func:`offline`).
        verify: check the published checksums (explicit paths too: a different file fails unless False).
        check: ``check(path)`` raising :class:`CheckpointError` if the file does not fit the model (keys,
            shapes); run on a download before it enters the cache.

    Returns:
        The path of a verified file.

    Raises:
        WeightsNotFoundError: nothing found and no download possible (names the file, URL and destination).
        CheckpointError: a file was found but does not verify.
    """
    sums = dict(sha256=source.sha256, md5=source.md5) if verify else {}
    path = _given_or_local(source, weights)
    if path is not None:
        if path.is_dir():
            path = find_in_folder(path, (source.filename,) + tuple(source.folder_names))
        verify_file(path, what=source.description, **sums)
        return path

    target = cache_dir(cache) / source.filename
    if target.exists():
        verify_file(target, what=f"{source.description} (cached)", **sums)
        return target
    allow = (not offline()) if download is None else bool(download)
    if not allow:
        raise WeightsNotFoundError(_missing_message(source, target, "downloads are switched off (offline)"))
    if source.url is None:
        raise WeightsNotFoundError(_missing_message(source, target, "it is not in the cache"))
    _download_verified(source, target, check)
    return target


def _given_or_local(source: WeightsSource, weights: Optional[PathLike]) -> Optional[Path]:
    """The first of: the explicit path, the card's environment variable, an existing local default (a file or
    a folder); ``None`` when there is none.  An explicit path or variable that does not exist raises."""
    if weights is not None:
        return _explicit_path(weights, "weights=")
    if source.env_var and os.environ.get(source.env_var):
        return _explicit_path(os.environ[source.env_var], f"${source.env_var}")
    return next((p for p in source.local_paths() if p.exists()), None)


def _download_verified(source: WeightsSource, target: Path, check: Optional[Callable[[Path], None]]) -> None:
    """Download ``source.url`` to a temporary name beside ``target``, verify it (published checksums, then
    ``check``) and only then rename it to ``target``; on any failure nothing is left behind."""
    with atomic_path(target, suffix=".part") as tmp:
        try:
            _download_url(source.url, tmp)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise WeightsNotFoundError(_missing_message(source, target, f"the download failed ({e})")) from e
        # Verify before the file gets its cache name: a failed check leaves nothing behind.
        verify_file(tmp, what=f"{source.description} downloaded from {source.url}",
                    sha256=source.sha256, md5=source.md5)
        if check is not None:
            check(tmp)


def resolve_hub_weights(source: HubSource, weights: Optional[PathLike] = None, *,
                        cache: Optional[PathLike] = None, download: Optional[bool] = None,
                        check: Optional[Callable[[Path], None]] = None) -> Path:
    """A weight file from a hub repository: explicit path (file or folder) → env var → cache → download.

    A folder (a ``save_pretrained`` folder or a hub snapshot) is searched for the candidate names.  The
    download uses ``huggingface_hub`` (an optional extra) into a temporary folder; the file (and its extra
    files) are checked with ``check`` before they are moved into the cache.

    Returns:
        The path of the weight file (its extra files, where there are any, lie next to it).
    """
    explicit = weights if weights is not None else (os.environ.get(source.env_var) if source.env_var else None)
    if explicit:
        origin = "weights=" if weights is not None else f"${source.env_var}"
        path = _explicit_path(explicit, origin)
        return find_in_folder(path, source.candidates) if path.is_dir() else path

    folder = cache_dir(cache) / "hub" / source.repo_id.replace("/", "--") / source.revision
    if folder.exists():
        try:
            return find_in_folder(folder, source.candidates)
        except WeightsNotFoundError:
            pass
    allow = (not offline()) if download is None else bool(download)
    names = ", ".join(source.candidates)
    where = (f"pass weights=PATH (bench.run: --weights PATH; a file or a folder holding one of: {names})"
             + (f", set {source.env_var}=PATH" if source.env_var else "") + f", or put it under {folder}")
    if not allow:
        raise WeightsNotFoundError(
            f"{source.description} ({source.repo_id}) is not available: downloads are switched off (offline). "
            f"Download {source.url(source.candidates[0])} and {where}.")
    hub = _import_hub(source, where)
    return folder / _download_hub_folder(hub, source, folder, where, check)


def _import_hub(source: HubSource, where: str):
    """The ``huggingface_hub`` module; its absence raises WeightsNotFoundError saying how to install it or
    ``where`` to put the file instead."""
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsNotFoundError(
            f"{source.description} ({source.repo_id}) is not in the cache and downloading it needs the optional "
            f"package huggingface_hub: pip install 'diffusion-solvers[hub]' — or download "
            f"{source.url(source.candidates[0])} yourself and {where}.") from None
    return huggingface_hub


def _download_hub_folder(hub, source: HubSource, folder: Path, where: str,
                         check: Optional[Callable[[Path], None]]) -> str:
    """Download the first available candidate and its extra files into a staging folder beside ``folder``,
    ``check`` the weight file, then move the staging folder to ``folder`` (replacing it); on any failure the
    staging folder is removed.  Returns the chosen candidate (a path inside ``folder``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.revision}.", dir=folder.parent))
    try:
        chosen = _download_first_candidate(hub, source, staging, where)
        parent = str(Path(chosen).parent)
        for extra in source.extra_files:
            name = extra if parent == "." else f"{parent}/{extra}"
            try:
                hub.hf_hub_download(source.repo_id, name, revision=source.revision, local_dir=staging)
            except Exception:
                pass  # optional companions (e.g. config.json): the loader says if it needs one
        for meta in staging.glob(".cache"):
            shutil.rmtree(meta, ignore_errors=True)
        if check is not None:
            check(staging / chosen)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return chosen


def _download_first_candidate(hub, source: HubSource, staging: Path, where: str) -> str:
    """Try the candidate names in order into ``staging``; the first that downloads is returned.

    Raises:
        WeightsNotFoundError: none could be downloaded (each candidate's error listed).
    """
    errors = []
    for candidate in source.candidates:
        try:
            hub.hf_hub_download(source.repo_id, candidate, revision=source.revision, local_dir=staging)
            return candidate
        except Exception as e:  # the hub's own error types vary between versions
            errors.append(f"{candidate}: {type(e).__name__}: {e}")
    raise WeightsNotFoundError(
        f"{source.description} could not be downloaded from {source.repo_id} "
        f"({'; '.join(errors)}). Download it yourself and {where}.")


def find_in_folder(folder: Path, candidates: Sequence[str]) -> Path:
    """The first of ``candidates`` (relative paths, or their base names) that exists under ``folder``."""
    for candidate in candidates:
        for path in (folder / candidate, folder / Path(candidate).name):
            if path.is_file():
                return path
    raise WeightsNotFoundError(f"{folder} holds none of the expected weight files: {', '.join(candidates)}")


def read_state_dict(path: PathLike, *, what: str = "the weights") -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file or a torch file (loaded with ``weights_only=True``).

    Raises:
        CheckpointError: the file cannot be read or does not hold a dict of tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as e:
        raise CheckpointError(f"{path}: reading .safetensors files needs the package safetensors "
                              "(pip install 'diffusion-solvers[hub]')") from e
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot read {what} ({type(e).__name__}: {e}). The file is corrupt, "
                              "truncated or not a weights-only checkpoint.") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict) for {what}, got "
                              f"{type(sd).__name__}")
    return dict(sd)


def read_network_record(path: PathLike, *, fmt: str, what: str, rebuild: str,
                        build: Callable[[dict], torch.nn.Module]) -> tuple[torch.nn.Module, dict]:
    """A network from a weight record written by one of this project's training scripts: a dict with
    ``format`` (= ``fmt``), ``arch`` (the constructor arguments), ``state_dict`` and whatever the script adds;
    read weights-only.  ``build(record)`` makes the network from the record.

    Returns:
        (network in eval mode with the weights loaded, the record).

    Raises:
        CheckpointError: unreadable, another format, a bad architecture record, missing/unexpected keys or
            shapes — naming the file, ``what`` and the script that writes such files (``rebuild``).
    """
    path = Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {fmt} weight file (written by {rebuild})")
    try:
        net = build(record)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad architecture record ({e})") from e
    expected = {k: v.shape for k, v in net.state_dict().items()}
    state = record.get("state_dict")
    check_state_dict(state if isinstance(state, Mapping) else {}, expected, path=path, what=what)
    net.load_state_dict(state, strict=True)
    return net.eval(), record


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                     *, path: PathLike, what: str = "the weights") -> None:
    """Compare a state dict with the expected names and shapes.

    Raises:
        CheckpointError: names the file and lists the missing keys, the unexpected keys and the shape
            mismatches (a few of each, with their counts).
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(expected[k])} expected"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = "; ".join(items[:5]) + (f"; … ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{path} does not match {what}: " + " | ".join(problems))


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, path: PathLike,
              what: str = "the weights") -> torch.nn.Module:
    """Check ``state_dict`` against ``module`` (:func:`check_state_dict`) and load it strictly."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(state_dict, expected, path=path, what=what)
    module.load_state_dict(state_dict, strict=True)
    return module
