"""bench.config: argv → one frozen SweepConfig with the model card's defaults filled in, the parsed command line
left as it was, and a value chosen later (--batch-size auto) made as a new config."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import pretrained
from bench import run as run_mod
from bench.config import SweepConfig, make_config
from bench.plan import UsageError
from bench.sweep import Sweep, apply_fast_paths, load_and_plan


def _config(*argv: str) -> tuple[SweepConfig, object]:
    args = run_mod.build_parser().parse_args(list(argv))
    return make_config(args, pretrained.get_card(args.model)), args


def test_card_defaults_fill_the_config_and_the_parsed_arguments_stay_as_typed():
    card = pretrained.get_card("gmm2d")
    cfg, args = _config("--steps", "5,2", "--solvers", "ddim,heun")  # steps come sorted
    assert cfg.num_samples == card.default_num_samples and cfg.batch_size == card.default_batch_size
    assert cfg.dtype == "float64" and cfg.out_dir == Path("runs") / "gmm2d"
    assert cfg.steps == (2, 5) and [s.label for s in cfg.specs] == ["ddim", "heun"]
    assert cfg.repeats is None and cfg.network == "eager"
    # nothing is written back into the namespace (it was, in place, before the config existed)
    assert args.num_samples is None and args.batch_size is None and args.repeats == "auto"


def test_the_config_is_frozen():
    cfg, _ = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_samples = 3
    assert hash(cfg.steps) == hash(tuple(cfg.steps))


def test_weights_join_the_loader_options_once():
    cfg, _ = _config("--model-opt", "a=1", "--weights", "w.pt")
    assert cfg.model_kwargs == {"a": 1, "weights": "w.pt"}
    assert cfg.model_options_json() == '{"a": 1, "weights": "w.pt"}'
    cfg.model_kwargs["a"] = 2  # a fresh dict each time: the config cannot be changed through it
    assert cfg.model_kwargs["a"] == 1
    with pytest.raises(UsageError, match="give the weights once"):
        _config("--model-opt", "weights=a.pt", "--weights", "b.pt")


@pytest.mark.parametrize("argv, message", [
    (("--num-samples", "1"), "--num-samples must be at least 2"),
    (("--reference-size", "1"), "--reference-size must be at least 2"),
    (("--repeats", "0"), "--repeats must be a positive number"),
    (("--batch-size", "x"), "batch"),
    (("--metric", "nope"), "nope"),
    (("--steps", "0"), "steps"),
])
def test_bad_values_are_refused_when_the_config_is_made(argv, message):
    with pytest.raises(UsageError, match=message):
        _config(*argv)


def test_batch_size_auto_makes_a_new_config(tmp_path):
    sweep = run_mod.set_up(run_mod.build_parser().parse_args(
        ["--batch-size", "auto", "--num-samples", "64", "--steps", "2", "--solvers", "ddim", "--quiet",
         "--out", str(tmp_path)]))
    before = sweep.cfg
    load_and_plan(sweep)
    apply_fast_paths(sweep)
    assert before.batch_size == "auto"
    assert isinstance(sweep.cfg.batch_size, int) and 1 <= sweep.cfg.batch_size <= 64
    assert before.model_digest == "" and len(sweep.cfg.model_digest) == 32  # what the loaded model is
    assert dataclasses.replace(sweep.cfg, batch_size="auto", model_digest="") == before
    assert isinstance(sweep, Sweep) and sweep.cells and sweep.model is not None


@pytest.mark.parametrize("model, expected", [("gmm2d", ["ddim", "dpmpp", "heun", "ddpm"]),
                                             ("cm_mnist", ["consistency"]), ("cd_imagenet64_l2", ["consistency"])])
def test_without_solvers_a_consistency_model_runs_its_own_sampler(model, expected):
    cfg, _ = _config("--model", model)
    assert [s.label for s in cfg.specs] == expected
    cfg, _ = _config("--model", model, "--solvers", "euler")   # asked for: always what was asked
    assert [s.label for s in cfg.specs] == ["euler"]
