"""Declarative model cards: ``python -m bench.run --model path/to/card.toml``.

A card file names the network (an import path and its arguments, a diffusers model folder, or a loader
function), its weights, the schedule (by name and parameters, or a diffusers ``scheduler_config.json``), what
it predicts, the sample shape, the data range and, optionally, reference data.  Relative paths are relative to
the card file; ``${ASSETS}`` is the offline assets folder and ``${NAME}`` any environment variable.  Every key
is in :data:`TOML_KEYS`; an unknown key is an error (a typo is never silently ignored)::

    name = "my_unet"                       # default: the file name
    sample_shape = [3, 32, 32]             # required
    prediction = "eps"                     # eps, x0, v, score, velocity (or from scheduler_config)
    data_range = [-1.0, 1.0]               # default [-1, 1]
    reference = "none"                     # a data set the harness knows (mnist-test, mnist-heldout,
                                           # cifar10-train), an image folder, a statistics .npz, or none

    [network]                              # exactly one of factory, diffusers, loader
    factory = "my_pkg.nets:UNet"           # called with kwargs → a torch module (or any fn(x, t))
    kwargs = { channels = 64 }
    weights = "unet.safetensors"           # read weights-only into the module (strict)
    sha256 = "…"                           # optional: checked before the file is read

    [schedule]                             # name + its parameters, or scheduler_config
    name = "discrete_vp"                   # solvers.schedules.available_schedules()
    # scheduler_config = "scheduler_config.json"

    [model]                                # solvers.DiffusionModel options
    clip_x0 = [-1.0, 1.0]

    [decoder]                              # a latent model's decoder: factory or diffusers (an AutoencoderKL)
    diffusers = "vae"                      # samples = decoder.decode(latents / scale).sample
    scale = 0.18215
    data_shape = [3, 64, 64]               # required: the decoded samples' shape (sample_shape is the latents')

Every value is checked when the card is read, before anything is built: its type (:data:`KEY_KINDS`), a
``name`` that is an identifier (letters, digits, ``_ . -``, starting with a letter or digit, at most 64
characters: it keys results rows and folders), every string at most :data:`MAX_TEXT_CHARS` characters and the
card file at most :data:`MAX_CARD_BYTES` bytes (read no further), and the schedule built from its parameters.

A ``sha256`` pins the file the weights are read from.  For a diffusers folder that is the folder's one weights
file, the one ``from_pretrained`` reads: ``diffusion_pytorch_model[.VARIANT].safetensors``, else ``….bin``
(``sha256sum folder/diffusion_pytorch_model.safetensors``); its ``config.json`` is not covered, and a folder of
sharded weights cannot be pinned by one digest (the card is refused).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import solvers

from .cards import ModelCard
from .checkpoints import assets_dir, read_state_dict, verify_file
from .user_models import NO_REFERENCE, call_mismatch, import_object, to_images_in_range as _to_images, user_card

__all__ = ["card_from_toml", "read_card_file", "expand_card_path", "TOML_KEYS", "KEY_KINDS", "MAX_CARD_BYTES", "MAX_TEXT_CHARS"]

MAX_CARD_BYTES = 1 << 20  # a larger card file is refused unread
MAX_TEXT_CHARS = 5000  # the longest string a card may hold (its description, notes, paths…): reports copy them
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a key's value must be: (what the error message says, the test).
_STRING = ("a string", lambda v: isinstance(v, str))
_TABLE = ("a table ([section] or { key = value, … })", lambda v: isinstance(v, dict))
_SHAPE = ("a list of positive integers, e.g. [3, 32, 32]",
          lambda v: isinstance(v, list) and bool(v) and all(_is_int(s) and s > 0 for s in v))
_PAIR = ("a list of two finite numbers [low, high], e.g. [-1.0, 1.0]",
         lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_finite, v)))
_COUNT = ("a positive integer, e.g. 64", lambda v: _is_int(v) and v > 0)
_NUMBER = ("a finite number, e.g. 0.18215", _is_finite)
_FRACTION = ("a number in (0, 1), e.g. 0.995", lambda v: _is_finite(v) and 0 < v < 1)
_SHA256 = ("64 hexadecimal digits (the file's sha256)",
           lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None)
_DTYPE = (f"one of {', '.join(DTYPES)}", lambda v: isinstance(v, str) and v in DTYPES)
_PREDICTION = (f"one of {', '.join(solvers.PREDICTIONS)}", lambda v: isinstance(v, str) and v in solvers.PREDICTIONS)
_NAME = ('a string of letters, digits and _ . - that starts with a letter or digit, at most 64 characters '
         '(e.g. "my_unet")', lambda v: isinstance(v, str) and NAME_PATTERN.fullmatch(v) is not None)

KEY_KINDS = {
    "": {"name": _NAME, "description": _STRING, "sample_shape": _SHAPE, "prediction": _PREDICTION,
         "data_range": _PAIR, "reference": _STRING, "default_num_samples": _COUNT, "default_batch_size": _COUNT,
         "notes": _STRING, "network": _TABLE, "schedule": _TABLE, "model": _TABLE, "decoder": _TABLE},
    "network": {"factory": _STRING, "diffusers": _STRING, "loader": _STRING, "kwargs": _TABLE, "weights": _STRING,
                "sha256": _SHA256, "dtype": _DTYPE},
    "model": {"clip_x0": _PAIR, "dynamic_threshold": _FRACTION},
    "decoder": {"factory": _STRING, "diffusers": _STRING, "kwargs": _TABLE, "weights": _STRING, "sha256": _SHA256,
                "scale": _NUMBER, "data_shape": _SHAPE, "name": _STRING},
    "schedule": {"name": _STRING, "scheduler_config": _STRING},  # its other keys are the schedule's parameters
}
TOML_KEYS = {section: tuple(kinds) for section, kinds in KEY_KINDS.items() if section != "schedule"}
NETWORK_KINDS = ("factory", "diffusers", "loader")


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise ValueError(f"{path} has {size:,} bytes, which is larger than a card file may be "
                             f"({MAX_CARD_BYTES:,} bytes); keep long texts and data in files the card names")
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the card file {path} ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save the card as UTF-8") from None
    except RecursionError:
        raise ValueError(f"{path}: its arrays or tables are nested too deeply to read; a card's values are "
                         "strings, numbers, lists of numbers and tables one or two levels deep") from None


def _check_values(path: Path, table: dict, section: str) -> None:
    """Every value of one table of the card is of its key's kind, and no string is longer than allowed."""
    where = f"[{section}] " if section else ""
    for key, value in table.items():
        words, test = KEY_KINDS[section].get(key, (None, None))
        if test is not None and not test(value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{path}: {where}{key} must be {words}; got {shown}")
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"{path}: {where}{key} has {len(value):,} characters; a card's text is at most "
                             f"{MAX_TEXT_CHARS:,} (keep longer notes in a file beside the card)")


