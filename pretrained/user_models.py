"""Your own model as a model card: an import path (``my_pkg.my_module:ATTR``) or a card file (``card.toml``).

``resolve_card(spec)`` is what ``python -m bench.run --model SPEC`` calls: a zoo name gives the zoo's card;
``pkg.module:ATTR`` imports ATTR — a :class:`solvers.DiffusionModel`, a :class:`~pretrained.cards.ModelCard`,
or a callable returning either (called with ``device=`` when it takes it); a path ending in ``.toml`` reads a
declarative card (:mod:`pretrained.card_files`; every key is listed there and in the README's "Benchmark your
own model").

A card made here has no reference data unless it names one (``reference = "mnist-test"`` or a dataset the
harness knows): it is then scored by its error against a high-accuracy reference solution of its own
probability-flow ODE from the same x_T (the ``ref_error`` metric), so any model can be benchmarked at once.
User weight files are read weights-only (``torch.load(weights_only=True)`` or safetensors), their sha256
checked first where the card gives one.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import solvers

from .cards import CARDS, ModelCard, available_models

__all__ = ["resolve_card", "card_from_object", "user_card", "import_object", "parse_shape", "to_images_in_range",
           "NO_REFERENCE"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a results.csv cell starting so is a spreadsheet formula
NO_REFERENCE = "none"  # a card's reference when it has no data: scored against its own reference solution


def resolve_card(spec: str, *, shape: Optional[Sequence[int]] = None) -> ModelCard:
    """The model card ``spec`` names: a zoo name, ``pkg.module:ATTR`` or a ``.toml`` card file.

    Args:
        spec: what ``--model`` was given.
        shape: the sample shape (``--shape``), for a model object that does not carry one.

    Raises:
        ValueError: an unknown name, an import that fails, an attribute that is not a model, a card file
            with a missing or unknown key — each message says what would be right.
    """
    if spec in CARDS:
        if shape is not None:
            raise ValueError(f"--shape is for your own model; {spec} is a zoo model whose sample shape is "
                             f"{tuple(CARDS[spec].sample_shape)}")
        return CARDS[spec]
    if spec.endswith(".toml"):
        from .card_files import card_from_toml  # it builds on this module
        return card_from_toml(spec, shape=shape)
    if ":" in spec:
        return card_from_object(import_object(spec), name=spec, shape=shape)
    raise ValueError(f"unknown model {spec!r}; available models: {', '.join(available_models())}; or your own "
                     "model as an import path my_pkg.my_module:ATTR or a card file path/to/card.toml")


def import_object(path: str) -> Any:
    """The object ``pkg.module:ATTR`` (ATTR may be dotted) names.

    Raises:
        ValueError: the module cannot be imported or has no such attribute.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r}: an import path is MODULE:ATTR, e.g. my_pkg.my_module:model")
    if "" not in sys.path and Path.cwd().joinpath(module_name.split(".")[0]).exists():
        sys.path.insert(0, "")  # python -m puts the working folder first; a console script may not
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for {path!r} ({type(e).__name__}: {e}); install it or "
                         "run from the folder that holds it (or add that folder to PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no attribute {attr!r} (for {path!r}); public names there: "
                             f"{', '.join(n for n in dir(obj) if not n.startswith('_'))[:400]}")
        obj = getattr(obj, part)
    return obj


def call_mismatch(fn: Callable, **kwargs) -> Optional[tuple[str, str]]:
    """Why ``fn(**kwargs)`` would not bind, and the parameters ``fn`` takes; None when it binds (or ``fn`` has no
    readable signature, so it is called as it is).  Checked before calling, so a TypeError raised inside ``fn`` is
    never mistaken for one of the caller's arguments."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        return str(e), ", ".join(signature.parameters)
    return None


def parse_shape(text: Any) -> tuple[int, ...]:
    """A sample shape from ``"C,H,W"`` (or a sequence of ints); every size a positive integer.

    Raises:
        ValueError: anything else.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"a sample shape is positive sizes separated by commas, e.g. 3,32,32 or 2; got {text!r}")
    return shape


