"""solvers.interop.diffusers_config: the method and the grid a diffusers scheduler config describes.

The pure tests need no diffusers; the grid tests compare inference_grid with the installed diffusers
scheduler's own set_timesteps (timesteps and sigmas, to float32 rounding)."""
import numpy as np
import pytest

from solvers.interop import diffusers_config as dc
from solvers.interop.diffusers import schedule_from_config


# -- pure: method, refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source, cfg, solver", [
    ("DDIMScheduler", {}, "ddim"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "dpmpp_3m"),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, "ddim"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ("FlowMatchEulerDiscreteScheduler", {}, "euler"),
    ("HeunDiscreteScheduler", {}, "heun"),
])
def test_method_from_config_names_the_source_method(source, cfg, solver):
    assert dc.method_from_config(cfg, source)[0] == solver


def test_method_from_config_reads_dpm_options_and_lower_order_rule():
    name, options = dc.method_from_config({"solver_type": "heun", "lower_order_final": True},
                                          "DPMSolverMultistepScheduler")
    assert (name, options) == ("dpmpp_2m", {"solver_type": "heun", "lower_order_final": "auto"})


def test_method_from_config_refuses_unknown_class_naming_it():
    with pytest.raises(ValueError, match="LMSDiscreteScheduler has no equivalent solver.*DDIMScheduler"):
        dc.method_from_config({}, "LMSDiscreteScheduler")


def test_method_from_config_refuses_dpmsolver_non_plus_plus():
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver'"):
        dc.method_from_config({"algorithm_type": "dpmsolver"}, "DPMSolverMultistepScheduler")


@pytest.mark.parametrize("cfg, message", [
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas and use_exponential_sigmas"),
    ({"timestep_spacing": "quadratic"}, "timestep_spacing='quadratic'"),
    ({"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ({"invert_sigmas": True}, "invert_sigmas=True"),
])
def test_check_config_refuses_in_one_line_naming_the_key(cfg, message):
    with pytest.raises(ValueError, match=message) as info:
        dc.check_config(cfg, "EulerDiscreteScheduler")
    assert "\n" not in str(info.value)


# -- grids against diffusers' set_timesteps -------------------------------------------------------------------
VP = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
GRIDS = [
    ("DDIMScheduler", {**VP, "timestep_spacing": "leading", "steps_offset": 1}),
    ("DDIMScheduler", {**VP, "timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", {**VP}),
    ("DPMSolverMultistepScheduler", {**VP, "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {**VP, "use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {**VP, "use_exponential_sigmas": True}),
    ("DPMSolverMultistepScheduler", {**VP, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {**VP, "use_karras_sigmas": True}),
    ("DEISMultistepScheduler", {**VP, "timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {**VP, "timestep_spacing": "linspace"}),
    ("EulerDiscreteScheduler", {**VP, "use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", {**VP, "use_beta_sigmas": True}),
    ("EulerDiscreteScheduler", {**VP, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                     "prediction_type": "flow_prediction"}),
]


def _diffusers(cls_name, cfg, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, cls_name)(**cfg)
    sched.set_timesteps(steps)
    ts, sig = sched.timesteps.double().numpy(), sched.sigmas.double().numpy()
    if cls_name == "HeunDiscreteScheduler":  # its duplicated timesteps/sigmas: the grid points only
        ts, sig = ts[::2], np.concatenate([sig[:1], sig[1:-1][::2], sig[-1:]])
    return ts, sig


@pytest.mark.parametrize("cls_name, cfg", GRIDS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items() if k not in VP) or "default")
@pytest.mark.parametrize("steps", [7, 25])
def test_inference_grid_matches_diffusers_set_timesteps(cls_name, cfg, steps):
    if cls_name == "DDIMScheduler":
        pytest.importorskip("diffusers")
        _check_ddim(cfg, steps)
        return
    ts, sig = _diffusers(cls_name, cfg, steps)
    if cls_name == "DPMSolverMultistepScheduler" and cfg.get("use_exponential_sigmas"):
        # diffusers' float32 σ table puts σ_max at t = 998.9999997, truncated to 998; ours (float64) gives 999
        assert ts[0] == 998
        ts = np.concatenate([[999.0], ts[1:]])
    full = {**_defaults(cls_name), **cfg}
    if cls_name == dc.FLOW_SCHEDULER:
        full.setdefault("prediction_type", "flow_prediction")
    dc.check_config(full, cls_name)
    got = dc.inference_grid(full, schedule_from_config(full), steps, counterpart=cls_name)
    # fractional timesteps (Euler, Heun) come from diffusers' float32 log-σ table: 1e-4 relative
    np.testing.assert_allclose(got.network_times, ts[:len(got.network_times)], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.sigmas, sig[:len(got.sigmas)], rtol=1e-5, atol=1e-6)
    assert len(got.grid) == len(got.sigmas) and len(got.network_times) == len(got.grid) - 1


def _defaults(cls_name):
    import inspect
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _check_ddim(cfg, steps):
    """DDIM has no sigmas: its timesteps are the network times, its grid ᾱ those of the timesteps."""
    import diffusers
    sched = diffusers.DDIMScheduler(**cfg)
    sched.set_timesteps(steps)
    full = {**_defaults("DDIMScheduler"), **cfg}
    got = dc.inference_grid(full, schedule_from_config(full), steps, counterpart="DDIMScheduler")
    np.testing.assert_allclose(got.network_times, sched.timesteps.double().numpy(), atol=1e-4)
