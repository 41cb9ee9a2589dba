"""Our solvers inside unmodified diffusers pipelines (``SolverScheduler``), and diffusers networks as models
(``from_diffusers``).

Everything is built offline from tiny random components: a ``UNet2DModel`` for ``DDPMPipeline`` and
``DDIMPipeline``; a ``UNet2DConditionModel``, an ``AutoencoderKL``, a ``CLIPTextModel`` and a tokenizer over a
26-letter vocabulary for ``StableDiffusionPipeline`` (latent diffusion with classifier-free guidance).

Three kinds of check:

* identity — the scheduler replays the solver's own step, so a pipeline run gives the images of
  :func:`solvers.sample` on the same model, grid and noise (observed: bit for bit; asserted to 1e-6);
* parity — the pipeline with our solver against the same pipeline with diffusers' own scheduler configured
  alike.  diffusers builds its β/ᾱ tables in float32, ours are float64: the samples differ by that rounding
  amplified along the run (a random network's x0 estimates reach |x| ≈ 45 here), observed ≤ 3e-5, asserted
  to 1e-4;
* the pipeline's own conventions — its ``generator``, ``eta`` and other step arguments, progress bars.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers", reason="the Stable Diffusion tests need transformers "
                                   "(pip install -e '.[test]')")

import solvers  # noqa: E402
from solvers.interop import SolverScheduler, from_diffusers, model_from_config, schedule_from_config  # noqa: E402
from solvers.noise import STREAM_SOLVER, SeedStreams  # noqa: E402
from tests.peers.tiny_pipelines import tiny_sd_components, tiny_unet  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SEEDS = [0, 1]
PARITY_TOL = 1e-4
FIXED_GRID = [n for n in solvers.available_solvers(aliases=False) if not solvers.solver_class(n).adaptive]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(pipeline, prompt_embeds, negative_prompt_embeds, latents, scheduler config) of a tiny Stable Diffusion."""
    pipe = diffusers.StableDiffusionPipeline(**tiny_sd_components(tmp_path_factory.mktemp("tok")))
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, negative = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["", ""])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe, prompt_embeds, negative, latents, pipe.scheduler.config


def _sd_call(sd, scheduler, steps, **kwargs):
    pipe, pe, ne, latents, _ = sd
    pipe.scheduler = scheduler
    kwargs.setdefault("latents", latents)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=7.5, num_inference_steps=steps,
                output_type="latent", **kwargs).images


def _drive(sched, net, x_T, generator=None, **step_kwargs):
    """The loop of the diffusers pipelines: network at each timestep, then ``step``."""
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        with torch.no_grad():
            out = net(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


# -- identity: the replayed solver is solvers.sample -------------------------------------------------------
@pytest.mark.parametrize("name, options", [(n, {"steps_per_level": 2} if n == "langevin" else {}) for n in FIXED_GRID]
                         + [("heun", {"s_churn": 2.0, "s_tmax": 10.0})])
def test_every_fixed_grid_solver_in_the_scheduler_is_solvers_sample(unet, name, options):
    """Driven like a pipeline, the scheduler gives solvers.sample's samples on its grid, with the noise of
    per-sample generators (``SeedStreams(...).generators``, the streams solvers.sample draws from); its
    ``timesteps`` list every evaluation, ``order`` the evaluations per step.  Heun's churn (levels 1 … 3 of
    the grid 750, 500, 250, 0: σ/α = 17.4 is above s_tmax) changes the state before the step's first
    evaluation: the pipeline is handed the churned state."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler(clip_sample=False).config, solver=name, **options)
    sched.set_timesteps(4)
    x_T = solvers.initial_noise((2, 3, 8, 8), SEEDS)
    ours = _drive(sched, unet, x_T, generator=SeedStreams(SEEDS, STREAM_SOLVER).generators)
    ref = solvers.sample(from_diffusers(unet, sched), x_T, name, timesteps=sched.grid, steps=None, seeds=SEEDS,
                         **options)
    assert len(sched.timesteps) == ref.nfe
    assert sched.order == (2 if name in ("heun", "dpmpp_2s", "pc", "langevin") else 1)
    assert (ours - ref.samples).abs().max().item() <= 1e-6


def test_two_evaluation_solver_lists_its_evaluation_times(unet):
    """Heun on a 3-step grid ending at σ = 0: evaluations at t0, t1 (Euler end), t1, t2, t2 — the last step is
    a single evaluation — and the network times are diffusers' HeunDiscreteScheduler's for the same config."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="heun")
    sched.set_timesteps(3)
    g = sched.grid
    assert g[-1] == -1.0 and len(g) == 4
    reference = diffusers.HeunDiscreteScheduler(beta_start=1e-4, beta_end=0.02)
    reference.set_timesteps(3)
    assert sched.timesteps.tolist() == pytest.approx(reference.timesteps.tolist(), abs=1e-4)
    n = sched.timesteps.tolist()
    assert n[1] == n[2] and n[3] == n[4]


def test_adaptive_solver_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="chooses its step sizes at run time"):
        SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="adaptive")