def _check_keys(path: Path, table: dict, section: str) -> None:
    unknown = sorted(set(table) - set(TOML_KEYS[section]))
    if unknown:
        where = f"[{section}]" if section else "the top level"
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} in {where}; valid keys there: "
                         f"{', '.join(TOML_KEYS[section])}")


def read_card_file(path: os.PathLike) -> dict:
    """The card file's tables, every key checked (no network is built).

    Raises:
        ValueError: unreadable or invalid TOML, an unknown key, a missing required key, or not exactly one
            network kind.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--model {path}: no such card file; give the path of a .toml card (see the README's "
                         "'Benchmark your own model')")
    data = _load_toml(path)
    _check_keys(path, data, "")
    _check_values(path, data, "")
    for section in ("network", "model", "decoder", "schedule"):
        if section != "schedule":
            _check_keys(path, data.get(section, {}), section)
        _check_values(path, data.get(section, {}), section)
    if "name" not in data and not NAME_PATTERN.fullmatch(path.stem):
        raise ValueError(f"{path}: the card's name defaults to the file name {path.stem!r}, which is not "
                         f"{_NAME[0]}; set name = \"...\" in the card")
    if "sample_shape" not in data:
        raise ValueError(f"{path}: sample_shape is required, e.g. sample_shape = [3, 32, 32]")
    kinds = [k for k in NETWORK_KINDS if k in data.get("network", {})]
    if len(kinds) != 1:
        raise ValueError(f"{path}: [network] needs exactly one of {', '.join(NETWORK_KINDS)}, got "
                         f"{', '.join(kinds) or 'none'}")
    dec = data.get("decoder")
    if dec is not None and (len([k for k in ("factory", "diffusers") if k in dec]) != 1 or "data_shape" not in dec):
        raise ValueError(f"{path}: [decoder] needs exactly one of factory, diffusers and the decoded sample shape "
                         "data_shape = [C, H, W]")
    if kinds[0] == "loader":
        _check_loader_card(path, data)
    else:
        if "schedule" not in data:
            raise ValueError(f"{path}: a [schedule] table is required (name = … with its parameters, or "
                             "scheduler_config = …)")
        if "prediction" not in data and "scheduler_config" not in data["schedule"]:
            raise ValueError(f"{path}: prediction is required (one of {', '.join(solvers.PREDICTIONS)})")
        _check_schedule(path, data["schedule"])
    return data


def _check_loader_card(path: Path, data: dict) -> None:
    """A loader returns the whole model — network, schedule and parameterisation — so the keys that would build
    them are refused rather than ignored."""
    ignored = [key for key in ("prediction", "schedule", "model") if key in data]
    ignored += [f"network.{key}" for key in ("dtype",) if key in data["network"]]
    if ignored:
        raise ValueError(f"{path}: [network] loader returns the whole model (its schedule, prediction and options), "
                         f"so {', '.join(ignored)} would be ignored; drop them, or build the model from a factory "
                         "with them")


def _check_schedule(path: Path, sched: dict) -> None:
    """The card's [schedule] builds (a schedule is cheap: checked here, before any network is)."""
    if "scheduler_config" in sched:
        if len(sched) > 1:
            raise ValueError(f"{path}: [schedule] scheduler_config gives the whole schedule; drop its other keys "
                             f"({', '.join(k for k in sched if k != 'scheduler_config')})")
        return
    params = {k: v for k, v in sched.items() if k != "name"}
    name = sched.get("name", "discrete_vp")
    try:
        solvers.schedules.get_schedule(name, **params)
    except (TypeError, ValueError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: [schedule] {name} cannot be built from {params} ({reason}); give the "
                         "parameters solvers.schedules.get_schedule takes, numbers where it takes numbers") from None


