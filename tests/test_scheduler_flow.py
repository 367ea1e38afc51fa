"""OLSSScheduler on flow-matching models: the noise process from the model's config, Euler in OLSS form equal to
diffusers' FlowMatchEulerDiscreteScheduler, and use as a drop-in in StableDiffusion3Pipeline and FluxPipeline."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from olss_dist import OLSSScheduler
from olss_dist.core.noise_process import FlowMatchingProcess, noise_process_from_config
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.plan import Plan
from tiny_flow import RESOLUTION, T5_TOKENS, tiny_flux_pipeline, tiny_sd3_pipeline

SD3_CONFIG = FlowMatchEulerDiscreteScheduler(shift=3.0).config
FLUX_CONFIG = FlowMatchEulerDiscreteScheduler(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
).config


def euler_plan(config, num_steps: int, sigmas=None, mu: float | None = None) -> Plan:
    """FlowMatchEulerDiscreteScheduler's ``num_steps`` steps in OLSS form: ``x_{i+1} = x_T + sum_j (s_{j+1} - s_j) v_j``."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    if sigmas is None:
        scheduler.set_timesteps(num_steps, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    timesteps = scheduler.timesteps.double().numpy()
    steps = np.diff(scheduler.sigmas.double().numpy())
    coefficients = np.zeros((num_steps, num_steps + 1))
    coefficients[:, 0] = 1.0
    for i in range(num_steps):
        coefficients[i, 1 : i + 2] = steps[: i + 1]
    return Plan(nodes=list(range(num_steps)), timesteps=timesteps, coefficients=coefficients, step_errors=np.zeros(num_steps),
                search_errors=np.zeros(num_steps), fit="builtin:flow_euler", spacing="builtin")


def toy_velocity(dim: int = 8, seed: int = 0):
    weight = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.4
    return lambda x, t: (torch.tanh(x @ weight.to(x.dtype)) * (float(t) / 1000.0 + 0.2) - 0.5 * x).to(x.dtype)


def sample(scheduler, velocity, x_T: torch.Tensor, num_steps: int, **set_timesteps) -> torch.Tensor:
    scheduler.set_timesteps(num_steps, **set_timesteps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("config, mu", [(SD3_CONFIG, None), (FlowMatchEulerDiscreteScheduler().config, None), (FLUX_CONFIG, 0.8)])
def test_euler_in_olss_form_reproduces_the_flow_euler_loop(config, mu):
    scheduler = OLSSScheduler.from_plans([euler_plan(config, k, mu=mu) for k in (4, 9)], scheduler_config=config, mu=mu)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    velocity, x_T = toy_velocity(), torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    for k in (4, 9):
        expected = sample(reference, velocity, x_T, k, mu=mu)
        result = sample(scheduler, velocity, x_T, k, mu=mu)
        assert torch.equal(scheduler.timesteps, reference.timesteps) and scheduler.timesteps.dtype == torch.float32
        torch.testing.assert_close(scheduler.sigmas, reference.sigmas, rtol=0, atol=1e-7)
        assert scheduler.sigmas[-1] == 0.0 and scheduler.sigmas.shape == (k + 1,)
        # x_T + d_0 v_0 + d_1 v_1 + ... summed left to right is Euler's recursion: the same float32 operations
        assert torch.equal(result, expected)


def test_flow_process_is_taken_from_the_config_and_survives_a_round_trip(tmp_path):
    mu = 0.7
    plans = [euler_plan(FLUX_CONFIG, k, mu=mu) for k in (3, 6)]
    scheduler = OLSSScheduler.from_plans(plans, scheduler_config=FLUX_CONFIG, mu=mu)
    scheduler.save_pretrained(tmp_path)
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.config.prediction_type == "flow_prediction" and loaded.config.mu == mu
    for key in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                "max_image_seq_len"):
        assert loaded.config[key] == FLUX_CONFIG[key], key
    assert loaded.available_steps == [3, 6]
    for k in (3, 6):
        scheduler.set_timesteps(k)
        loaded.set_timesteps(k)
        assert torch.equal(loaded.timesteps, scheduler.timesteps) and torch.equal(loaded.sigmas, scheduler.sigmas)
        assert torch.equal(loaded.coefficients, scheduler.coefficients)
    again = OLSSScheduler.from_plans(plans[:1], scheduler_config=loaded.config)  # an OLSS config names its process too
    def process(config):
        return {k: v for k, v in config.items() if k != "plans" and not k.startswith("_")}

    assert process(again.config) == process(loaded.config)
    # scheduler_config.json alone names the process: the same teacher as the model's own config
    process = noise_process_from_config(dict(loaded.config), mu=loaded.config.mu)
    original = noise_process_from_config(FLUX_CONFIG, mu=mu)
    assert isinstance(process, FlowMatchingProcess)
    for field in ("timesteps", "output_coefficients"):
        assert np.array_equal(getattr(process.teacher_schedule(50), field), getattr(original.teacher_schedule(50), field))


def test_vp_process_is_taken_from_a_vp_config():
    config = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", rescale_betas_zero_snr=True).config
    plan = Plan(nodes=[0, 1], timesteps=[999, 500], coefficients=[[0.5, 0.1, 0.0], [0.2, 0.3, 0.4]], step_errors=[0, 0],
                search_errors=[0, 0])
    scheduler = OLSSScheduler.from_plans([plan], scheduler_config=config)
    assert scheduler.config.prediction_type == "v_prediction" and not scheduler.is_flow
    np.testing.assert_array_equal(scheduler.alphas_cumprod.numpy(), alphas_cumprod_from_config(config))
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.dtype == torch.long and scheduler.timesteps.tolist() == [999, 500]
    # zero terminal SNR: alpha_999 = 0, x_T is pure noise; v = -x0 there, and the step stays finite
    assert scheduler.alphas_cumprod[999] == 0.0
    x_T, x0 = torch.randn(2, 4), torch.randn(2, 4)
    out = scheduler.step(-x0, 999, x_T)
    torch.testing.assert_close(out.pred_original_sample, x0)
    # zero-SNR plans combine the model's v itself (contract C1, core.noise_process.vp_output_type)
    assert scheduler.output_type == "v_prediction"
    torch.testing.assert_close(out.prev_sample, 0.5 * x_T + 0.1 * -x0)


@pytest.mark.parametrize(
    "config, match",
    [
        (DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0).config,
         "^scheduler_config: a use_flow_sigmas solver config; .* FlowMatchEulerDiscreteScheduler"),
        ({**DPMSolverMultistepScheduler().config, "_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True},
         "^scheduler_config: DPMSolverMultistepScheduler config"),
        (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config, "stochastic_sampling=True"),
        (FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config, "use_karras_sigmas=True"),
        (FlowMatchEulerDiscreteScheduler(shift_terminal=0.1).config, "shift_terminal=0.1"),
        (FlowMatchEulerDiscreteScheduler(time_shift_type="linear").config, "time_shift_type='linear'"),
        ({"shift": 3.0, "flow_shift": 2.0}, r"does not carry: \['flow_shift'\]"),
        ({"_class_name": "EDMEulerScheduler", "sigma_max": 80.0}, "EDMEulerScheduler names no noise process"),
        ({**DDIMScheduler().config, "beta_schedule": "sigmoid"}, "scheduler_config: unsupported beta_schedule 'sigmoid'"),
    ],
)
def test_configs_whose_process_cannot_be_honoured_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        OLSSScheduler.from_plans([euler_plan(SD3_CONFIG, 3)], scheduler_config=config)


def test_mu_is_refused_with_a_fixed_shift():
    with pytest.raises(ValueError, match=r"^mu: the scheduler config has a fixed shift"):
        OLSSScheduler.from_plans([euler_plan(SD3_CONFIG, 3)], scheduler_config=SD3_CONFIG, mu=0.5)
    with pytest.raises(ValueError, match=r"^mu: only flow-matching"):
        OLSSScheduler.from_plans([], scheduler_config=DDIMScheduler().config, mu=0.5)


def test_flow_plan_timesteps_are_checked():
    plan = euler_plan(SD3_CONFIG, 3)
    entry = {"num_steps": 3, "timesteps": [1000.0, 1000.0, 500.0], "coefficients": plan.coefficients.tolist()}
    with pytest.raises(ValueError, match="^plan for 3 steps: timesteps must be strictly decreasing"):
        OLSSScheduler(plans=[entry], prediction_type="flow_prediction", shift=3.0)
    entry["timesteps"] = [1200.0, 800.0, 500.0]
    with pytest.raises(ValueError, match=r"^plan for 3 steps: flow timesteps must lie in \[0, 1000\]"):
        OLSSScheduler(plans=[entry], prediction_type="flow_prediction", shift=3.0)


def test_set_timesteps_takes_what_flux_passes():
    mu = 0.9
    scheduler = OLSSScheduler.from_plans([euler_plan(FLUX_CONFIG, 4, mu=mu)], scheduler_config=FLUX_CONFIG, mu=mu)
    plan_timesteps = euler_plan(FLUX_CONFIG, 4, mu=mu).timesteps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Flux's default sigmas and the calibration's mu: nothing to say
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), device="cpu", mu=mu)
    assert scheduler.num_inference_steps == 4 and np.array_equal(scheduler.timesteps.double().numpy(), plan_timesteps)
    with pytest.warns(UserWarning, match="^sigmas: OLSSScheduler ignores the custom sigmas"):
        scheduler.set_timesteps(sigmas=[1.0, 0.6, 0.3, 0.1], mu=mu)
    assert np.array_equal(scheduler.timesteps.double().numpy(), plan_timesteps)
    with pytest.warns(UserWarning, match=r"^mu: the pipeline's mu=1\.1 .* differs from mu=0\.9"):
        scheduler.set_timesteps(4, mu=1.1)
    with pytest.raises(ValueError, match="custom timesteps"):
        scheduler.set_timesteps(timesteps=[1000.0, 700.0, 400.0, 100.0])
    with pytest.raises(ValueError, match="^sigmas: 4 values for num_inference_steps=3"):
        scheduler.set_timesteps(3, sigmas=np.linspace(1.0, 1 / 4, 4))
    with pytest.warns(UserWarning, match=r"no plan for 5 steps \(planned: \[4\]\); serving flow-dpmsolver\+\+"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)  # served, never an exception
    assert len(scheduler.timesteps) == 5 and len(scheduler.sigmas) == 6