def test_churn_where_a_run_begins_is_refused_with_the_remedy():
    """A pipeline evaluates the state it begins with itself, so a run cannot begin (img2img's begin index) at a
    step that churns before its first evaluation; the message gives that level to keep out of the churn range.
    From the grid's top level (t = 999, the schedule's end) Heun cannot churn, so a run from there is fine."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="heun", s_churn=2.0)
    sched.set_timesteps(4)
    x = torch.zeros(1, 3, 8, 8)
    sched.step(x, sched.timesteps[0], x)
    level = float(sched.sigmas[1])  # diffusers' σ = σ/α at the grid's second level
    sched.set_timesteps(4)
    sched.set_begin_index(sched.order)
    with pytest.raises(ValueError, match=rf"s_tmax below σ/α = {level:.4g}\)"):
        sched.step(x, sched.timesteps[sched.order], x)


def test_unknown_option_names_the_solver_and_grid_options():
    with pytest.raises(TypeError, match="official_d2.*grid options: spacing"):
        SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="dpmpp_2m", official_d2=True)


def test_a_step_may_begin_anywhere_and_before_set_timesteps_the_grid_is_every_trained_timestep(unet):
    """As diffusers' schedulers: before set_timesteps the grid is every trained timestep (999 → 998); a timestep
    that begins no step of the grid begins a run there whose first step goes to the grid's next level; one
    outside the schedule is refused with what to do."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="euler")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sched.step(0.1 * x, 999, x).prev_sample
    model = solvers.DiffusionModel(lambda x_, t: 0.1 * x_, schedule=solvers.schedules.DiscreteVP.linear(),
                                   prediction="eps")
    ref = solvers.sample(model, x, "euler", timesteps=[999.0, 998.0], steps=None).samples
    assert (out - ref).abs().max().item() <= 1e-6
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999.0, 499.5, 0.0]  # Euler's linspace: fractional timesteps
    out = sched.step(0.1 * x, 700, x).prev_sample
    grid = [700.0] + [g for g in sched.grid if g < 700]
    ref = solvers.sample(model, x, "euler", timesteps=grid[:2], steps=None).samples
    assert (out - ref).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="timestep 5000, which is not in the range"):
        sched.step(x, 5000, x)


# -- the pipelines ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dpmpp_3m", "ddpm", "heun"])
def test_ddpm_pipeline_runs_the_solver_with_its_generator(unet, name):
    """DDPMPipeline, unmodified: its images are those of the pipeline loop driven by hand with the same
    generator (initial noise first, then the solver's noise); a stochastic solver's images change with the
    generator's seed, a deterministic one's only through the initial noise."""
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver=name)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(7),
                  output_type="np").images
    g = torch.Generator().manual_seed(7)
    x_T = diffusers.utils.torch_utils.randn_tensor((2, 3, 8, 8), generator=g)
    pipe.scheduler.set_timesteps(4)
    by_hand = (_drive(pipe.scheduler, unet, x_T, generator=g) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - by_hand).max() <= 1e-6
    again = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(7),
                 output_type="np").images
    assert abs(images - again).max() == 0.0


