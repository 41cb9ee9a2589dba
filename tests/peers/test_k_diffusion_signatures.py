"""k-diffusion's conventions: ``from_k_diffusion`` and the ``sample_NAME(model, x, sigmas, …)`` signature.

The denoiser is exact and cheap: a Gaussian mixture in R^8 (``pretrained.analytic.gmm_nd``) whose
E[x0 | x0 + σ·ε = x] is known in closed form.  Everything is float64, sigmas included (k-diffusion does its
σ arithmetic in the sigmas' dtype), so ours and k-diffusion's samplers agree to float64 rounding.

k-diffusion's samplers come from its ``sampling.py`` loaded by file path (its package ``__init__`` imports
far more than the samplers need); the comparisons skip, saying how to install it, when it is absent.  Noise:
k-diffusion's ancestral/SDE samplers take a ``noise_sampler``, given here our per-sample streams (one draw per
step, as ours); its Heun churn draws ``torch.randn_like`` every step, which the test routes to the same
streams.  ``sample_dpmpp_3m_sde`` (η = 0) is our ``dpmpp_3m`` with its defaults from 6 steps on (φ₂-form
warm-up, no lowered final orders; at fewer steps ours lowers them, by measurement).  Samplers of k-diffusion
that are not ours are not compared: ``sample_lms``, ``sample_dpm_2``, ``sample_dpmpp_sde``.
"""
from __future__ import annotations

import math

import pytest
import torch

import solvers
from pretrained.analytic import gmm_nd
from solvers.interop import from_k_diffusion
from solvers.interop import k_diffusion as K
from solvers.noise import STREAM_SOLVER, SeedStreams

pytestmark = pytest.mark.peer  # its comparisons need k-diffusion (.ci/run's second pass installs it)

MIXTURE = gmm_nd(dim=8, n_components=3, spread=1.5, std=0.4, seed=1)
SEEDS = [10, 11, 12]
TOL = 1e-10
FIXED_GRID = [n for n in solvers.available_solvers(aliases=False) if not solvers.solver_class(n).adaptive]


