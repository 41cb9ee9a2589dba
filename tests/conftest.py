"""Shared fixtures of the solver tests: schedules, exact problems and networks with known properties.

Everything here runs on the CPU in float64 and downloads nothing.  The exact problems come from
:mod:`pretrained.analytic`: Gaussian mixtures whose denoiser E[x0 | x_t] is known in closed form, so a
solver's error is measured against the truth, not against another solver.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

import solvers
from pretrained.analytic import GaussianMixture, gaussian, gmm2d
from pretrained.checkpoints import assets_dir, assets_hint
from solvers import schedules

# Every schedule family, with the DiscreteVP time conventions that change the network input.
SCHEDULE_FACTORIES: dict[str, Callable[[], schedules.Schedule]] = {
    "vp_linear": schedules.VPLinear,
    "vp_cosine": schedules.VPCosine,
    "discrete_vp_linear": schedules.DiscreteVP.linear,
    "discrete_vp_cosine": schedules.DiscreteVP.cosine,
    "discrete_vp_unit_time": lambda: schedules.DiscreteVP.linear(time_scale=1.0 / 1000),
    "edm": schedules.EDM,
    "rectified_flow": schedules.RectifiedFlow,
}


# -- offline assets: found through the project's one lookup (DIFFUSION_SOLVERS_ASSETS, else ../shared/assets) ---
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "assets(*paths): needs these paths inside the offline assets folder "
        "(pretrained.checkpoints.assets_dir(): $DIFFUSION_SOLVERS_ASSETS, else ../shared/assets); skipped, "
        "naming the path looked at and the variable, when one is absent")


def skip_unless_asset(relative: str) -> Path:
    """The path of ``relative`` in the offline assets folder; skips the test (naming the path looked at and
    DIFFUSION_SOLVERS_ASSETS) when it is absent."""
    path = assets_dir() / relative
    if not path.exists():
        pytest.skip(f"offline asset absent: {assets_hint(relative)}")
    return path


def pytest_runtest_setup(item):
    for mark in item.iter_markers("assets"):
        for relative in mark.args:
            skip_unless_asset(relative)


@pytest.fixture(scope="session")
def offline_asset() -> Callable[[str], Path]:
    """``offline_asset("ddpm_mnist/ddpm_mnist.pth")`` → its path, or a skip that says where it was looked for
    (for fixtures and helpers; decorate tests with ``@pytest.mark.assets(...)``)."""
    return skip_unless_asset


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread, then restore the setting.

    The tests that use it run thousands of steps on tiny tensors, which gain nothing from threads; on a
    loaded 2-core machine the idle-spinning worker threads made them ~15× slower (0.15 s → 2.4 s measured).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(SCHEDULE_FACTORIES), ids=sorted(SCHEDULE_FACTORIES))
def any_schedule(request) -> schedules.Schedule:
    """Each schedule family in turn (a test using this fixture runs once per schedule)."""
    return SCHEDULE_FACTORIES[request.param]()


@pytest.fixture(params=solvers.available_solvers(aliases=False))
def solver_name(request) -> str:
    """Each registered solver in turn, read from the registry so that a new solver is tested unedited."""
    return request.param


@pytest.fixture(scope="session")
def ring_mixture() -> GaussianMixture:
    """8 Gaussians (std 0.3) on a ring of radius 4 in 2-D: multimodal, exact denoiser."""
    return gmm2d("ring")


@pytest.fixture(scope="session")
def gaussian_2d() -> GaussianMixture:
    """N(0.5·1, 0.7²·I) in 2-D: exact denoiser, flow map and consistency function."""
    return gaussian(dim=2, mean=0.5, std=0.7)


def row_by_row(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Wrap a network so that it evaluates each batch row on its own.

    The wrapped network is batch-invariant by construction, so a test of batch invariance built on it
    checks the solver and the loop, not the network's kernels.
    """

    def wrapped(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[i:i + 1], t[i:i + 1]) for i in range(x.shape[0])])

    return wrapped


@pytest.fixture(scope="session")
def make_row_by_row():
    """The :func:`row_by_row` wrapper, as a fixture (test modules do not import conftest)."""
    return row_by_row


class CallRecorder:
    """A network wrapper that records every call's batch size and (distinct) model times."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.calls: list[tuple[int, list[float]]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], sorted(set(t.tolist()))))
        return self.fn(x, t)


@pytest.fixture
def make_recorder():
    """Build a :class:`CallRecorder` around a network."""
    return CallRecorder


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """bench.run's --threads (and the studies' --threads) set torch's thread count for the whole process: give
    it back after each test, so one test's setting never slows or changes another."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