def expand_card_path(path: Path, value: str, strict: bool = True) -> Path:
    """A path the card file ``path`` names: ``${ASSETS}`` and environment variables expanded, relative to the card's
    folder.  ``strict=False`` leaves an unset variable as text (which names no file) instead of refusing it.

    Raises:
        ValueError: (strict) the value uses a variable that is not set.
    """
    mapping = {**os.environ, "ASSETS": str(assets_dir())}
    try:
        text = string.Template(value).substitute(mapping) if strict else string.Template(value).safe_substitute(mapping)
    except KeyError as e:
        raise ValueError(f"{path}: {value!r} uses ${{{e.args[0]}}}, which is not set (ASSETS is the offline "
                         "assets folder; other names are environment variables)") from None
    p = Path(text).expanduser()
    return p if p.is_absolute() else path.parent / p


def card_from_toml(path: os.PathLike, *, shape: Optional[Sequence[int]] = None) -> ModelCard:
    """The model card a card file describes (the network is built only when the card's loader is called).

    Raises:
        ValueError: see :func:`read_card_file`; also a ``--shape`` that disagrees with the file.
    """
    path = Path(path)
    data = read_card_file(path)
    if shape is not None and tuple(shape) != tuple(data["sample_shape"]):
        raise ValueError(f"{path} gives sample_shape {list(data['sample_shape'])}; --shape "
                         f"{','.join(map(str, shape))} disagrees (leave --shape out)")
    card = _card(path, data)
    dec = data.get("decoder")
    if dec is None:
        return card
    data_shape = tuple(int(v) for v in dec["data_shape"])
    image = len(data_shape) == 3
    return dataclasses.replace(card, decoder=lambda device="cpu": _decoder(path, dec, device),
                               decoder_name=dec.get("name", dec.get("diffusers", dec.get("factory"))),
                               data_shape=data_shape, kind="image" if image else "points",
                               to_images=card.to_images or (_to_images(card.data_range) if image else None))