class Denoiser:
    """D(x, σ) of the mixture, recording every σ it is called at; ``scale`` (an extra argument) multiplies x0."""

    def __init__(self):
        self.levels: list[float] = []

    def __call__(self, x, sigma, scale=1.0):
        s = sigma.reshape(-1)
        assert bool((s == s[0]).all()) and s.numel() == x.shape[0]
        self.levels.append(float(s[0]))
        return MIXTURE.denoise(x, 1.0, float(s[0])) * scale


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling module, loaded by path (its package __init__ is not run)."""
    try:
        return K.load_peer("sampling")
    except ImportError as e:
        pytest.skip(str(e))


def _setup(kd, steps=8):
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0).double()
    x = torch.randn(len(SEEDS), 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    return sigmas, x


def _noise_sampler():
    streams = SeedStreams(SEEDS, STREAM_SOLVER)
    return lambda sigma, sigma_next: streams.randn((8,), dtype=torch.float64)


class _TorchWithOurNoise:
    """``torch`` for k-diffusion's module, with ``randn_like`` drawing from our per-sample streams."""

    def __init__(self):
        self._streams = SeedStreams(SEEDS, STREAM_SOLVER)

    def randn_like(self, x):
        return self._streams.randn(x.shape[1:], dtype=x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


# name: (our solver, our options, k-diffusion sampler, its options, whether it needs our noise)
PAIRS = {
    "euler": ("euler", {}, "sample_euler", {}, None),
    "heun": ("heun", {}, "sample_heun", {}, None),
    "heun_churn": ("heun", {"s_churn": 1.0}, "sample_heun", {"s_churn": 1.0}, "randn_like"),
    "dpmpp_2m": ("dpmpp_2m", {}, "sample_dpmpp_2m", {}, None),
    "dpmpp_2s": ("dpmpp_2s", {}, "sample_dpmpp_2s_ancestral", {"eta": 0.0}, None),
    "dpmpp_3m": ("dpmpp_3m", {}, "sample_dpmpp_3m_sde", {"eta": 0.0}, None),
    "ddim_eta1": ("ddim", {"eta": 1.0}, "sample_euler_ancestral", {"eta": 1.0}, "noise_sampler"),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {"eta": 1.0}, "noise_sampler"),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_sampler_matches_k_diffusion(kd, pair, monkeypatch):
    """sample_NAME from solvers.interop.k_diffusion vs k-diffusion's own sampler on the same denoiser,
    sigmas and noise: the same samples, the same σ levels of every model call, the same callback dicts."""
    ours_name, ours_opts, theirs_name, theirs_opts, noise = PAIRS[pair]
    sigmas, x = _setup(kd)
    if noise == "noise_sampler":
        theirs_opts = {**theirs_opts, "noise_sampler": _noise_sampler()}
    if noise == "randn_like":
        monkeypatch.setattr(kd, "torch", _TorchWithOurNoise())
    their_den, their_calls = Denoiser(), []
    theirs = getattr(kd, theirs_name)(their_den, x.clone(), sigmas, callback=their_calls.append, disable=True,
                                      **theirs_opts)
    our_den, our_calls = Denoiser(), []
    ours = getattr(K, f"sample_{ours_name}")(our_den, x.clone(), sigmas, callback=our_calls.append, disable=True,
                                             seeds=SEEDS, **ours_opts)
    assert our_den.levels == pytest.approx(their_den.levels, rel=1e-12)
    assert [sorted(c) for c in our_calls] == [sorted(c) for c in their_calls]
    for a, b in zip(our_calls, their_calls):
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"])
        assert float(a["sigma_hat"]) == pytest.approx(float(b["sigma_hat"]), rel=1e-12)
        assert (a["x"] - b["x"]).abs().max().item() < TOL and (a["denoised"] - b["denoised"]).abs().max().item() < TOL
    err = (ours - theirs).abs().max().item()
    print(f"{pair}: max |ours − k-diffusion| = {err:.2e}")  # shown with pytest -rP
    assert err < TOL


@pytest.mark.parametrize("name", FIXED_GRID)
def test_every_fixed_grid_solver_has_the_signature_and_is_solvers_sample(name):
    """sample_NAME exists for every registered fixed-grid solver and is solvers.sample on the same denoiser
    (wrapped by from_k_diffusion), grid and seeds."""
    sampler = getattr(K, f"sample_{name}")
    sigmas = [80.0, 20.0, 5.0, 1.0, 0.2, 0.0]
    x = solvers.initial_noise((len(SEEDS), 8), SEEDS, dtype=torch.float64) * 80.0
    ours = sampler(Denoiser(), x, torch.tensor(sigmas, dtype=torch.float64), disable=True, seeds=SEEDS)
    ref = solvers.sample(from_k_diffusion(Denoiser(), 0.002, 80.0), x, name, timesteps=sigmas, steps=None,
                         seeds=SEEDS)
    assert ours.shape == x.shape
    assert (ours - ref.samples).abs().max().item() < TOL


def test_extra_args_reach_the_denoiser():
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.ones(len(SEEDS), 8, dtype=torch.float64)
    plain = K.sample_euler(Denoiser(), x, sigmas, disable=True)
    half = K.sample_euler(Denoiser(), x, sigmas, extra_args={"scale": 0.5}, disable=True)
    # The last step to σ = 0 returns D(x, σ_1) · scale; the first already differs.
    assert (half - plain).abs().max().item() > 1e-3
    model = from_k_diffusion(Denoiser(), 0.002, 80.0, extra_args={"scale": 0.5})
    ref = solvers.sample(model, x, "euler", timesteps=sigmas, steps=None)
    assert (ref.samples - half).abs().max().item() < TOL


def test_stochastic_samplers_draw_their_seeds_from_torch_global_generator():
    """k-diffusion code seeds torch's global generator: the same seed gives the same samples, another seed
    others; deterministic samplers draw nothing from it."""
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.ones(len(SEEDS), 8, dtype=torch.float64)
    torch.manual_seed(0)
    a = K.sample_dpmpp_2m_sde(Denoiser(), x, sigmas, disable=True)
    torch.manual_seed(0)
    b = K.sample_dpmpp_2m_sde(Denoiser(), x, sigmas, disable=True)
    torch.manual_seed(1)
    c = K.sample_dpmpp_2m_sde(Denoiser(), x, sigmas, disable=True)
    assert (a - b).abs().max().item() == 0.0 and (a - c).abs().max().item() > 1e-3
    state = torch.get_rng_state()
    K.sample_dpmpp_3m(Denoiser(), x, sigmas, disable=True)
    assert torch.equal(state, torch.get_rng_state())


def test_k_diffusion_options_pass_only_at_their_neutral_values():
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.ones(2, 8, dtype=torch.float64)
    neutral = K.sample_euler(Denoiser(), x, sigmas, disable=True, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                             s_noise=1.0, noise_sampler=None)
    assert (neutral - K.sample_euler(Denoiser(), x, sigmas, disable=True)).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="s_churn=1.0 asks for something euler does not do"):
        K.sample_euler(Denoiser(), x, sigmas, disable=True, s_churn=1.0)
    with pytest.raises(ValueError, match="noise_sampler is not supported.*seeds="):
        K.sample_ddim(Denoiser(), x, sigmas, disable=True, eta=1.0, noise_sampler=lambda s, t: x)
    with pytest.raises(TypeError, match="has no option"):
        K.sample_dpmpp_2m(Denoiser(), x, sigmas, disable=True, order=3)


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 2.0, 0.0], [5.0, 5.0, 0.0], [5.0, 1.0, -0.1], [math.nan, 0.0]])
def test_bad_sigmas_are_refused_before_any_model_call(sigmas):
    den = Denoiser()
    with pytest.raises(ValueError, match="strictly decreasing noise levels ending at >= 0"):
        K.sample_euler(den, torch.ones(2, 8), torch.tensor(sigmas), disable=True)
    assert den.levels == []


