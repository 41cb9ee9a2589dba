"""``SolverScheduler`` keeps diffusers' scheduler contract — what diffusers' own ``tests/schedulers`` check of
every scheduler, said here in this project's words: it is a ``SchedulerMixin`` + ``ConfigMixin`` whose config
round-trips through files and through its compatible schedulers; ``timesteps`` exist from construction; ``step``
returns a ``BaseOutput`` with ``prev_sample`` and ``pred_original_sample`` (or a tuple); ``add_noise`` makes the
state at a timestep; a run may begin at any step of the grid; a keyword is a solver option or a config key and
nothing else.  (The pipelines themselves: test_diffusers_scheduler_pipelines.py.)
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import solvers  # noqa: E402
from solvers.interop import SolverScheduler, from_diffusers  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # numpy 2 notices inside diffusers


def _net(x, t):
    """A network whose output depends on x and t (diffusers' dummy model, scaled down)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.1 * x * t / (t + 1)


def _loop(sched, x, steps=None, start=0, **step_kwargs):
    """The pipelines' loop over ``timesteps[start:]``: the network, then ``step``; returns the last output."""
    if steps is not None:
        sched.set_timesteps(steps)
    out = None
    for t in sched.timesteps[start:]:
        out = sched.step(_net(x, t), t, x, **step_kwargs)
        x = out.prev_sample
    return x, out


def _plain(config) -> dict:
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


@pytest.mark.parametrize("solver, options", [("unipc", {"solver_order": 3}), ("heun", {}), ("ddim", {"eta": 0.0})])
def test_save_pretrained_then_from_pretrained_is_the_same_scheduler(tmp_path, solver, options):
    """The saved folder holds the solver and its options next to the source config; loading it gives an equal
    config and the same samples, bit for bit."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler(beta_schedule="scaled_linear").config,
                                        solver=solver, **options)
    sched.save_pretrained(tmp_path)
    loaded = SolverScheduler.from_pretrained(tmp_path)
    assert _plain(loaded.config) == _plain(sched.config)
    assert loaded.solver == sched.solver
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_loop(sched, x, 6)[0], _loop(loaded, x, 6)[0])


def test_from_config_of_its_own_config_keeps_the_solver_and_a_new_solver_drops_the_old_options():
    sched = SolverScheduler.from_config(diffusers.UniPCMultistepScheduler().config, solver="ddim", eta=0.3)
    again = SolverScheduler.from_config(sched.config)
    assert again.solver == sched.solver == solvers.get_solver("ddim", eta=0.3)
    other = SolverScheduler.from_config(sched.config, solver="dpmpp_2m")
    assert other.solver == solvers.get_solver("dpmpp_2m")


def test_the_source_method_is_read_when_no_solver_is_given():
    """solver omitted: the source scheduler's own method, also for a config whose class is known only from its
    keys (a scheduler built in code has no _class_name)."""
    cases = [(diffusers.DDIMScheduler(), "ddim"), (diffusers.DPMSolverMultistepScheduler(), "dpmpp_2m"),
             (diffusers.DPMSolverMultistepScheduler(solver_order=3), "dpmpp_3m"),
             (diffusers.UniPCMultistepScheduler(), "unipc"), (diffusers.EulerDiscreteScheduler(), "euler"),
             (diffusers.HeunDiscreteScheduler(), "heun")]
    for reference, name in cases:
        assert "_class_name" not in reference.config
        assert SolverScheduler.from_config(reference.config).solver.name == name, type(reference).__name__
        assert SolverScheduler.from_config(reference).config.source_scheduler == type(reference).__name__


def test_compatible_schedulers_read_its_config_and_give_it_back():
    """Every compatible class loads this scheduler's config, and the config read back from it is this one's."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler(beta_end=0.015).config, solver="dpmpp_3m")
    assert sched.compatibles and all(issubclass(c, diffusers.SchedulerMixin) for c in sched.compatibles)
    for cls in sched.compatibles:
        other = cls.from_config(sched.config)
        back = SolverScheduler.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in sched.config} == dict(sched.config), cls.__name__
        assert other.config.beta_end == 0.015


def test_keywords_are_solver_options_or_config_keys_and_nothing_else():
    base = diffusers.DDPMScheduler().config
    sched = SolverScheduler.from_config(base, solver="heun", s_churn=1.0, timestep_spacing="trailing")
    assert sched.solver.s_churn == 1.0 and sched.config.timestep_spacing == "trailing"
    assert sched.config.solver_options == {"s_churn": 1.0}
    with pytest.raises(TypeError, match="'s_noize' is neither an option of solver 'heun'.*s_noise"):
        SolverScheduler.from_config(base, solver="heun", s_noize=1.0)


