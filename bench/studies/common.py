"""What the performance studies share: a device-synchronised clock, the DDPM CIFAR-10 UNet with random
weights and its call as our network contract, and a description of the machine for a report's top."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import solvers
from pretrained.checkpoints import ASSETS, assets_dir, assets_hint

from ..provenance import cpu_name, git_commit
from . import peers as P

__all__ = ["synced_clock", "sync_device", "load_cifar_unet", "unet_call", "machine_description", "SAMPLE_SHAPE",
           "UNET_CONFIG"]

UNET_CONFIG = ASSETS / "ddpm_cifar10_32" / "unet_config.json"
SAMPLE_SHAPE = (3, 32, 32)


def sync_device(device: torch.device) -> None:
    """Wait for the queued work of a CUDA device (nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class synced_clock:
    """``with synced_clock(device) as c: …`` → ``c.seconds``: the block's wall-clock time, the device
    synchronised on entry and on exit (so queued device work is neither charged to it nor left out)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = float("nan")

    def __enter__(self):
        sync_device(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync_device(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


def load_cifar_unet(config_path: Optional[os.PathLike] = None, seed: int = 0, overrides: Optional[dict] = None):
    """The DDPM CIFAR-10 UNet architecture with random weights (seeded), in eval mode.

    Raises:
        FileNotFoundError: the config is absent (it lives in ``../shared/assets``, outside the repository).
    """
    diffusers = P.import_diffusers()
    relative = "ddpm_cifar10_32/unet_config.json"
    path = assets_dir() / relative if config_path is None else Path(config_path)
    if not path.is_file():
        where = assets_hint(relative) if config_path is None else f"looked for {path}"
        raise FileNotFoundError(f"the DDPM CIFAR-10 UNet config is not found: {where}")
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config.update(overrides or {})
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def unet_call(unet) -> Callable:
    """``fn(x, t) = unet(x, t).sample``: a diffusers UNet2DModel as our network contract (and as diffusers'
    pipelines call it)."""
    return lambda x, t: unet(x, t).sample


def machine_description(device: str = "cpu") -> str:
    """The machine, load and library versions in one paragraph (the top of a study's report)."""
    import diffusers

    commit, dirty = git_commit()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = ""
    if torch.device(device).type == "cuda":
        gpu = (f"GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, cuDNN "
               f"{torch.backends.cudnn.version()}, TF32 for cuDNN convolutions "
               f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, for matmul "
               f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} — torch's defaults).  ")
    return (f"{gpu}Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"load average at the end {load}.  Python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, solvers {solvers.__version__}, git {commit or '?'}"
            f"{' (uncommitted changes)' if dirty else ''}.")