def test_adaptive_and_unknown_samplers_are_refused():
    with pytest.raises(ValueError, match="chooses its own steps"):
        K.k_diffusion_sampler("adaptive")
    assert not hasattr(K, "sample_adaptive")
    with pytest.raises(AttributeError, match="^no sample_adaptive: 'adaptive' chooses its own steps"):
        K.sample_adaptive  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'sample_nonexistent'$"):
        K.sample_nonexistent  # noqa: B018
    assert K.sample_em.__name__ == "sample_em"  # aliases resolve too


def test_from_k_diffusion_checks_its_arguments():
    with pytest.raises(TypeError, match=r"^denoiser must be callable as denoiser\(x, sigma\), got int$"):
        from_k_diffusion(3, 0.002, 80.0)
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        from_k_diffusion(Denoiser(), 80.0, 0.002)
    model = from_k_diffusion(Denoiser(), 0.002, 80.0)
    assert (model.prediction, model.schedule.sigma_min, model.schedule.sigma_max) == ("x0", 0.002, 80.0)
    other = from_k_diffusion(Denoiser(), 0.01, 120.0).schedule
    assert (other.sigma_min, other.sigma_max) == (0.01, 120.0)


def _x(n=len(SEEDS)):
    return solvers.initial_noise((n, 8), range(n), dtype=torch.float64) * 10.0


def test_k_diffusion_sampler_builds_the_same_sampler_as_the_module_attribute(capsys):
    """k_diffusion_sampler(name) (also what __getattr__ returns for a solver registered later) is the module's
    sample_NAME: same samples, name and first docstring line as the solver class; callback and disable reach it."""
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    calls = []
    K.k_diffusion_sampler("euler")(Denoiser(), _x(), sigmas, callback=calls.append, disable=True)
    assert [d["i"] for d in calls] == [0, 1, 2] and capsys.readouterr().err == ""
    for name in ("heun", "ddim"):
        built = K.k_diffusion_sampler(name)
        a = built(Denoiser(), _x(), sigmas, extra_args={"scale": 0.5}, disable=True, seeds=SEEDS, eta=1.0) \
            if name == "ddim" else built(Denoiser(), _x(), sigmas, extra_args={"scale": 0.5}, disable=True)
        b = getattr(K, f"sample_{name}")(Denoiser(), _x(), sigmas, extra_args={"scale": 0.5}, disable=True,
                                         **({"seeds": SEEDS, "eta": 1.0} if name == "ddim" else {}))
        assert torch.equal(a, b)
        assert built.__name__ == f"sample_{name}"
        assert built.__doc__.splitlines()[0] == solvers.solver_class(name).__doc__.splitlines()[0]


def test_sigmas_as_a_list_and_two_levels():
    """sigmas may be a list of floats; two levels [σ, 0] are one step, which for Euler lands on D(x, σ)."""
    x = _x()
    as_list = K.sample_euler(Denoiser(), x, [10.0, 1.0, 0.0], disable=True)
    assert torch.equal(as_list, K.sample_euler(Denoiser(), x, torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64),
                                               disable=True))
    one_step = K.sample_euler(Denoiser(), x, [10.0, 0.0], disable=True)
    assert torch.allclose(one_step, MIXTURE.denoise(x, 1.0, 10.0), rtol=0, atol=1e-12)