def test_ddim_pipeline_passes_eta_to_a_solver_with_that_eta(unet):
    """DDIMPipeline passes ``eta`` (default 0), ``use_clipped_model_output`` and ``generator``: eta = 0 leaves the
    solver as configured, another eta is followed by a solver that has one (as diffusers' DDIM takes it from the
    step), and refused by one that has none."""
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.scheduler.config
    pipe.scheduler = SolverScheduler.from_config(cfg, solver="ddim", eta=0.5)

    def images(eta):
        return pipe(batch_size=2, num_inference_steps=4, eta=eta, generator=torch.Generator().manual_seed(1),
                    output_type="np").images

    a, b = images(0.5), images(0.0)
    assert abs(a - b).max() == 0.0
    c = images(0.3)
    pipe.scheduler = SolverScheduler.from_config(cfg, solver="ddim", eta=0.3)
    assert abs(c - images(0.0)).max() == 0.0 and abs(c - a).max() > 1e-3
    pipe.scheduler = SolverScheduler.from_config(cfg, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="dpmpp_2m has no eta"):
        pipe(batch_size=2, num_inference_steps=4, eta=0.3, output_type="np")


def test_unknown_step_arguments_are_accepted_with_one_warning(unet):
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="euler")
    sched.set_timesteps(2)
    x = torch.zeros(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="ignores the step argument.*frobnicate"):
        sched.step(x, sched.timesteps[0], x, frobnicate=3, use_clipped_model_output=False, s_churn=0.0)
    out = sched.step(x, sched.timesteps[1], x, frobnicate=3, return_dict=False)  # warned once
    assert isinstance(out, tuple) and out[0].shape == x.shape


@pytest.mark.parametrize("name, options", [("dpmpp_3m", {}), ("heun", {}), ("dpmpp_2s", {})])
def test_stable_diffusion_with_guidance_is_solvers_sample(sd, name, options):
    """StableDiffusionPipeline, unmodified, with prompt_embeds and guidance 7.5: its latents are
    solvers.sample's on from_diffusers(pipe, …, guidance_scale=7.5) from the same latents (the pipeline
    orders the CFG batch [uncond; cond], ours [cond; uncond]: equal to float rounding); the progress bar
    counts solver steps, whatever the evaluations per step."""
    pipe, pe, ne, latents, config = sd
    sched = SolverScheduler.from_config(config, solver=name, **options)
    updates = []
    real_bar = pipe.progress_bar

    def counting_bar(*args, **kwargs):
        bar = real_bar(*args, **kwargs)
        bar.update = lambda n=1: updates.append(n)
        return bar

    pipe.progress_bar = counting_bar
    try:
        out = _sd_call(sd, sched, 5)
    finally:
        del pipe.progress_bar
    model = from_diffusers(pipe, encoder_hidden_states=pe, negative_encoder_hidden_states=ne, guidance_scale=7.5)
    ref = solvers.sample(model, latents, name, timesteps=sched.grid, steps=None, **options)
    assert sum(updates) == 5 == len(sched.grid) - 1
    assert (out - ref.samples).abs().max().item() <= 1e-5 * max(1.0, ref.samples.abs().max().item())


def test_stable_diffusion_stochastic_solver_follows_the_generator(sd):
    sched = SolverScheduler.from_config(sd[4], solver="dpmpp_2m_sde")
    a = _sd_call(sd, sched, 4, generator=torch.Generator().manual_seed(5))
    b = _sd_call(sd, sched, 4, generator=torch.Generator().manual_seed(5))
    c = _sd_call(sd, sched, 4, generator=torch.Generator().manual_seed(6))
    assert (a - b).abs().max().item() == 0.0
    assert (a - c).abs().max().item() > 1e-2


def test_stable_diffusion_decodes_images(sd):
    pipe, pe, ne, latents, config = sd
    pipe.scheduler = SolverScheduler.from_config(config, solver="dpmpp_3m")
    images = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=7.5, num_inference_steps=3,
                  latents=latents, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0.0 and images.max() <= 1.0


# -- parity with diffusers' schedulers through the pipelines ----------------------------------------------
def _report(what: str, err: float, scale: float) -> None:
    print(f"{what}: max |ours − diffusers| = {err:.2e} (max |x| = {scale:.1f})")  # shown with pytest -rP


