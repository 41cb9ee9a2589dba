"""Image feature extractors for Fréchet distances, used through torch-fidelity.

* ``inception-v3-compat`` — torch-fidelity's own Inception-v3 (FID).  Its weights are downloaded once from
  GitHub; where that fails (no internet, as on the build machines) :func:`create_extractor` says so and
  names the offline alternative.
* ``resnet20-cifar10`` — a CIFAR-10 ResNet-20 (He et al. 2016, "option A"; weights from ``resnet20_cifar/``
  in the offline assets folder, ``$DIFFUSION_SOLVERS_ASSETS`` or ``../shared/assets``), re-implemented here
  from that folder's README and registered with torch-fidelity as a feature extractor.  Feature ``"64"`` is
  the global-average-pooled 64-d vector.
  Input convention: uint8 RGB → [0, 1] → (28×28 MNIST-sized images are zero-padded by 2 pixels on each side
  to 32×32 — black, like MNIST's background; other sizes are resized bilinearly to 32×32) → normalised
  with the ImageNet mean/std the network was trained with.  Grey images arrive with the channel repeated
  three times (see :func:`to_uint8_rgb`).  Its numbers are "FD (ResNet-20)", never "FID".
* ``mnist-classifier`` — the project's own MNIST CNN (:mod:`pretrained.mnist_classifier`, committed weights,
  sha256-checked), registered the same way.  Feature ``"128"`` is its penultimate layer, ``"logits"`` its
  10 class scores.  Input: uint8 28×28 images, the mean of the three channels (grey images arrive with the
  channel repeated) over 255.  Its numbers are "FD (MNIST classifier)", never "FID".
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained.checkpoints import ASSETS, CheckpointError, assets_dir, assets_hint, file_digest, \
    read_state_dict
from pretrained.files import atomic_path
from pretrained.mnist_classifier import load_mnist_classifier

__all__ = ["ResNet20", "FeatureExtractorResNet20", "FeatureExtractorMnistClassifier", "register", "create_extractor", "extract_features",
           "to_uint8_rgb", "UInt8Images", "OfflineFeatureExtractorError", "FeatureWeightsError", "EXTRACTORS",
           "RESNET20_WEIGHTS", "RESNET20_SHA256", "INCEPTION_FILENAME", "INCEPTION_SHA256"]

RESNET20_WEIGHTS = ASSETS / "resnet20_cifar" / "resnet20-12fca82f.th"  # at import; load_resnet20 looks again
RESNET20_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"

# metric key → (torch-fidelity extractor name, feature layer)
EXTRACTORS = {"fid": ("inception-v3-compat", "2048"), "fd_resnet20": ("resnet20-cifar10", "64"),
              "fd_mnist": ("mnist-classifier", "128")}


# torch-fidelity's Inception-v3 file (the same bytes as pytorch-fid's pt_inception-2015-12-05-6726825d.pth,
# 95,628,359 bytes); torch.hub's naming puts the first 8 hex digits of this sha256 in the file name.
# torch-fidelity itself checks no hash and unpickles whatever file it is given with weights_only=False.
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class OfflineFeatureExtractorError(RuntimeError):
    """A feature extractor's weights could not be obtained (e.g. no internet for the Inception download)."""


class FeatureWeightsError(OfflineFeatureExtractorError):
    """A feature extractor's weights file is refused: not a weights-only state dict of the right network."""


# -- ResNet-20 (CIFAR variant) ---------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A shortcut: subsample and zero-pad the channels (no parameters).
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.pad == 0 else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 CIFAR images (3 stages × 3 basic blocks, 16/32/64 channels).

    ``forward`` returns (pooled 64-d features, 10 logits).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for s in (stride, 1, 1):
                stage.append(_BasicBlock(in_planes, planes, s))
                in_planes = planes
            blocks.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = blocks
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        pooled = out.mean(dim=(2, 3))
        return pooled, self.linear(pooled)


RESNET20_ASSET = "resnet20_cifar/resnet20-12fca82f.th"


