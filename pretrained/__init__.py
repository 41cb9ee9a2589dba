"""pretrained — the model zoo: model cards as data, loaders, and exact analytic models.

    import pretrained
    pretrained.available_models()
    model = pretrained.load("gmm2d")          # a solvers.DiffusionModel
    card = pretrained.get_card("gmm2d")       # schedule, shape, reference data, provenance
"""
from .cards import CARDS, ModelCard, available_models, get_card, load, register_card
from . import zoo_analytic  # noqa: F401  (registers the analytic cards)

__all__ = ["CARDS", "ModelCard", "available_models", "get_card", "load", "register_card"]