@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_pipeline_parity_with_ddim_scheduler(unet, clip_sample):
    """DDIMPipeline with DDIMScheduler (leading spacing, set_alpha_to_one) vs our ddim on its config.  With
    clip_sample, ours takes ε from the clipped x0: diffusers' ``use_clipped_model_output=True``."""
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=clip_sample,
                                                                               steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=10, use_clipped_model_output=True, output_type="np")
    theirs = pipe(generator=torch.Generator().manual_seed(2), **kw).images
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="ddim")
    ours = pipe(generator=torch.Generator().manual_seed(2), **kw).images
    err = abs(ours - theirs).max()
    _report(f"DDIMPipeline clip_sample={clip_sample}", err, 1.0)
    assert err <= PARITY_TOL


@pytest.mark.parametrize("order, final_sigmas_type", [(2, "zero"), (3, "zero"), (2, "sigma_min"),
                                                      (3, "sigma_min")])
def test_stable_diffusion_parity_with_dpm_solver_multistep(sd, order, final_sigmas_type):
    """DPMSolverMultistepScheduler (dpmsolver++, linspace spacing, lower_order_final) vs dpmpp_2m/3m
    (official_d2) on its config, through StableDiffusionPipeline with guidance."""
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(
        sd[4], solver_order=order, algorithm_type="dpmsolver++", final_sigmas_type=final_sigmas_type)
    theirs = _sd_call(sd, dpm, 8)
    # diffusers lowers the last orders below 15 steps; our 3M's "auto" lowers below 6 only (measured better,
    # tests/solvers/test_multistep_defaults.py), so the parity run gives diffusers' rule explicitly
    ours_sched = SolverScheduler.from_config(dpm.config, solver=f"dpmpp_{order}m", lower_order_final=True,
                                             **({"official_d2": True} if order == 3 else {}))
    ours = _sd_call(sd, ours_sched, 8)
    assert ours_sched.timesteps.tolist() == dpm.timesteps.tolist()
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    _report(f"SD DPMSolverMultistep order {order} {final_sigmas_type}", err, scale)
    assert err <= PARITY_TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_stable_diffusion_parity_with_euler_discrete(sd, spacing):
    """EulerDiscreteScheduler vs its config read by SolverScheduler: a σ-scheduler source, so the state is x/α
    as diffusers' (init_noise_sigma and scale_model_input included: σ_max under "trailing"/"linspace", diffusers'
    approximation of √(σ_max² + 1)), and linspace's fractional timesteps take diffusers' σ (linear between
    trained steps), so the same latents give the same images."""
    euler = diffusers.EulerDiscreteScheduler.from_config(sd[4], timestep_spacing=spacing)
    theirs = _sd_call(sd, euler, 8)
    ours_sched = SolverScheduler.from_config(euler.config)
    assert ours_sched.solver.name == "euler"
    ours = _sd_call(sd, ours_sched, 8)
    assert float(ours_sched.init_noise_sigma) == pytest.approx(float(euler.init_noise_sigma), rel=1e-6)
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    _report(f"SD EulerDiscrete {spacing}", err, scale)
    assert err <= PARITY_TOL


# -- reading diffusers configs and networks ---------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_from_config_has_diffusers_alphas_cumprod(beta_schedule):
    """Ours in float64, diffusers' a float32 cumulative product over 1000 steps: equal to 1e-4 relative."""
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    ours = schedule_from_config(ref.config)
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-4, atol=0)


def test_config_settings_reach_the_model():
    cfg = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=True, clip_sample_range=2.0).config
    model = model_from_config(lambda x, t: x, cfg)
    assert (model.prediction, model.clip_x0) == ("v", (-2.0, 2.0))
    assert model_from_config(lambda x, t: x, diffusers.DDIMScheduler(clip_sample=False).config).clip_x0 is None
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid' is not supported"):
        schedule_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type 'flow' is not supported"):
        model_from_config(lambda x, t: x, {"prediction_type": "flow"})


def test_thresholding_is_diffusers_threshold_sample():
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    model = model_from_config(lambda x, t: x, sched.config)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.3, 3.0]).view(3, 1, 1, 1)
    assert torch.allclose(model.threshold(x0), sched._threshold_sample(x0), atol=1e-7, rtol=0)


