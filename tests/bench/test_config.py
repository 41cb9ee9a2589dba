"""bench.config: argv → one frozen SweepConfig with the model card's defaults filled in, the parsed command line
left as it was, and a value chosen later (--batch-size auto) made as a new config."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import pretrained
from bench import run as run_mod
from bench.config import SweepConfig, make_config, parse_repeats
from bench.plan import UsageError
from bench.sweep import Sweep, apply_fast_paths, load_and_plan
from solvers.optimize import MAX_STEPS


def _config(*argv: str, world: int = 1) -> tuple[SweepConfig, object]:
    args = run_mod.build_parser().parse_args(list(argv))
    return make_config(args, pretrained.get_card(args.model), world), args


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


def _cfg(*argv: str, world: int = 1) -> SweepConfig:
    return _config(*argv, world=world)[0]


# -- the checks' edges: the smallest value allowed is allowed --------------------------------------------------------
def test_the_smallest_sizes_allowed_are_allowed_and_one_less_is_refused():
    assert _cfg("--num-samples", "2", "--reference-size", "2").reference_size == 2
    assert _cfg("--num-samples", "3", world=3).num_samples == 3       # one sample per process
    with pytest.raises(UsageError, match="^--num-samples 2 is fewer than the 3 processes$"):
        _cfg("--num-samples", "2", world=3)
    for n in ("0", "1"):    # never replaced by the card's default
        with pytest.raises(UsageError, match=f"^--num-samples must be at least 2 .*, got {n}$"):
            _cfg("--num-samples", n)


def test_the_optimisers_step_limit_applies_to_optimized_spacing_only():
    assert _cfg("--spacing", "optimized", "--solvers", "dpmpp_2m", "--steps", f"{MAX_STEPS}").steps == (MAX_STEPS,)
    assert _cfg("--steps", f"{MAX_STEPS + 1}").steps == (MAX_STEPS + 1,)


@pytest.mark.parametrize("flag", ["--compile", "--cuda-graph"])
def test_each_fast_path_is_refused_for_a_conditional_model_by_its_own_name(flag):
    with pytest.raises(UsageError, match=f"^{flag} cannot be used with cfg_mnist: a class-conditional model"):
        _cfg("--model", "cfg_mnist", flag, *(["default"] if flag == "--compile" else []))


def test_an_empty_solver_or_metric_list_is_refused_not_defaulted():
    with pytest.raises(UsageError, match="^--solvers is empty; valid: "):
        _cfg("--solvers", "")
    with pytest.raises(UsageError, match="^no metric given; metrics for gmm2d: fd_data, swd, ode_error, ref_error$"):
        _cfg("--metric", ",")


def test_float64_is_the_default_for_analytic_models_only():
    """Solver error is measured exactly (float64) where the model is analytic; a learned point model's network
    runs in float32 like any other network."""
    assert _cfg("--model", "gmm2d").dtype == "float64"
    assert pretrained.get_card("fm_gmm2d").kind == "points" and _cfg("--model", "fm_gmm2d").dtype == "float32"


def test_repeats_auto_in_any_case():
    assert parse_repeats("auto") is parse_repeats(" AUTO ") is parse_repeats(None) is None
    assert parse_repeats("3") == 3