def test_vp_schedulers_still_refuse_sigmas_and_mu():
    plan = Plan(nodes=[0], timesteps=[999], coefficients=[[0.5, 0.1]], step_errors=[0], search_errors=[0])
    scheduler = OLSSScheduler.from_plans([plan])
    with pytest.raises(ValueError, match="custom timesteps or sigmas are not supported"):
        scheduler.set_timesteps(sigmas=[1.0])
    with pytest.raises(ValueError, match="^mu: only flow-matching"):
        scheduler.set_timesteps(1, mu=0.5)


def test_step_dtypes_prediction_and_wrong_timestep():
    scheduler = OLSSScheduler.from_plans([euler_plan(SD3_CONFIG, 3)], scheduler_config=SD3_CONFIG)
    x0, noise = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[1]
    # a loop that starts at timesteps[1] without set_begin_index (an img2img start) is served from there
    with pytest.warns(UserWarning, match=r"no start plan for 3 steps from step 1"):
        scheduler.step(noise - x0, t, noise)
    assert scheduler.begin_index == 1 and scheduler.step_index == 2
    with pytest.warns(UserWarning, match=r"timestep 777 is not the 3-step schedule's next one \([0-9.]+\); starting a new run"):
        scheduler.step(noise - x0, 777.0, noise)  # off the schedule: a warning, not an exception
    scheduler.set_timesteps(3)
    sigma = float(scheduler.timesteps[0]) / 1000
    x = (1 - sigma) * x0 + sigma * noise
    out = scheduler.step(noise - x0, scheduler.timesteps[0], x)
    assert out.prev_sample.dtype == torch.float64
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-12)
    expected = x + (float(scheduler.sigmas[1].double()) - sigma) * (noise - x0)
    torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-7)  # sigmas[1] is float32
    # half precision samples: computed in float32, returned in the sample's dtype
    scheduler.set_timesteps(3)
    half, velocity = x.to(torch.bfloat16), (noise - x0).to(torch.bfloat16)
    prev = scheduler.step(velocity, scheduler.timesteps[0], half).prev_sample
    coefficients = scheduler.coefficients[0].tolist()
    assert prev.dtype == torch.bfloat16
    assert torch.equal(prev, (coefficients[0] * half.float() + coefficients[1] * velocity.float()).to(torch.bfloat16))