def test_solver_options_reach_the_solver():
    """official_d2 changes 3M's third-order steps (8 steps: no lowered final orders)."""
    sigmas = [10.0, 6.0, 3.5, 2.0, 1.2, 0.7, 0.4, 0.2, 0.0]
    ours = K.sample_dpmpp_3m(Denoiser(), _x(), torch.tensor(sigmas, dtype=torch.float64), disable=True,
                             official_d2=False)
    ref = solvers.sample(from_k_diffusion(Denoiser(), 0.002, 80.0), _x(), "dpmpp_3m", timesteps=sigmas, steps=None,
                         official_d2=False)
    assert (ours - ref.samples).abs().max().item() < TOL
    assert (ours - K.sample_dpmpp_3m(Denoiser(), _x(), torch.tensor(sigmas, dtype=torch.float64),
                                     disable=True)).abs().max().item() > 1e-6


def test_a_solver_stochastic_by_an_option_draws_one_seed_per_sample_from_torch_global_generator():
    """ddim is stochastic only with eta > 0: its seeds are then drawn from torch's global generator too, one per
    sample — 64 equal starting states end as 64 different samples."""
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.ones(64, 8, dtype=torch.float64)
    torch.manual_seed(0)
    a = K.sample_ddim(Denoiser(), x, sigmas, disable=True, eta=1.0)
    torch.manual_seed(1)
    b = K.sample_ddim(Denoiser(), x, sigmas, disable=True, eta=1.0)
    assert (a - b).abs().max().item() > 1e-3
    assert len({tuple(row.tolist()) for row in a}) == 64


def test_the_callback_gets_k_diffusion_dict_at_each_step_first_model_call():
    """Once per step, after it: i, the given σ_i (the sigmas' own element), σ̂ and the state and model output of
    the step's first model call — for Heun (2 calls per step) D(x_i, σ_i); with churn σ̂ = σ_i·(1 + γ) > σ_i."""
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    seen = []
    out = K.sample_heun(Denoiser(), _x(), sigmas, disable=True, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert all(torch.equal(d["sigma"], sigmas[d["i"]]) and d["sigma_hat"] == d["sigma"] for d in seen)
    assert torch.equal(seen[0]["x"], _x())
    assert torch.allclose(seen[0]["denoised"], MIXTURE.denoise(_x(), 1.0, 10.0), rtol=0, atol=1e-12)
    # Without a callback: the same samples.
    assert torch.equal(out, K.sample_heun(Denoiser(), _x(), sigmas, disable=True))
    churned = []
    K.sample_heun(Denoiser(), _x(), sigmas, disable=True, callback=churned.append, s_churn=0.3, seeds=SEEDS)
    assert churned[0]["sigma_hat"].item() == pytest.approx(10.0 * 1.1, rel=1e-12)  # γ = s_churn / 3 steps


@pytest.mark.parametrize("sigmas", [[10.0, 3.0, 0.0], torch.tensor([10.0, 3.0, 0.0], dtype=torch.float32),
                                    torch.tensor([10.0, 3.0, 0.0], dtype=torch.float64)])
def test_the_callback_sigmas_are_tensors_in_the_sigmas_dtype_for_one_sample_too(sigmas):
    """As k-diffusion's (sigmas[i], and σ̂ computed from it): tensors in the sigmas' dtype — a list gives
    torch's default dtype — also for a batch of one sample."""
    seen = []
    K.sample_euler(Denoiser(), _x(1), sigmas, disable=True, callback=seen.append)
    dtype = sigmas.dtype if torch.is_tensor(sigmas) else torch.get_default_dtype()
    assert [d["sigma"].item() for d in seen] == [10.0, 3.0]
    assert all(d["sigma"].dtype == d["sigma_hat"].dtype == dtype for d in seen)


def test_heun_churn_is_never_capped_at_the_first_level():
    """k-diffusion's Heun raises σ to σ·(1 + γ) even above the first level (up to √2·σ_0): the adapter's
    schedule must reach that far, so it equals our Heun on a schedule whose σ_max is far above it."""
    sigmas = [80.0, 20.0, 5.0, 1.0, 0.0]
    ours = K.sample_heun(Denoiser(), _x() * 8, torch.tensor(sigmas, dtype=torch.float64), disable=True,
                         s_churn=10.0, seeds=SEEDS)
    ref = solvers.sample(from_k_diffusion(Denoiser(), 0.002, 1000.0), _x() * 8, "heun", timesteps=sigmas,
                         steps=None, s_churn=10.0, seeds=SEEDS)
    assert (ours - ref.samples).abs().max().item() < TOL


@pytest.mark.parametrize("disable, shown", [(True, False), (False, True), (None, True)])
def test_disable_turns_the_progress_bar_off(disable, shown, capsys):
    K.sample_euler(Denoiser(), _x(), [10.0, 1.0, 0.0], disable=disable)
    assert ("euler (2 steps)" in capsys.readouterr().err) == shown
