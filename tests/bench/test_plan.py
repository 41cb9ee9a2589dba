"""Planning a sweep's cells from the solvers' own declarations: each solver class declares its paper's grid
(``default_spacing``) and whether it steps in log-SNR (``steps_in_log_snr``); the harness keeps no list of
solver names, so a solver added with these attributes is planned like the built-in ones."""
from __future__ import annotations

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