def test_from_diffusers_refuses_incomplete_inputs(unet, sd):
    with pytest.raises(ValueError, match="pass scheduler="):
        from_diffusers(unet)
    with pytest.raises(TypeError, match="diffusers network"):
        from_diffusers(lambda x, t: x, diffusers.DDPMScheduler())
    pipe, pe, ne, _, _ = sd
    with pytest.raises(ValueError, match="negative_encoder_hidden_states is missing"):
        from_diffusers(pipe, encoder_hidden_states=pe, guidance_scale=3.0)
    with pytest.raises(ValueError, match="give guidance_scale"):
        from_diffusers(pipe, encoder_hidden_states=pe, negative_encoder_hidden_states=ne)
    with pytest.raises(ValueError, match="must match"):
        from_diffusers(pipe, encoder_hidden_states=pe, negative_encoder_hidden_states=ne[:1], guidance_scale=3.0)


def test_leading_spacing_honours_steps_offset_and_final_step():
    """A config that sets leading spacing and steps_offset=1: DDIM's grid 751, 501, 251, 1, then ᾱ_0 (t = 0)
    with set_alpha_to_one=False; grid options replace the config's grid."""
    cfg = diffusers.DDIMScheduler(steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading").config
    sched = SolverScheduler.from_config(cfg, solver="ddim")
    sched.set_timesteps(4)
    assert sched.grid == [751.0, 501.0, 251.0, 1.0, 0.0]
    sched = SolverScheduler.from_config(cfg, solver="euler", spacing="logsnr")
    sched.set_timesteps(4)
    assert sched.grid[0] == 999.0 and sched.grid[-1] == -1.0 and len(sched.grid) == 5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [3, 7, 10])
def test_a_multistep_configs_grid_is_its_schedulers_own_timesteps(spacing, steps):
    """DPMSolverMultistep places steps + 1 leading/linspace points and drops the last, but trailing ones
    directly: the grid's noise levels are the scheduler's own timesteps, whatever the spacing."""
    reference = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
    reference.set_timesteps(steps)
    sched = SolverScheduler.from_config(reference.config, solver="dpmpp_2m")
    sched.set_timesteps(steps)
    assert sched.grid[:-1] == [float(t) for t in reference.timesteps]


def test_a_final_level_already_at_alpha_bar_0_is_not_repeated():
    """DDIM with steps_offset=0 and set_alpha_to_one=False: leading levels end at timestep 0, which is the
    final step's ᾱ_0 already, so the grid ends there once (DDIM's own last step goes from 0 to ᾱ_0 = itself)."""
    reference = diffusers.DDIMScheduler(steps_offset=0, set_alpha_to_one=False)
    reference.set_timesteps(4)
    sched = SolverScheduler.from_config(reference.config, solver="ddim")
    sched.set_timesteps(4)
    assert sched.grid == [float(t) for t in reference.timesteps] == [750.0, 500.0, 250.0, 0.0]


def test_interop_imports_without_diffusers():
    """solvers and solvers.interop import with diffusers unimportable, and asking for SolverScheduler (a
    diffusers scheduler) says how to install diffusers, in one line."""
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import solvers.interop as I\n"
            "print(I.from_diffusers.__name__)\n"
            "try:\n    I.SolverScheduler\nexcept ImportError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "from_diffusers"
    assert len(lines) == 2 and "needs diffusers" in lines[1] and "pip install" in lines[1]


def test_from_diffusers_passes_class_labels_and_guidance_through():
    """A class-conditional UNet2DModel: the model's network is out_u + w·(out_c − out_u) of the network's
    own calls with the labels and the null labels, in one batched call (two rows per sample)."""
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=4).eval()
    labels, null = torch.tensor([1, 2]), torch.tensor([0, 0])
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    with torch.no_grad():
        guided = from_diffusers(net, diffusers.DDPMScheduler(), class_labels=labels, negative_class_labels=null,
                                guidance_scale=3.0)
        plain = from_diffusers(net, diffusers.DDPMScheduler(), class_labels=labels)
        c, u = net(x, t, class_labels=labels).sample, net(x, t, class_labels=null).sample
        assert guided.rows_per_sample == 2 and plain.rows_per_sample == 1
        assert torch.allclose(guided.fn(x, t), u + 3.0 * (c - u), atol=1e-5, rtol=0)
        assert torch.allclose(plain.fn(x, t), c, atol=1e-6, rtol=0)
        assert (c - u).abs().max().item() > 1e-3  # the labels matter