def to_images_in_range(data_range: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Samples in ``data_range`` → float images in [0, 1] (clamped)."""
    lo, hi = (float(v) for v in data_range)
    return lambda x: ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def user_card(name: str, loader: Callable[..., solvers.DiffusionModel], shape: Sequence[int], *,
              prediction: str = "unknown", schedule_name: str = "", description: str = "",
              data_range: Sequence[float] = (-1.0, 1.0), reference: str = NO_REFERENCE,
              default_num_samples: int = 256, default_batch_size: int = 64, notes: str = "") -> ModelCard:
    """A card for a model that is not in the zoo: kind "image" for (C, H, W) samples, else "points"."""
    shape = parse_shape(shape)
    lo, hi = (float(v) for v in data_range)
    if not lo < hi:
        raise ValueError(f"{name}: data_range must be [low, high] with low < high, got {list(data_range)}")
    image = len(shape) == 3
    return ModelCard(name=name, kind="image" if image else "points", loader=loader, sample_shape=shape,
                     description=description or f"your model {name}", prediction=prediction,
                     schedule_name=schedule_name, data_range=(lo, hi), to_images=to_images_in_range((lo, hi)) if image else None,
                     reference=reference, default_num_samples=default_num_samples,
                     default_batch_size=default_batch_size, notes=notes)


def card_from_object(obj: Any, *, name: str, shape: Optional[Sequence[int]] = None) -> ModelCard:
    """A card for an imported object: a ModelCard (returned), a DiffusionModel, or a callable returning one.

    The sample shape is ``shape`` (``--shape``), else the object's ``sample_shape`` attribute.

    Raises:
        ValueError: not a model, or no sample shape (the message says to pass ``--shape``).
    """
    if isinstance(obj, ModelCard):
        if str(obj.name).startswith(FORMULA_STARTS):
            raise ValueError(f"{name} is a model card named {obj.name!r}: a spreadsheet opening results.csv would "
                             f"read that name as a formula (it starts with {obj.name[0]!r}); give it a name that "
                             "starts with a letter or digit")
        if shape is not None and tuple(parse_shape(shape)) != tuple(obj.sample_shape):
            raise ValueError(f"{name} is a model card with sample shape {tuple(obj.sample_shape)}; --shape "
                             f"{','.join(map(str, parse_shape(shape)))} disagrees (leave --shape out)")
        return obj
    if isinstance(obj, torch.nn.Module) or (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ValueError(f"{name} is a network ({obj.__name__ if isinstance(obj, type) else type(obj).__name__}), not "
                         "a model: the harness needs its schedule and what it predicts too; wrap it in one line, "
                         "e.g. model = solvers.DiffusionModel(net, schedule=solvers.schedules.DiscreteVP.linear(), "
                         "prediction='eps'), and give --model that")
    if isinstance(obj, solvers.DiffusionModel):
        model, loader = obj, _object_loader(obj)
    elif callable(obj):
        loader = _factory_loader(obj, name)
        model = None
    else:
        raise ValueError(f"{name} is a {type(obj).__name__}, not a model: give a solvers.DiffusionModel, a "
                         "pretrained ModelCard, or a callable returning one")
    carried = getattr(obj, "sample_shape", None) or getattr(getattr(model, "fn", None), "sample_shape", None)
    if shape is not None and carried is not None and parse_shape(shape) != parse_shape(carried):
        raise ValueError(f"{name}: its sample_shape is {parse_shape(carried)}; --shape "
                         f"{','.join(map(str, parse_shape(shape)))} disagrees (leave --shape out)")
    found = shape if shape is not None else carried
    if found is None:
        raise ValueError(f"{name}: the sample shape is unknown; pass --shape C,H,W (e.g. --shape 3,32,32) or give "
                         "the object a sample_shape attribute")
    schedule = f"{type(model.schedule).__name__}" if model is not None else "the model's"
    return user_card(name, loader, found, prediction=model.prediction if model is not None else "unknown",
                     schedule_name=schedule)


def _check_no_options(name: str, options: dict) -> None:
    if options:
        raise TypeError(f"{name} takes no loader options (got {', '.join(sorted(options))})")


def _object_loader(model: solvers.DiffusionModel) -> Callable[..., solvers.DiffusionModel]:
    """Loader of a ready DiffusionModel: its network (a torch module) moved to the device; no other options."""

    def load(device: str = "cpu", **options) -> solvers.DiffusionModel:
        _check_no_options("a DiffusionModel object", options)
        if isinstance(model.fn, torch.nn.Module):
            model.fn.to(device)
        return model

    return load


def _factory_loader(factory: Callable, name: str) -> Callable[..., solvers.DiffusionModel]:
    """Loader of a callable returning a DiffusionModel or a ModelCard (``device=`` passed where accepted)."""
    try:
        takes_device = "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_device = False

    def load(device: str = "cpu", **options) -> solvers.DiffusionModel:
        out = factory(device=device, **options) if takes_device else factory(**options)
        if isinstance(out, ModelCard):
            return out.loader(device=device)
        if not isinstance(out, solvers.DiffusionModel):
            raise ValueError(f"{name} returned a {type(out).__name__}, not a solvers.DiffusionModel")
        if not takes_device and isinstance(out.fn, torch.nn.Module):
            out.fn.to(device)
        return out

    return load