def load_resnet20(path: Optional[os.PathLike] = None) -> ResNet20:
    """The pretrained ResNet-20 from ``path`` (default ``$BENCH_RESNET20_WEIGHTS``, else the offline asset
    ``resnet20_cifar/resnet20-12fca82f.th`` in :func:`pretrained.checkpoints.assets_dir`), read weights-only;
    the asset's sha256 is verified.

    Raises:
        OfflineFeatureExtractorError: the weights file is missing or its sha256 is not the expected one.
        FeatureWeightsError: the file is not a weights-only ResNet-20 state dict (nothing in it is executed).
    """
    default = assets_dir() / RESNET20_ASSET
    given = path or os.environ.get("BENCH_RESNET20_WEIGHTS")
    path = Path(given or default).expanduser()
    if not path.exists():
        origin = (f"--resnet20-weights / $BENCH_RESNET20_WEIGHTS point to {path}, which does not exist" if given
                  else f"the ResNet-20 weights are not in the offline assets: {assets_hint(RESNET20_ASSET)}")
        raise OfflineFeatureExtractorError(
            f"{origin}. Pass the file (resnet20-12fca82f.th from akamaster/pytorch_resnet_cifar10, sha256 "
            f"{RESNET20_SHA256}) with --resnet20-weights PATH or $BENCH_RESNET20_WEIGHTS, or set "
            "DIFFUSION_SOLVERS_ASSETS to the folder that holds resnet20_cifar/.")
    if path == default and file_digest(path, "sha256") != RESNET20_SHA256:
        raise OfflineFeatureExtractorError(f"{path} does not have the expected sha256 {RESNET20_SHA256}")
    try:
        state = read_state_dict(path, what="the ResNet-20 weights")
    except CheckpointError as e:
        raise FeatureWeightsError(f"--resnet20-weights: {e}") from e
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = ResNet20()
    try:
        net.load_state_dict(state, strict=True)  # BatchNorm accepts files without num_batches_tracked
    except RuntimeError as e:
        detail = str(e) if len(str(e)) < 400 else str(e)[:400] + " …"
        raise FeatureWeightsError(f"--resnet20-weights {path}: not a CIFAR-10 ResNet-20 state dict ({detail})") from e
    return net.eval()