def _card(path: Path, data: dict) -> ModelCard:
    sched = data.get("schedule", {})
    schedule_name = (f"diffusers {sched['scheduler_config']}" if "scheduler_config" in sched else
                     ", ".join(f"{k}={v}" for k, v in sched.items()) or "given by the loader")
    return user_card(str(data.get("name", path.stem)), lambda device="cpu", **options: _load(path, data, device,
                                                                                             options),
                     data["sample_shape"], prediction=data.get("prediction", "from the scheduler config"),
                     schedule_name=schedule_name, description=data.get("description", f"card file {path}"),
                     data_range=data.get("data_range", (-1.0, 1.0)), reference=_reference(path, data),
                     default_num_samples=int(data.get("default_num_samples", 256)),
                     default_batch_size=int(data.get("default_batch_size", 64)), notes=data.get("notes", ""))


def _reference(path: Path, data: dict) -> str:
    """The card's ``reference``: a data set name as written; a file or folder (it exists beside the card, or the
    value looks like a path: a separator, ``~``, ``$`` or ``.npz``) relative to the card's folder."""
    value = str(data.get("reference", NO_REFERENCE))
    if value == NO_REFERENCE:
        return value
    looks_like_path = any(c in value for c in "/\\~$") or value.lower().endswith(".npz")
    beside = expand_card_path(path, value)
    return str(beside) if looks_like_path or beside.exists() else value


def _load(path: Path, data: dict, device: str, options: dict) -> solvers.DiffusionModel:
    """Build the card's model: the network (weights read weights-only), then schedule and parameterisation."""
    net = data["network"]
    kwargs = {**net.get("kwargs", {}), **options}
    if "loader" in net:
        if "weights" in net:
            kwargs.setdefault("weights", expand_card_path(path, net["weights"]))
        return import_object(net["loader"])(device=device, **kwargs)
    dtype = getattr(torch, net.get("dtype", "float32"))
    fn = _diffusers_network(path, net, kwargs) if "diffusers" in net else _factory_network(path, net, kwargs)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device=device, dtype=dtype).eval()
    model_opts = dict(data.get("model", {}))
    if "clip_x0" in model_opts:
        model_opts["clip_x0"] = tuple(model_opts["clip_x0"])
    sched = dict(data["schedule"])
    if "scheduler_config" in sched:
        from solvers.interop.diffusers import PREDICTION_TYPES, model_from_config
        if model_opts:
            raise ValueError(f"{path}: with a scheduler_config, its clip_sample/thresholding set the x0 range; "
                             "drop the [model] table")
        config_file = expand_card_path(path, sched["scheduler_config"])
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: [schedule] scheduler_config {config_file} cannot be read as JSON ({e}); give "
                             "the scheduler_config.json a diffusers scheduler's save_config wrote") from None
        if "prediction" in data:
            theirs = {ours: name for name, ours in PREDICTION_TYPES.items()}
            if data["prediction"] not in theirs:
                raise ValueError(f"{path}: with a scheduler_config, prediction must be one diffusers has "
                                 f"({', '.join(theirs)}), got {data['prediction']!r}")
            config["prediction_type"] = theirs[data["prediction"]]
        return model_from_config(fn, config)
    schedule = solvers.schedules.get_schedule(sched.pop("name", "discrete_vp"), **sched)
    return solvers.DiffusionModel(fn, schedule=schedule, prediction=data["prediction"], **model_opts)


