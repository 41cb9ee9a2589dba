"""Planning a sweep's cells from the solvers' own declarations: each solver class declares its paper's grid
(``default_spacing``) and whether it steps in log-SNR (``steps_in_log_snr``); the harness keeps no list of
solver names, so a solver added with these attributes is planned like the built-in ones."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest

import pretrained
import solvers
from bench import plan
from solvers import schedules
from solvers.registry import SOLVERS


def test_every_log_snr_solver_declares_it():
    steps_in_log_snr = {n for n, c in SOLVERS.items() if c.steps_in_log_snr}
    assert steps_in_log_snr == {"dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_2m_sde", "unipc"}
    assert all(c.default_spacing in solvers.SPACINGS for c in SOLVERS.values())


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_2m_sde"])
def test_log_snr_solvers_on_fm_gmm2d_start_below_t_max(solver):
    """Rectified flow has λ(t_max) = −∞: every solver that steps in log-SNR starts at t_max·(1 − 10⁻³) — unipc
    included (it was missing from the harness's name list, and its cells did not fit the model)."""
    card = pretrained.get_card("fm_gmm2d")
    model = pretrained.load("fm_gmm2d")
    t_max = float(model.schedule.t_max)
    assert not math.isfinite(float(model.schedule.log_snr(t_max)))
    (cell,) = plan.plan_cells(card, model, plan.parse_solvers(solver), [5], None)
    assert cell.t_start == pytest.approx(t_max * (1 - 1e-3), rel=1e-12)
    assert cell.grid[0] == pytest.approx(cell.t_start, rel=1e-12) and cell.spacing == "uniform"
    (ref,) = plan.plan_cells(card, model, plan.parse_solvers("dpmpp_2m"), [5], None)
    assert cell.grid == pytest.approx(ref.grid, rel=1e-12)


@pytest.mark.parametrize("solver", ["ddim", "heun", "euler", "deis", "euler_maruyama"])
def test_solvers_that_integrate_in_t_start_at_t_max(solver):
    model = pretrained.load("fm_gmm2d")
    assert plan.default_t_start(model.schedule, solver) is None


def test_default_spacings_come_from_the_solver_classes():
    gmm, cifar = pretrained.get_card("gmm2d"), pretrained.get_card("ddpm_cifar")
    discrete, continuous = schedules.DiscreteVP.linear(1000), schedules.VPLinear()
    assert plan.default_spacing(gmm, discrete, "unipc", 10) == (
        "logsnr", "UniPC: uniform in log-SNR (Zhao et al. 2023, as DPM-Solver++)")
    assert plan.default_spacing(gmm, discrete, "dpmpp", 10) == (
        "logsnr", "DPM-Solver++: uniform in log-SNR (Lu et al. 2022)")
    assert plan.default_spacing(gmm, continuous, "euler", 10)[0] == "karras"
    assert plan.default_spacing(gmm, continuous, "em", 10)[0] == "uniform"
    assert plan.default_spacing(gmm, continuous, "ddim", 10) == ("uniform", "uniform in t")
    assert plan.default_spacing(cifar, continuous, "ddim", 10) == ("uniform", "uniform in t")
    assert plan.default_spacing(cifar, discrete, "ddpm", 10)[0] == "quadratic"   # DDPM inherits DDIM's
    assert plan.default_spacing(gmm, discrete, "deis", 10) == ("logsnr", "library default")


def test_a_new_solver_is_planned_from_its_declarations(monkeypatch):
    """A solver added in one file (its class and its registration) gets its declared grid and the shifted start
    of a log-SNR solver without any harness edit."""
    from solvers.dpmpp import DPMSolverPP2M

    @dataclass(frozen=True)
    class MyLogSNR(DPMSolverPP2M):
        name: ClassVar[str] = "my_logsnr_solver"
        default_spacing: ClassVar[str] = "karras"
        default_spacing_note: ClassVar[str] = "my paper's grid"

    monkeypatch.setitem(SOLVERS, "my_logsnr_solver", MyLogSNR)
    gmm = pretrained.get_card("gmm2d")
    assert plan.default_spacing(gmm, schedules.VPLinear(), "my_logsnr_solver", 4) == ("karras", "my paper's grid")
    fm = pretrained.load("fm_gmm2d")
    assert plan.default_t_start(fm.schedule, "my_logsnr_solver") == pytest.approx(float(fm.schedule.t_max) * 0.999)


def test_register_refuses_an_unknown_default_spacing():
    from solvers.first_order import Euler

    @dataclass(frozen=True)
    class Odd(Euler):
        name: ClassVar[str] = "odd_spacing_solver"
        default_spacing: ClassVar[str] = "geometric"

    with pytest.raises(ValueError, match=r"'odd_spacing_solver' declares the default spacing.*geometric.*valid: uniform"):
        solvers.register(Odd)
    assert "odd_spacing_solver" not in SOLVERS


# -- a cell's options: the user's, over the card's defaults, resolved in full -------------------------------------
def _gmm2d_with_defaults(defaults: dict):
    return dataclasses.replace(pretrained.get_card("gmm2d"), default_solver_options=defaults), pretrained.load("gmm2d")


def test_the_users_options_override_the_cards_defaults_and_the_defaults_fill_the_rest():
    """The card's per-solver defaults are what the model needs unless the user says otherwise: an option given
    on the command line wins, one not given comes from the card, keyed by the canonical solver name (the entry
    "dpmpp" is the solver dpmpp_2m)."""
    card, model = _gmm2d_with_defaults({"ddpm": {"variance": "large"}, "dpmpp_2m": {"lower_order_final": False}})
    cells = plan.plan_cells(card, model, plan.parse_solvers("ddpm,ddpm:variance=small,dpmpp"), [3], None)
    assert [(c.label, c.options["variance"]) for c in cells[:2]] == [("ddpm", "large"), ("ddpm:variance=small", "small")]
    assert cells[0].options["eta"] == cells[1].options["eta"] == solvers.get_solver("ddpm").options()["eta"]
    assert cells[2].solver == "dpmpp_2m" and cells[2].options["lower_order_final"] is False


def test_one_cell_written_two_ways_has_one_key_and_its_options_in_full():
    """The key says what is run (canonical solver, every option resolved), not how it was typed: "dpmpp" and
    "dpmpp_2m:lower_order_final=auto" (its default) are the same cell, so a rerun finds its row either way."""
    card, model = _gmm2d_with_defaults({})
    (short,) = plan.plan_cells(card, model, plan.parse_solvers("dpmpp"), [4], None)
    (spelt,) = plan.plan_cells(card, model, plan.parse_solvers("dpmpp_2m:lower_order_final=auto"), [4], None)
    assert short.options == spelt.options == solvers.get_solver("dpmpp_2m").options()
    assert short.key == spelt.key and short.label != spelt.label
    (other,) = plan.plan_cells(card, model, plan.parse_solvers("dpmpp:lower_order_final=False"), [4], None)
    assert other.key != short.key


def test_a_solver_opt_for_a_canonical_name_reaches_its_alias():
    specs = plan.parse_solvers("dpmpp,ddim", ["dpmpp_2m.lower_order_final=False"])
    assert [(s.label, s.options) for s in specs] == [("dpmpp", {"lower_order_final": False}), ("ddim", {})]


def test_a_papers_grid_for_the_data_set_is_used_on_discrete_schedules_only(monkeypatch):
    """``paper_spacing_by_data`` names a grid of timestep indices, for the paper's discrete model; a solver that
    declares one and a continuous default keeps its default on a continuous schedule."""
    from solvers.heun import Heun

    @dataclass(frozen=True)
    class MyPaperGrid(Heun):
        name: ClassVar[str] = "my_paper_grid_solver"
        default_spacing: ClassVar[str] = "karras"
        default_spacing_note: ClassVar[str] = "my default"
        paper_spacing_by_data: ClassVar[dict] = {"cifar10-train": ("quadratic", "my paper's CIFAR-10 grid")}

    monkeypatch.setitem(SOLVERS, "my_paper_grid_solver", MyPaperGrid)
    cifar = pretrained.get_card("ddpm_cifar")
    assert plan.default_spacing(cifar, schedules.DiscreteVP.linear(1000), "my_paper_grid_solver", 10) == (
        "quadratic", "my paper's CIFAR-10 grid")
    assert plan.default_spacing(cifar, schedules.VPLinear(), "my_paper_grid_solver", 10) == ("karras", "my default")


def test_a_grid_the_model_cannot_be_evaluated_on_is_refused_when_planned():
    """An ε model on rectified flow cannot give x0 at t = 1 (α = 0 there): a uniform grid from t = 1 is refused
    while the cells are planned, naming the cell, not halfway through the sweep."""
    card, _ = _gmm2d_with_defaults({})
    eps_on_flow = solvers.DiffusionModel(lambda x, t: x * 0, schedule=schedules.RectifiedFlow(), prediction="eps")
    with pytest.raises(plan.UsageError, match=r"^cell euler × 4 steps \(uniform spacing\) does not fit gmm2d: euler: "
                                              r"cannot evaluate the model at t=1\.0"):
        plan.plan_cells(card, eps_on_flow, plan.parse_solvers("euler"), [4], "uniform")
    (cell,) = plan.plan_cells(card, eps_on_flow, plan.parse_solvers("dpmpp"), [4], "uniform")   # starts below t = 1
    assert cell.grid[0] < 1.0
