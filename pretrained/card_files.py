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
"""
from __future__ import annotations

import dataclasses
import json
import os
import string
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import solvers

from .cards import ModelCard
from .checkpoints import assets_dir, read_state_dict, verify_file
from .user_models import NO_REFERENCE, import_object, to_images_in_range as _to_images, user_card

__all__ = ["card_from_toml", "read_card_file", "TOML_KEYS"]

TOML_KEYS = {
    "": ("name", "description", "sample_shape", "prediction", "data_range", "reference", "default_num_samples",
         "default_batch_size", "notes", "network", "schedule", "model", "decoder"),
    "network": ("factory", "diffusers", "loader", "kwargs", "weights", "sha256", "dtype"),
    "model": ("clip_x0", "dynamic_threshold"),
    "decoder": ("factory", "diffusers", "kwargs", "weights", "sha256", "scale", "data_shape", "name"),
}
NETWORK_KINDS = ("factory", "diffusers", "loader")


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the card file {path} ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML ({e})") from None


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
    for section in ("network", "model", "decoder"):
        if not isinstance(data.get(section, {}), dict):
            raise ValueError(f"{path}: {section} must be a table ([{section}])")
        _check_keys(path, data.get(section, {}), section)
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
    if kinds[0] != "loader":
        if "schedule" not in data:
            raise ValueError(f"{path}: a [schedule] table is required (name = … with its parameters, or "
                             "scheduler_config = …)")
        if "prediction" not in data and "scheduler_config" not in data["schedule"]:
            raise ValueError(f"{path}: prediction is required (one of {', '.join(solvers.PREDICTIONS)})")
    return data


def _expand(path: Path, value: str) -> Path:
    """A path from the card: ``${ASSETS}`` and environment variables expanded, relative to the card's folder."""
    try:
        text = string.Template(value).substitute({**os.environ, "ASSETS": str(assets_dir())})
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
    beside = _expand(path, value)
    return str(beside) if looks_like_path or beside.exists() else value


def _load(path: Path, data: dict, device: str, options: dict) -> solvers.DiffusionModel:
    """Build the card's model: the network (weights read weights-only), then schedule and parameterisation."""
    net = data["network"]
    kwargs = {**net.get("kwargs", {}), **options}
    if "loader" in net:
        if "weights" in net:
            kwargs.setdefault("weights", _expand(path, net["weights"]))
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
        config = json.loads(_expand(path, sched["scheduler_config"]).read_text())
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
    module = import_object(net["factory"])(**kwargs)
    if "weights" in net:
        weights = _expand(path, net["weights"])
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
    """The diffusers model saved in the folder ``net["diffusers"]`` (its class named by its config.json)."""
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"{path}: a diffusers model folder needs diffusers (pip install "
                         "'diffusion-solvers[hub]')") from None
    folder = _expand(path, net["diffusers"])
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: {folder} is not a diffusers model folder (no config.json)")
    cls_name = json.loads((folder / "config.json").read_text()).get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"{path}: {folder}/config.json names class {cls_name!r}, which diffusers does not have")
    # from_pretrained reads safetensors, or torch files with weights_only=True (diffusers' load_state_dict)
    # low_cpu_mem_usage=False: the default asks for the optional package accelerate, and says so on stderr
    return cls.from_pretrained(str(folder), **{"low_cpu_mem_usage": False, **kwargs})


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