def _factory_network(path: Path, net: dict, kwargs: dict) -> Any:
    factory = import_object(net["factory"])
    mismatch = call_mismatch(factory, **kwargs)
    if mismatch is not None:
        raise ValueError(f"{path}: [network] kwargs {sorted(kwargs)} do not fit {net['factory']} ({mismatch[0]}); "
                         f"it takes: {mismatch[1] or 'no arguments'}")
    module = factory(**kwargs)
    if "weights" in net:
        weights = expand_card_path(path, net["weights"])
        if not weights.is_file():
            raise ValueError(f"{path}: weights {weights} not found")
        if "sha256" in net:
            verify_file(weights, sha256=net["sha256"], what=f"the weights of {path}")
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"{path}: weights were given but {net['factory']} returned a {type(module).__name__}, "
                             "not a torch module to load them into")
        module.load_state_dict(read_state_dict(weights, what=f"the weights of {path}"), strict=True)
    return module


class _DiffusersOutput(torch.nn.Module):
    """A diffusers UNet as fn(x, t): its ``.sample`` output (t: the step index, diffusers' convention)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def _diffusers_network(path: Path, net: dict, kwargs: dict) -> torch.nn.Module:
    return _DiffusersOutput(_diffusers_module(path, net, kwargs))


def _diffusers_module(path: Path, net: dict, kwargs: dict) -> torch.nn.Module:
    """The diffusers model saved in the folder ``net["diffusers"]`` (its class named by its config.json), its
    weights file checked against the card's ``sha256`` before it is read."""
    folder = expand_card_path(path, net["diffusers"])
    config = _diffusers_config(path, folder)
    weights = _diffusers_weights(path, folder, kwargs.get("variant"))
    if "sha256" in net:
        if weights.name.endswith(".index.json"):
            raise ValueError(f"{path}: {folder} holds sharded weights ({weights.name}), which one sha256 cannot pin; "
                             "drop sha256 or save the model in one file (save_pretrained(max_shard_size=...))")
        verify_file(weights, sha256=net["sha256"], what=f"the weights of {path}")
        kwargs = {**kwargs, "use_safetensors": weights.name.endswith(".safetensors")}  # the file just checked
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"{path}: a diffusers model folder needs diffusers (pip install "
                         "'diffusion-solvers[hub]')") from None
    cls_name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None:
        raise ValueError(f"{path}: {folder}/config.json names class {cls_name!r}, which diffusers does not have")
    # from_pretrained reads safetensors, or torch files with weights_only=True (diffusers' load_state_dict)
    # low_cpu_mem_usage=False: the default asks for the optional package accelerate, and says so on stderr
    try:
        return cls.from_pretrained(str(folder), **{"low_cpu_mem_usage": False, **kwargs})
    except (OSError, ValueError, KeyError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: the diffusers {cls_name} in {folder} cannot be loaded ({reason}); save it with "
                         "save_pretrained") from None


def _diffusers_config(path: Path, folder: Path) -> dict:
    """The folder's config.json as a dict."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: {folder} is not a diffusers model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {config_file} cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: {config_file} is not a JSON object (what save_pretrained writes)")
    return config


def _diffusers_weights(path: Path, folder: Path, variant: Optional[str]) -> Path:
    """The weights file ``from_pretrained`` reads in ``folder``: its safetensors file, else its torch file, else
    the index of sharded weights (diffusers' names, with the variant where one is asked for)."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    names = [f"{stem}.safetensors", f"{stem}.bin", f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{path}: the diffusers folder {folder} has no weights file: expected {names[0]} or "
                     f"{names[1]} (what save_pretrained writes)")


class _Decoder(torch.nn.Module):
    """latents → samples: ``module.decode(latents / scale)`` (its ``.sample`` for a diffusers autoencoder), or
    ``module(latents / scale)`` for a plain module."""

    def __init__(self, module: torch.nn.Module, scale: float):
        super().__init__()
        self.module, self.scale = module, float(scale)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scale
        out = self.module.decode(z) if hasattr(self.module, "decode") else self.module(z)
        return getattr(out, "sample", out)


def _decoder(path: Path, dec: dict, device: str) -> torch.nn.Module:
    """The card's decoder on ``device`` (weights read weights-only, sha256 checked first where given)."""
    kwargs = dict(dec.get("kwargs", {}))
    if "diffusers" in dec:
        module = _diffusers_module(path, dec, kwargs)
    else:
        module = _factory_network(path, dec, kwargs)
    return _Decoder(module, dec.get("scale", 1.0)).to(device).eval()