_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _resnet20_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → normalised float (B, 3, 32, 32) as described in the module docstring."""
    x = x.to(torch.float32) / 255.0
    h, w = x.shape[-2:]
    if (h, w) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
    elif (h, w) != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _fidelity_base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    return FeatureExtractorBase


class FeatureExtractorResNet20(_fidelity_base()):
    """torch-fidelity feature extractor over the CIFAR-10 ResNet-20: features ``"64"`` and ``"logits"``.

    Takes uint8 (B, 3, H, W) images, as every torch-fidelity extractor does.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_resnet20(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        pooled, logits = self.net(_resnet20_input(x))
        out = {"64": pooled, "logits": logits}
        return tuple(out[f] for f in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


class FeatureExtractorMnistClassifier(_fidelity_base()):
    """torch-fidelity feature extractor over the project's MNIST classifier: features ``"128"`` (penultimate)
    and ``"logits"``.  Takes uint8 (B, 3, 28, 28) images, as every torch-fidelity extractor does;
    ``feature_extractor_weights_path``: another classifier weight file (default: the committed one)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        try:
            self.net = load_mnist_classifier(feature_extractor_weights_path)
        except FileNotFoundError as e:
            raise OfflineFeatureExtractorError(f"fd_mnist: {e}") from e
        except CheckpointError as e:
            raise FeatureWeightsError(f"fd_mnist: {e}") from e
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
                and tuple(x.shape[2:]) == (28, 28)):
            raise ValueError(f"the MNIST classifier takes uint8 images (B, 3, 28, 28), got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        features, logits = self.net(x.to(torch.float32).mean(dim=1, keepdim=True) / 255.0)
        out = {"128": features, "logits": logits}
        return tuple(out[f] for f in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "128", "kid": "128", "prc": "128"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)


def register() -> None:
    """Register ``resnet20-cifar10`` and ``mnist-classifier`` with torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if "resnet20-cifar10" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("resnet20-cifar10", FeatureExtractorResNet20)
    if "mnist-classifier" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("mnist-classifier", FeatureExtractorMnistClassifier)


OFFLINE_INCEPTION_MESSAGE = (
    "FID needs torch-fidelity's Inception-v3 weights, and they could not be downloaded ({error}). "
    "This machine looks offline (the build machines are). Options: (1) run where the internet is reachable "
    "once (the weights are cached under $TORCH_HOME/hub/checkpoints), or pass a local copy with "
    "--inception-weights PATH (weights-inception-2015-12-05-6726825d.pth); (2) the offline alternative: "
    "--metric fd_resnet20, a Fréchet distance in the features of a CIFAR-10 ResNet-20 from "
    "$DIFFUSION_SOLVERS_ASSETS/resnet20_cifar/ (default ../shared/assets/resnet20_cifar/), reported as "
    "\"FD (ResNet-20)\" — it is not FID and not comparable "
    "with published FIDs.")


def _inception_cache_file() -> Path:
    """Where torch.hub (and so torch-fidelity's download) keeps the Inception-v3 file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _download_inception() -> Path:
    """Download torch-fidelity's Inception-v3 file into torch.hub's cache, its sha256 checked before anything
    reads it (torch-fidelity's own download is unpickled unchecked).

    Raises:
        OfflineFeatureExtractorError: the download failed (e.g. offline); the message gives the alternatives.
        FeatureWeightsError: the downloaded file is not the published one (kept nowhere, never unpickled).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    target = _inception_cache_file()
    with atomic_path(target, suffix=".part") as part:
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(part), progress=False)
        except Exception as e:  # urllib/http/socket errors
            raise OfflineFeatureExtractorError(OFFLINE_INCEPTION_MESSAGE.format(error=f"{type(e).__name__}: {e}")) \
                from e
        digest = file_digest(part, "sha256")
        if digest != INCEPTION_SHA256:
            raise FeatureWeightsError(f"the Inception-v3 download from {URL_INCEPTION_V3} has sha256 {digest}, not "
                                      f"the published {INCEPTION_SHA256}: refused and deleted, never unpickled. "
                                      "Retry, or pass a verified copy with --inception-weights PATH.")
    return target


def _safe_inception_weights(path: Path, staging: Path, origin: str) -> Path:
    """A file torch-fidelity may unpickle (it uses ``weights_only=False``): ``path`` itself when it is the
    published file (its sha256), else a copy of its tensors, read weights-only and saved again in ``staging``.

    Raises:
        FeatureWeightsError: no such file, or not a weights-only state dict (a pickle that would run code is
            refused here, unexecuted).
    """
    published = f"torch-fidelity's {INCEPTION_FILENAME} (sha256 {INCEPTION_SHA256})"
    if not path.is_file():
        raise FeatureWeightsError(f"{origin} {path}: no such file. Pass {published}, or use the offline "
                                  "alternative --metric fd_resnet20.")
    if file_digest(path, "sha256") == INCEPTION_SHA256:
        return path
    try:
        state = read_state_dict(path, what="Inception-v3 weights")
    except CheckpointError as e:
        raise FeatureWeightsError(
            f"{origin}: {e} It is not {published}, so it was read weights-only (nothing in it was run) and is "
            "refused; pass the published file or a plain state dict of tensors.") from e
    staged = staging / "inception-weights-only.pth"
    torch.save(state, staged)
    return staged


def create_extractor(metric: str, device: str = "cpu", weights_path: Optional[os.PathLike] = None,
                     verbose: bool = False):
    """Build the torch-fidelity feature extractor of an image metric (``fid``, ``fd_resnet20`` or ``fd_mnist``).

    No file that is not the published Inception-v3 file reaches torch-fidelity's unpickler: another
    ``weights_path`` (or another file in torch.hub's cache) is read weights-only first.

    Returns:
        (extractor module on ``device``, feature layer name, extractor name).

    Raises:
        OfflineFeatureExtractorError: the weights cannot be obtained; for Inception the message explains
            the offline alternative.
        FeatureWeightsError: a weights file is refused (not a weights-only state dict of the network).
    """
    from torch_fidelity.utils import create_feature_extractor

    register()
    name, layer = EXTRACTORS[metric]
    kwargs = {"verbose": verbose}
    with tempfile.TemporaryDirectory(prefix="inception-weights-") as staging:
        path = None if weights_path is None else Path(weights_path).expanduser()
        origin = "--inception-weights"
        if name == "inception-v3-compat":
            if path is None and _inception_cache_file().exists():
                path, origin = _inception_cache_file(), "the torch.hub cache file"  # torch-fidelity would unpickle it
            elif path is None:
                path, origin = _download_inception(), "the verified download"
            path = _safe_inception_weights(path, Path(staging), origin)
        if path is not None:
            kwargs["feature_extractor_weights_path"] = str(path)
        try:
            extractor = create_feature_extractor(name, [layer], cuda=str(device).startswith("cuda"), **kwargs)
        except OfflineFeatureExtractorError:
            raise
        except Exception as e:
            if name == "inception-v3-compat" and isinstance(e, RuntimeError):  # load_state_dict: keys/shapes
                detail = str(e) if len(str(e)) < 400 else str(e)[:400] + " …"
                raise FeatureWeightsError(f"--inception-weights {weights_path}: not torch-fidelity's Inception-v3 "
                                          f"state dict ({detail})") from e
            raise
    return extractor, layer, name


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1], (B, C, H, W) with C ∈ {1, 3} → uint8 (B, 3, H, W) on the CPU.

    Rounds to the nearest of the 256 levels (as saving a PNG would); grey images get their channel repeated.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    out = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()
    return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out


class UInt8Images(torch.utils.data.Dataset):
    """A tensor of uint8 images (N, 3, H, W) as the Dataset torch-fidelity takes (no files written)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def extract_features(extractor, layer: str, dataset: torch.utils.data.Dataset, device: str = "cpu",
                     batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Features of every image of ``dataset`` through torch-fidelity's extraction loop.

    Returns:
        float64 array (N, d).
    """
    from torch_fidelity.utils import get_featuresdict_from_dataset

    # save_cpu_ram=True: no DataLoader worker processes (the data is already in memory).
    feats = get_featuresdict_from_dataset(dataset, extractor, batch_size, str(device).startswith("cuda"),
                                          save_cpu_ram=True, verbose=progress)
    return feats[layer].numpy().astype(np.float64)
