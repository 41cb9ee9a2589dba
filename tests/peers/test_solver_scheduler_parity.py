"""``SolverScheduler.from_config(reference.config)`` — the method and grid read from the config — samples as the
diffusers scheduler it came from, for every config key that changes the method, the grid or the output.

The loop is the pipelines' (``init_noise_sigma``, ``scale_model_input``, ``step``), on a network whose output
depends on x and t.  diffusers builds its σ tables in float32 and ours are float64, so the two differ by that
rounding carried along the run: asserted to 1e-5 of the samples' size (1e-4 in the pipelines' own tests).
"""
from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from solvers.interop import SolverScheduler  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

D = diffusers
# (diffusers scheduler, its config, the solver the config must be read as)
CASES = [
    (D.DDIMScheduler, dict(clip_sample=False), "ddim"),
    (D.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), "ddim"),
    (D.DDPMScheduler, dict(), "ddpm"),
    (D.DDPMScheduler, dict(variance_type="fixed_large", prediction_type="v_prediction"), "ddpm"),
    (D.DPMSolverMultistepScheduler, dict(), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(solver_order=3), "dpmpp_3m"),
    (D.DPMSolverMultistepScheduler, dict(solver_type="heun", timestep_spacing="leading", steps_offset=1), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(solver_order=1), "ddim"),
    (D.DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", lower_order_final=False), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction"), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(lambda_min_clipped=-5.1), "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5),
     "dpmpp_2m"),
    (D.DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
     "dpmpp_2m"),
    (D.UniPCMultistepScheduler, dict(), "unipc"),
    (D.UniPCMultistepScheduler, dict(solver_order=3), "unipc"),
    (D.UniPCMultistepScheduler, dict(use_karras_sigmas=True), "unipc"),
    (D.UniPCMultistepScheduler, dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), "unipc"),
    (D.UniPCMultistepScheduler, dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), "unipc"),
    (D.UniPCMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
     "unipc"),
    (D.DEISMultistepScheduler, dict(), "deis"),
    (D.DEISMultistepScheduler, dict(solver_order=3), "deis"),
    (D.EulerDiscreteScheduler, dict(), "euler"),
    (D.EulerDiscreteScheduler, dict(use_karras_sigmas=True), "euler"),
    (D.EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1), "euler"),
    (D.EulerDiscreteScheduler, dict(final_sigmas_type="sigma_min", timestep_spacing="trailing"), "euler"),
    (D.HeunDiscreteScheduler, dict(), "heun"),
    (D.HeunDiscreteScheduler, dict(use_karras_sigmas=True), "heun"),
    (D.FlowMatchEulerDiscreteScheduler, dict(shift=3.0), "euler"),
]


def _run(sched, steps, **set_kwargs):
    """The pipelines' loop from a fixed start; a generator for the stochastic steps (DDPM)."""
    sched.set_timesteps(steps, **set_kwargs)
    x = torch.linspace(-1, 1, 96).reshape(2, 3, 4, 4) * getattr(sched, "init_noise_sigma", 1.0)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(0.3 * xin * (t / 1000) - 0.1, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("cls, config, solver", CASES, ids=[f"{c.__name__[:-9]}-{i}" for i, (c, _, _) in
                                                           enumerate(CASES)])
def test_the_config_is_read_as_its_scheduler_and_samples_alike(cls, config, solver, steps):
    reference = cls(**config)
    sched = SolverScheduler.from_config(reference.config)
    assert sched.solver.name == solver
    ours, theirs = _run(sched, steps), _run(reference, steps)
    assert torch.isfinite(theirs).all()
    # Fractional timesteps come from diffusers' float32 σ table: equal to ~1e-5 of their size.
    assert sched.timesteps.tolist() == pytest.approx(reference.timesteps.tolist(), abs=1e-2)
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())


def test_beta_sigmas_at_many_steps():
    """Beta sigmas (Lee et al. 2024) on DPM-Solver++(2M).  Not at few steps: there the last level is the table's
    σ_min, which diffusers' float32 ᾱ_0 = 1 − 1e-4 carries with a rounding error that the last step amplifies."""
    reference = D.DPMSolverMultistepScheduler(use_beta_sigmas=True)
    sched = SolverScheduler.from_config(reference.config)
    ours, theirs = _run(sched, 25), _run(reference, 25)
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


def test_ddim_trailing_steps_to_its_next_timestep_where_diffusers_steps_t_minus_n_over_steps():
    """diffusers' DDIMScheduler steps from t to t − N // steps whatever the spacing, so with trailing spacing at 7
    steps it leaves its own list (999 → 857, listed 856).  Ours steps along the list it publishes."""
    reference = D.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    sched = SolverScheduler.from_config(reference.config)
    sched.set_timesteps(7)
    reference.set_timesteps(7)
    assert sched.timesteps.tolist() == reference.timesteps.tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert sched.grid == [999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0, -1.0]
    assert (_run(sched, 10) - _run(reference, 10)).abs().max() <= 1e-4 * 80  # at 10 steps the two rules agree


