"""``SolverScheduler`` in the diffusers pipelines that start mid-grid, in a flow-matching pipeline, and through
``save_pretrained`` / ``from_pretrained`` — against the same pipeline with diffusers' own scheduler of the same
method, on tiny random components (offline).

Tolerance: 1e-4 on the latents (diffusers' float32 σ tables against our float64 ones).
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers", reason="the Stable Diffusion tests need transformers (pip install -e '.[test]')")

import solvers  # noqa: E402
from solvers.interop import SolverScheduler  # noqa: E402
from tests.peers.tiny_pipelines import tiny_sd3, tiny_sd_components, tiny_unet  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TOL = 1e-4
D = diffusers


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def embeds(components):
    pipe = D.StableDiffusionPipeline(**components)
    return pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["", ""])


def _image():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))


def _call(pipe, embeds, steps=6, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    pe, ne = embeds
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=7.5, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(7), output_type="latent", **kwargs).images


REFERENCES = [(D.DPMSolverMultistepScheduler, {}), (D.DDIMScheduler, {"clip_sample": False}),
              (D.UniPCMultistepScheduler, {}), (D.EulerDiscreteScheduler, {})]


@pytest.mark.parametrize("cls, extra", REFERENCES, ids=lambda v: getattr(v, "__name__", ""))
def test_img2img_at_strength_0_6_is_the_reference_scheduler(components, embeds, cls, extra):
    """set_begin_index, timesteps[t_start · order:] and add_noise at the first of them: the run begins at step 3
    of 6, and its latents are those of the scheduler the config came from."""
    reference = cls.from_config(components["scheduler"].config, **extra)
    pipe = D.StableDiffusionImg2ImgPipeline(**{**components, "scheduler": reference})
    theirs = _call(pipe, embeds, image=_image(), strength=0.6)
    pipe.scheduler = SolverScheduler.from_config(reference.config)
    ours = _call(pipe, embeds, image=_image(), strength=0.6)
    assert pipe.scheduler.begin_index == 3 * pipe.scheduler.order  # t_start = 6 − int(6 · 0.6)
    assert (ours - theirs).abs().max().item() <= TOL * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("cls, extra", REFERENCES[:2], ids=lambda v: getattr(v, "__name__", ""))
def test_inpainting_at_strength_0_6_is_the_reference_scheduler(components, embeds, cls, extra):
    """The legacy 4-channel inpainting: add_noise of the original image at every step's next timestep (the
    run's position, diffusers' rule), blended under the mask."""
    reference = cls.from_config(components["scheduler"].config, **extra)
    pipe = D.StableDiffusionInpaintPipeline(**{**components, "scheduler": reference})
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1.0
    theirs = _call(pipe, embeds, image=_image(), mask_image=mask, strength=0.6)
    pipe.scheduler = SolverScheduler.from_config(reference.config)
    ours = _call(pipe, embeds, image=_image(), mask_image=mask, strength=0.6)
    assert (ours - theirs).abs().max().item() <= TOL * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("cls, custom", [(D.DPMSolverMultistepScheduler, {"timesteps": [999, 800, 600, 350, 120]}),
                                         (D.EulerDiscreteScheduler, {"sigmas": [14.0, 6.0, 2.5, 0.9, 0.3]})],
                         ids=["timesteps", "sigmas"])
def test_custom_lists_through_the_pipeline(components, embeds, cls, custom):
    """pipe(timesteps=[...]) and pipe(sigmas=[...]) (offered where the scheduler's set_timesteps takes them) hand the
    list to set_timesteps: the run is diffusers' on the same list (σ = √((1−ᾱ)/ᾱ); Euler ends at the last σ)."""
    reference = cls.from_config(components["scheduler"].config)
    pipe = D.StableDiffusionPipeline(**{**components, "scheduler": reference})
    theirs = _call(pipe, embeds, steps=None, **custom)
    pipe.scheduler = SolverScheduler.from_config(reference.config)
    ours = _call(pipe, embeds, steps=None, **custom)
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(reference.timesteps.tolist(), abs=1e-3)
    assert (ours - theirs).abs().max().item() <= TOL * max(1.0, theirs.abs().max().item())


def test_a_saved_pipeline_loads_back_with_its_solver_and_samples_alike(components, embeds, tmp_path):
    pipe = D.StableDiffusionPipeline(**components)
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m", lower_order_final=True)
    before = _call(pipe, embeds)
    pipe.save_pretrained(tmp_path)
    loaded = D.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is SolverScheduler
    assert loaded.scheduler.solver == pipe.scheduler.solver
    assert {k: v for k, v in loaded.scheduler.config.items() if k != "_use_default_values"} == \
        {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    assert torch.equal(_call(loaded, embeds), before)


def test_ddim_pipelines_constructor_converts_any_scheduler_so_assign_it_after():
    """DDIMPipeline(unet, scheduler) turns its scheduler into a DDIMScheduler: the README says to assign
    pipe.scheduler after construction, which keeps the solver."""
    sched = SolverScheduler.from_config(D.DDPMScheduler().config, solver="heun")
    pipe = D.DDIMPipeline(unet=tiny_unet(), scheduler=sched)
    assert type(pipe.scheduler) is D.DDIMScheduler
    pipe.scheduler = sched
    assert pipe.scheduler.solver.name == "heun"


FLOW_REFERENCES = [(D.FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, "euler"),
                   (D.DPMSolverMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                    "flow_shift": 3.0}, "dpmpp_2m"),
                   (D.UniPCMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                "flow_shift": 3.0}, "unipc")]


def _sd3_call(pipe, steps=5):
    pe = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, guidance_scale=1.0, num_inference_steps=steps,
                height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("cls, config, solver", FLOW_REFERENCES, ids=lambda v: getattr(v, "__name__", ""))
def test_an_sd3_style_flow_pipeline_is_the_reference_scheduler(cls, config, solver):
    """StableDiffusion3Pipeline passes sigmas= (and mu= with dynamic shifting) to set_timesteps: the config is
    read as the rectified-flow schedule, and the latents are the flow scheduler's."""
    reference = cls(**config)
    pipe = tiny_sd3(reference)
    theirs = _sd3_call(pipe)
    pipe.scheduler = SolverScheduler.from_config(reference.config)
    assert pipe.scheduler.solver.name == solver
    ours = _sd3_call(pipe)
    assert (ours - theirs).abs().max().item() <= TOL * max(1.0, theirs.abs().max().item())


FIXED_GRID = [n for n in solvers.available_solvers(aliases=False) if not solvers.solver_class(n).adaptive]


@pytest.mark.parametrize("name", FIXED_GRID)
def test_every_fixed_grid_solver_runs_in_an_sd3_style_pipeline(name):
    options = {"steps_per_level": 2} if name == "langevin" else {}
    pipe = tiny_sd3(D.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver=name, **options)
    out = _sd3_call(pipe, steps=4)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