def test_scale_noise_and_begin_index_follow_flow_match_euler():
    scheduler = OLSSScheduler.from_plans([euler_plan(SD3_CONFIG, 5)], scheduler_config=SD3_CONFIG)
    reference = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    scheduler.set_timesteps(5)
    reference.set_timesteps(5)
    image, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        torch.testing.assert_close(scheduler.scale_noise(image, t.expand(2), noise), reference.scale_noise(image, t.expand(2), noise))
    scheduler.set_begin_index(0)
    assert scheduler.begin_index == 0 and scheduler.scale_model_input(image, 1000.0) is image
    with pytest.warns(UserWarning, match=r"no start plan for 5 steps from step 2 .*flow-dpmsolver\+\+"):
        scheduler.set_begin_index(2)
    assert scheduler.begin_index == 2 and scheduler.step_index is None
    with pytest.raises(ValueError, match=r"^begin_index must be an integer in \[0, 5\]"):
        scheduler.set_begin_index(6)
    with pytest.raises(ValueError, match="^scale_noise: only flow-matching"):
        OLSSScheduler().scale_noise(image, 500, noise)


def test_a_flow_start_without_a_plan_is_flow_match_euler_from_there_with_the_euler_fallback():
    """SD3 img2img: set_timesteps(K), set_begin_index(s), scale_noise to timesteps[s], the loop from there."""
    plan = euler_plan(SD3_CONFIG, 6)
    plan.coefficients[:, 1:] *= 0.9  # any plan from pure noise; the start at 3 has none
    scheduler = OLSSScheduler.from_plans([plan], scheduler_config=SD3_CONFIG, fallback_solver="euler")
    field = lambda x, t: torch.tanh(x) * (t / 1000.0) - 0.3 * x  # noqa: E731
    image, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    scheduler.set_timesteps(6)
    with pytest.warns(UserWarning, match=r"no start plan for 6 steps from step 3 .*flow-euler"):
        scheduler.set_begin_index(3)
    x = expected = scheduler.scale_noise(image, scheduler.timesteps[3:4], noise)
    sigmas = np.append(plan.timesteps[3:] / 1000, 0.0)
    for i, t in enumerate(scheduler.timesteps[3:]):
        x = scheduler.step(field(x, float(t)), t, x).prev_sample
        expected = expected + float(sigmas[i + 1] - sigmas[i]) * field(expected, float(t))  # Euler from there
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- the diffusers pipelines


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


