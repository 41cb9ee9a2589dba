"""What the MNIST model tests share that is not a fixture: the skip mark for a missing MNIST set, and a pickle
payload that must never run."""
from __future__ import annotations

import pytest

from pretrained import checkpoints

needs_mnist = pytest.mark.skipif(not (checkpoints.ASSETS / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="MNIST test set not in the shared assets")


class Payload:
    """Unpickling this prints a line: a file holding it proves a loader ran pickled code."""

    def __reduce__(self):
        return (print, ("this must never run",))