def test_training_keys_keep_the_source_values_where_the_source_left_its_defaults():
    """A DDPM built in code leaves its β range at its defaults (1e-4 … 0.02); swapped to Heun, whose defaults are
    0.00085 … 0.012, the network's schedule is still DDPM's."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver="heun")
    abar = diffusers.DDPMScheduler().alphas_cumprod.double()
    ours = sched._model.schedule.alphas_cumprod
    assert torch.allclose(ours, abar, rtol=1e-5)


def test_timesteps_exist_from_construction():
    sched = SolverScheduler.from_config(diffusers.DDIMScheduler().config)
    assert sched.timesteps.tolist() == list(range(999, -1, -1))
    assert sched.num_inference_steps is None


def test_step_output_is_a_base_output_with_x0_or_a_tuple():
    """pred_original_sample is the model's x0: (x − σ·ε̂)/α for an ε network, clipped as DDIM's clip_sample."""
    sched = SolverScheduler.from_config(diffusers.DDIMScheduler(clip_sample=True).config)
    sched.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = sched.timesteps[0]
    eps = _net(x, t)
    out = sched.step(eps, t, x)
    assert isinstance(out, diffusers.utils.BaseOutput)
    abar = diffusers.DDIMScheduler().alphas_cumprod[int(t)].double()
    x0 = ((x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()).clamp(-1, 1)
    assert torch.allclose(out.pred_original_sample.double(), x0, atol=1e-5)
    sched.set_timesteps(5)
    prev, x0_tuple = sched.step(eps, t, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(x0_tuple, out.pred_original_sample)


def test_add_noise_is_diffusers_at_integer_timesteps():
    """Before set_timesteps (training, or a pipeline without set_begin_index): α_t·x0 + σ_t·ε at each row's own
    timestep, as DDPMScheduler.add_noise."""
    reference = diffusers.DDPMScheduler()
    sched = SolverScheduler.from_config(reference.config)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(sched.add_noise(x0, noise, t), reference.add_noise(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("solver, options", [("dpmpp_2m", {"lower_order_final": True}), ("heun", {}),
                                             ("unipc", {"lower_order_final": True})])
def test_a_run_begun_mid_grid_is_solvers_sample_on_the_rest_of_the_grid(solver, options):
    """img2img's pattern: set_begin_index(k · order), add_noise at that timestep, the loop over timesteps[k·order:]
    — the samples of solvers.sample on the rest of the grid (with the multistep's lower-order rule decided on the
    whole grid, as diffusers' schedulers decide it)."""
    sched = SolverScheduler.from_config(diffusers.DDPMScheduler().config, solver=solver, **options)
    sched.set_timesteps(6)
    k = 2 * sched.order
    sched.set_begin_index(k)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    x = sched.add_noise(x0, noise, sched.timesteps[k:k + 1])
    ours, _ = _loop(sched, x, start=k)
    model = from_diffusers(lambda_module(), sched)
    ref = solvers.sample(model, x, solver, timesteps=sched.grid[2:], steps=None, **options)
    assert (ours - ref.samples).abs().max().item() <= 1e-6


def lambda_module():
    class Net(torch.nn.Module):
        def forward(self, x, t, return_dict=False):
            return (_net(x, t),)
    return Net()


def test_a_config_made_from_another_schedulers_config_is_read_as_its_own_class():
    """DDIMScheduler.from_config(a PNDM config) keeps PNDM's keys too: the source is the class with the most keys
    among those whose keys the config all has (DDIM), not silently a default method."""
    pndm = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    ddim = diffusers.DDIMScheduler.from_config(pndm.config)
    assert "skip_prk_steps" in ddim.config
    assert SolverScheduler.from_config(ddim.config).solver.name == "ddim"


def test_a_config_whose_source_cannot_be_told_needs_a_solver():
    with pytest.raises(ValueError, match="cannot tell which diffusers scheduler this config comes from.*solver="):
        SolverScheduler.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    sched = SolverScheduler.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"}, solver="heun")
    assert sched.solver.name == "heun"


def test_a_flow_schedulers_timesteps_from_construction_are_flowmatch_eulers():
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = SolverScheduler.from_config(reference.config)
    assert torch.allclose(sched.timesteps, reference.timesteps, atol=1e-3)


def test_a_run_begun_mid_grid_lowers_its_order_as_the_whole_grid_would():
    """diffusers decides DPM-Solver's lower-order-final rule (below 15 steps) on the whole grid, also for a run
    that begins at step 10 of 20 (10 steps left): so does the scheduler, and the samples are diffusers'."""
    reference = diffusers.DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    sched = SolverScheduler.from_config(reference.config)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    outs = []
    for s in (sched, reference):
        s.set_timesteps(20)
        s.set_begin_index(10)
        x = s.add_noise(x0, noise, s.timesteps[10:11])
        for t in s.timesteps[10:]:
            x = s.step(_net(x, t), t, x).prev_sample
        outs.append(x)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4 * max(1.0, outs[1].abs().max().item())