def run_pipeline(pipe, steps: int, output_type: str = "latent", **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("seven", num_inference_steps=steps, height=RESOLUTION, width=RESOLUTION, max_sequence_length=T5_TOKENS,
                output_type=output_type, generator=generator, **kwargs).images


@contextlib.contextmanager
def transformer_timesteps(pipe):
    """The ``timestep`` the pipeline feeds its transformer, one per call (the hook goes when the block ends)."""
    calls: list[float] = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(float(kwargs["timestep"][0])), with_kwargs=True
    )
    try:
        yield calls
    finally:
        hook.remove()


def test_sd3_pipeline_with_the_euler_plan_equals_flow_match_euler(sd3):
    config = sd3.scheduler.config
    steps = 4
    reference = run_pipeline(sd3, steps, guidance_scale=3.0)
    olss = type(sd3)(**{**sd3.components, "scheduler": OLSSScheduler.from_plans([euler_plan(config, steps)], scheduler_config=config)})
    with transformer_timesteps(olss) as calls:
        latents = run_pipeline(olss, steps, guidance_scale=3.0)
    assert calls == euler_plan(config, steps).timesteps.tolist()
    assert torch.equal(latents, reference)


def test_sd3_pipeline_runs_a_planned_step_count_to_a_finite_image(sd3):
    config = sd3.scheduler.config
    plan = euler_plan(config, 3)
    plan.coefficients[:, 1:] *= 0.9  # not Euler: any plan in OLSS form
    olss = type(sd3)(**{**sd3.components, "scheduler": OLSSScheduler.from_plans([plan], scheduler_config=config)})
    images = run_pipeline(olss, 3, output_type="np", guidance_scale=3.0)
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()
    with pytest.warns(UserWarning, match=r"no plan for 5 steps \(planned: \[3\]\)"):
        assert torch.isfinite(run_pipeline(olss, 5)).all()


