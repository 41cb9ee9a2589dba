"""pretrained — the model zoo: model cards as data, loaders, and exact analytic models.

    import pretrained
    pretrained.available_models()
    model = pretrained.load("gmm2d")          # a solvers.DiffusionModel
    card = pretrained.get_card("gmm2d")       # schedule, shape, reference data, provenance
    card = pretrained.resolve_card("my_pkg.my_module:model")   # or "path/to/card.toml": your own model

Cards: the exact analytic models (``gmm2d``, ``gmm``, ``gaussian``), the real networks ``ddpm_mnist``,
``ddpm_cifar`` (EMA) and ``ddpm_cifar_hub`` (non-EMA), the consistency model ``cd_imagenet64_l2``, and the
project's own learned models: ``cm_gmm2d`` and ``fm_gmm2d`` (on ``gmm2d``), ``fm_mnist`` (a rectified-flow U-Net
on 8,000 MNIST test images; :mod:`pretrained.mnist_data` holds the split), ``cfg_mnist`` (a class-conditional
ε-prediction U-Net on the same images, for classifier-free guidance), ``cm_mnist`` (a consistency model
distilled from ``fm_mnist``), ``ldm_mnist`` (an autoencoder to 4×7×7 and a latent diffusion model, its card
carrying the decoder) and the ``mnist_classifier`` behind the
``fd_mnist`` metric.  Weights are found via ``weights=PATH``,
an environment variable, local assets, or the cache (downloaded once, checksum-verified); see
:mod:`pretrained.checkpoints`.
"""
from .cards import CARDS, ModelCard, available_models, get_card, load, register_card
from .checkpoints import CheckpointError, WeightsNotFoundError
from . import zoo_analytic  # noqa: F401  (registers the analytic cards)
from . import ddpm_mnist, zoo_cifar, consistency, toy, fm_mnist  # noqa: F401  (register the other cards)
from . import cfg_mnist, cm_mnist, ldm_mnist  # noqa: F401  (guidance, consistency, latent diffusion)
from .user_models import resolve_card

__all__ = ["CARDS", "ModelCard", "available_models", "get_card", "load", "register_card", "CheckpointError",
           "WeightsNotFoundError", "resolve_card"]
