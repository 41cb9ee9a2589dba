"""What the MNIST model tests share that is not a fixture: the skip mark for a missing MNIST set, a pickle
payload that must never run, and the FD (MNIST classifier) yardsticks the trained models are scored with."""
from __future__ import annotations

import pytest
import torch

from pretrained import checkpoints

needs_mnist = pytest.mark.skipif(not (checkpoints.ASSETS / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="MNIST test set not in the shared assets")


class Payload:
    """Unpickling this prints a line: a file holding it proves a loader ran pickled code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def held_out_fd(cache_dir, n: int):
    """(fd, floor): fd(uint8 images (N, 1, 28, 28)) → FD (MNIST classifier) against the 2,000 held-out images;
    floor: the noise floor of ``n`` held-out images (reference statistics cached in ``cache_dir``)."""
    from bench import datasets, features, metrics
    ext, layer, name = features.create_extractor("fd_mnist", "cpu")
    ref = datasets.reference_statistics("mnist-heldout", ext, layer, name, cache_dir=cache_dir, floor_n=n)
    spec = metrics.get_metric("fd_mnist")

    def fd(images: torch.Tensor) -> float:
        rgb = images.expand(-1, 3, -1, -1).contiguous()
        return spec.value(features.extract_features(ext, layer, features.UInt8Images(rgb)), ref)

    return fd, ref["floor"][0]


def real_and_blurred(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real training digits (uint8) and the same blurred by a 3×3 box filter: the yardsticks
    between which a sample set's FD should fall."""
    from pretrained.mnist_data import mnist_split
    real = mnist_split("train")[0][:n]
    return real, torch.nn.functional.avg_pool2d(real.float(), 3, 1, 1).to(torch.uint8)