def test_flux_pipeline_with_the_euler_plan_equals_flow_match_euler(flux):
    config, steps = flux.scheduler.config, 4
    mu = calculate_shift((RESOLUTION // 4) ** 2, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)  # the packed sequence length of a 16x16 image: 4x4 tokens
    plan = euler_plan(config, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    reference = run_pipeline(flux, steps, guidance_scale=3.5)
    olss = type(flux)(**{**flux.components, "scheduler": OLSSScheduler.from_plans([plan], scheduler_config=config, mu=mu)})
    with transformer_timesteps(olss) as calls, warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the pipeline's mu is the calibration's
        latents = run_pipeline(olss, steps, guidance_scale=3.5)
    np.testing.assert_allclose(np.array(calls) * 1000, plan.timesteps, rtol=1e-6)  # Flux feeds t / 1000
    assert torch.equal(latents, reference)
    images = run_pipeline(olss, steps, output_type="np", guidance_scale=3.5)
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()


def test_flux_pipeline_at_another_resolution_warns_about_mu(flux):
    config = flux.scheduler.config
    plan = euler_plan(config, 3, sigmas=np.linspace(1.0, 1 / 3, 3), mu=1.0)
    olss = type(flux)(**{**flux.components, "scheduler": OLSSScheduler.from_plans([plan], scheduler_config=config, mu=1.0)})
    with pytest.warns(UserWarning, match="^mu: the pipeline's mu=.* differs from mu=1 the plans were calibrated at"):
        latents = run_pipeline(olss, 3, guidance_scale=3.5)
    assert torch.isfinite(latents).all()


def test_flux_pipeline_at_a_step_count_without_a_plan_is_flow_dpm_solver_pp(flux):
    """Flux passes its sigmas and mu; no plan for 5 steps: DPM-Solver++ 2M with flow sigmas at the pipeline's mu."""
    from diffusers import DPMSolverMultistepScheduler

    config, steps = flux.scheduler.config, 3
    plan = euler_plan(config, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=1.0)
    olss = type(flux)(**{**flux.components, "scheduler": OLSSScheduler.from_plans([plan], scheduler_config=config, mu=1.0)})
    with pytest.warns(UserWarning, match=r"no plan for 5 steps \(planned: \[3\]\); serving flow-dpmsolver\+\+"):
        latents = run_pipeline(olss, 5, guidance_scale=3.5)
    dpm = DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in config.items() if k in ("use_dynamic_shifting", "num_train_timesteps")},
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.shift, solver_order=2)
    reference = type(flux)(**{**flux.components, "scheduler": dpm})
    torch.testing.assert_close(latents, run_pipeline(reference, 5, guidance_scale=3.5), rtol=1e-4, atol=1e-4)