def test_dynamic_shifting_takes_the_pipelines_mu():
    reference = D.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched = SolverScheduler.from_config(reference.config)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True needs mu"):
        sched.set_timesteps(5)
    ours, theirs = _run(sched, 5, mu=0.8), _run(reference, 5, mu=0.8)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_custom_timesteps_and_sigmas_are_diffusers_lists():
    """set_timesteps(timesteps=…) on a multistep config and sigmas=… on a flow config run the given lists, as the
    diffusers schedulers do."""
    reference = D.DPMSolverMultistepScheduler()
    sched = SolverScheduler.from_config(reference.config)
    custom = [999, 700, 420, 200, 60]
    assert (_run(sched, None, timesteps=custom) - _run(reference, None, timesteps=custom)).abs().max() <= 1e-4
    flow = D.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = SolverScheduler.from_config(flow.config)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    assert (_run(sched, None, sigmas=sigmas) - _run(flow, None, sigmas=sigmas)).abs().max() <= 1e-5


@pytest.mark.parametrize("config, key", [
    (dict(timestep_type="log"), "timestep_type"), (dict(invert_sigmas=True), "invert_sigmas"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "use_karras_sigmas and use_exponential_sigmas"),
    (dict(interpolation_type="log_linear"), "interpolation_type"), (dict(timestep_spacing="uniform"), "uniform")])
def test_a_key_that_cannot_be_honoured_is_refused_by_name(config, key):
    """Refused at construction, in one line naming the key (a config edited by hand included: diffusers would
    refuse two sigma families in its own constructor)."""
    cfg = {k: v for k, v in {**D.EulerDiscreteScheduler().config, **config}.items() if k != "_use_default_values"}
    with pytest.raises(ValueError, match=key):
        SolverScheduler.from_config(cfg)


def test_a_method_this_library_lacks_is_refused_with_the_remedy():
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver'.*pass solver="):
        SolverScheduler.from_config(D.DPMSolverMultistepScheduler(algorithm_type="dpmsolver",
                                                                  final_sigmas_type="sigma_min").config)
    with pytest.raises(ValueError, match="LMSDiscreteScheduler has no equivalent solver here; pass solver="):
        SolverScheduler.from_config(D.LMSDiscreteScheduler())
    sched = SolverScheduler.from_config(D.LMSDiscreteScheduler(), solver="dpmpp_2m")
    assert sched.solver.name == "dpmpp_2m"
    # LMS, KDPM2 and KDPM2Ancestral configs have the same keys and different defaults: a bare config says which
    # only through _class_name (which configs loaded from files carry).
    with pytest.raises(ValueError, match="could come from any of LMSDiscreteScheduler, KDPM2DiscreteScheduler"):
        SolverScheduler.from_config(D.LMSDiscreteScheduler().config, solver="dpmpp_2m")
    sched = SolverScheduler.from_config({**D.KDPM2DiscreteScheduler().config, "_class_name": "KDPM2DiscreteScheduler"},
                                        solver="dpmpp_2m")
    assert sched.effective_config["beta_start"] == 0.00085


def test_options_that_contradict_the_config_win_and_are_named():
    cfg = D.UniPCMultistepScheduler(solver_order=3).config
    with pytest.warns(UserWarning, match="override the config's solver_order"):
        sched = SolverScheduler.from_config(cfg, solver="unipc", solver_order=2)
    assert sched.solver.solver_order == 2
    with pytest.warns(UserWarning, match="solver_order"):
        SolverScheduler.from_config(D.DPMSolverMultistepScheduler(solver_order=3).config, solver="dpmpp_2m")


def test_zero_terminal_snr_is_honoured_with_a_decreasing_table():
    """rescale_betas_zero_snr: Lin et al.'s rescaled ᾱ, the last one raised from 0 to min(2⁻²⁴, ᾱ_{T−1}/2) —
    diffusers' σ schedulers use 2⁻²⁴, above ᾱ_{T−1} here, which leaves their table not decreasing."""
    reference = D.EulerDiscreteScheduler(rescale_betas_zero_snr=True)
    sched = SolverScheduler.from_config(reference.config)
    ours, theirs = sched.alphas_cumprod.double(), reference.alphas_cumprod.double()
    assert torch.allclose(ours[:-1], theirs[:-1], rtol=1e-4, atol=1e-9)
    assert float(theirs[-1]) == 2.0 ** -24 > float(theirs[-2])
    assert float(ours[-1]) == pytest.approx(float(ours[-2]) / 2, rel=1e-6)
