"""The tail screen (``olss_dist.method.screen``): fresh samples scored against a fine-step reference, so a plan
that validation likes but that sends fresh samples elsewhere does not ship; its spec field and CLI option."""

import numpy as np
import pytest
import torch

from olss_dist.cli import parse_calibrate_arguments
from olss_dist.core.builtin import process_builtins
from olss_dist.method.choice import ChoiceRules
from olss_dist.method.rollouts import SCREEN, VALIDATION, InProcessBackend
from olss_dist.method.run import validation_errors
from olss_dist.method.screen import TailScreen, run_to_end
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.prompts import records_from_prompts, screen_records
from olss_dist.spec import CalibrationSpec, SpecError

TEACHER_STEPS = 40
K = 4


def samples(model, count, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, *model.latent_shape, generator=generator, dtype=torch.float64)
    return noise, torch.randint(0, model.num_classes, (count,), generator=generator)


def taught(num_validation, num_screen):
    """The analytic mixture in a backend with 8 train, ``num_validation`` validation and ``num_screen`` screen samples,
    its N = 40 teacher run: ``(model, backend, built-ins, teacher timesteps)``."""
    model = GaussianMixtureModel()
    screen_noise, screen_cond = samples(model, num_screen, 3)
    backend = InProcessBackend(model, *samples(model, 8, 1), *samples(model, num_validation, 2), screen_noise=screen_noise,
                               screen_cond=screen_cond)
    schedule = model.noise_process.teacher_schedule(TEACHER_STEPS)
    backend.record_teacher(schedule)
    return model, backend, process_builtins(model.noise_process), schedule.stored_timesteps()


@pytest.fixture(scope="module")
def screened():
    """The analytic mixture with train, validation and 96 screen samples; the teacher run; the screen built."""
    model, backend, solvers, timesteps = taught(16, 96)
    rules = ChoiceRules(screen_samples=96)
    screen = TailScreen(backend, solvers, timesteps, rules)
    plans = {name: solvers.plan(name, K, timesteps) for name in ("ddim", "deis")}
    return model, backend, screen, plans, rules


def test_the_reference_is_the_builtin_closest_to_the_teacher_and_its_bound_is_measured(screened):
    model, backend, screen, plans, rules = screened
    record = screen.record
    assert record["reference"].startswith("builtin/") and screen.samples == 96
    assert record["reference_steps"] == min(TEACHER_STEPS, rules.screen_reference_steps)
    assert record["bound"] == pytest.approx(rules.screen_bound_factor * record["reference_worst_validation_rmse"])
    # the reference rollout stays open beside others: a sampler's distance to itself is zero
    handle = run_to_end(backend, SCREEN, plans["deis"].coefficients, plans["deis"].timesteps)
    try:
        assert backend.final_differences(handle, handle).shape == (96,)
        assert backend.final_differences(handle, screen.handle).max() > 0
    finally:
        backend.close(handle)
    with pytest.raises(ValueError, match="no teacher"):
        backend.final_errors(screen.handle)


class CountingBackend(InProcessBackend):
    """Counts the validation rollouts started (``start`` on the VALIDATION split)."""

    validation_runs = 0

    def start(self, split, *args, **kwargs):
        self.validation_runs += split == VALIDATION
        return super().start(split, *args, **kwargs)


@pytest.mark.parametrize("reference_steps", [100, 20])
def test_on_the_teachers_own_grid_its_own_solver_is_the_reference_without_scoring_the_others(reference_steps):
    """At R >= N the reference runs on the teacher's whole grid, where DDIM is the teacher (rounding): it is taken
    without running the other built-ins on the validation split; at R < N every built-in is scored."""
    model = GaussianMixtureModel()
    backend = CountingBackend(model, *samples(model, 8, 1), *samples(model, 16, 2), screen_noise=samples(model, 32, 3)[0],
                              screen_cond=samples(model, 32, 3)[1])
    schedule = model.noise_process.teacher_schedule(TEACHER_STEPS)
    backend.record_teacher(schedule)
    solvers = process_builtins(model.noise_process)
    screen = TailScreen(backend, solvers, schedule.stored_timesteps(), ChoiceRules(screen_reference_steps=reference_steps))
    if reference_steps >= TEACHER_STEPS:
        assert screen.record["reference"] == f"builtin/{solvers.names[0]}" == "builtin/ddim"
        assert screen.record["reference_steps"] == TEACHER_STEPS and backend.validation_runs == 1
        assert screen.record["reference_worst_validation_rmse"] < 1e-6  # OLSS-form weights, float64 rounding
    else:
        assert screen.record["reference_steps"] == reference_steps and backend.validation_runs == len(solvers.names)


def test_a_plan_that_validation_likes_but_the_fresh_samples_do_not_is_excluded(screened):
    model, backend, screen, plans, rules = screened
    deis_errors = validation_errors(backend, plans["deis"].coefficients, plans["deis"].timesteps)
    # DDIM at 4 steps sends many samples to other modes of the mixture; pretend its validation missed all of that
    names = ["on_policy/pretend", "builtin/deis"]
    samplers = [(plans["ddim"].coefficients, plans["ddim"].timesteps), (plans["deis"].coefficients, plans["deis"].timesteps)]
    errors = [deis_errors * 0.01, deis_errors]
    choice = screen.choose(names, errors, [False, True], [14.6, 14.6], 8, samplers, rules)
    assert choice.record["shipped"] == "builtin/deis" and choice.record["fallback"]
    screened_record = choice.record["tail_screen"]["screened"]["on_policy/pretend"]
    assert screened_record["tail"] > choice.record["tail_screen"]["bound"] > 0 and screened_record["beyond_bound"] > 0
    assert screened_record["tail"] > choice.record["tail_screen"]["screened"]["builtin/deis"]["tail"]
    # its tail ranks it below the built-in (or, ranked first, it fails the screen)
    assert choice.record["reason"].startswith("a built-in ranks first") or \
        choice.record["ineligible"]["on_policy/pretend"].startswith("tail screen")


def test_a_plan_as_steady_as_the_builtin_on_the_fresh_samples_ships(screened):
    model, backend, screen, plans, rules = screened
    deis_errors = validation_errors(backend, plans["deis"].coefficients, plans["deis"].timesteps)
    names = ["on_policy/steady", "builtin/deis"]
    samplers = [(plans["deis"].coefficients, plans["deis"].timesteps)] * 2
    choice = screen.choose(names, [deis_errors * 0.25, deis_errors], [False, True], [14.6, 14.6], 8, samplers, rules)
    assert choice.record["shipped"] == "on_policy/steady", choice.record["reason"]
    entry = choice.record["tail_screen"]["screened"]["on_policy/steady"]
    assert entry["passed"] and entry["tail"] == pytest.approx(choice.record["tail_screen"]["screened"]["builtin/deis"]["tail"])


def test_screen_records_are_fresh_seeds_of_the_fit_prompts():
    fit = records_from_prompts([f"a sample of class {i}" for i in range(3)])
    screen = screen_records(fit, 7, base_seed=0)
    assert [r.prompt for r in screen] == [fit[i % 3].prompt for i in range(7)]
    assert len({r.seed for r in screen}) == 7 and not {r.seed for r in screen} & {r.seed for r in fit}
    assert screen == screen_records(fit, 7, base_seed=0) and screen != screen_records(fit, 7, base_seed=1)


def test_screen_samples_is_a_spec_field_and_an_option_outside_the_default_identity():
    assert "screen_samples" not in CalibrationSpec().identity(None)
    assert CalibrationSpec().screen_count(64, 2) == 128 and CalibrationSpec(screen_samples=7).screen_count(64, 2) == 7
    spec, _, _ = parse_calibrate_arguments(["--screen-samples", "0"])
    assert spec.screen_samples == 0 and spec.identity(None)["screen_samples"] == 0
    assert parse_calibrate_arguments(spec.to_arguments())[0] == spec
    with pytest.raises(SpecError, match="screen_samples"):
        CalibrationSpec(screen_samples=-1)


def test_the_screen_size_follows_the_model_family_unless_stated():
    """Networks screen twice the fit prompts by default; the analytic mixtures (closed-form calls, tails of
    0.1-0.4 %) 64 times, in the job and in ``calibrate`` (at least 1024 there); a stated size wins everywhere."""
    from olss_dist.method.run import DEFAULT_SCREEN_SAMPLES, default_screen_count, screen_samples
    from olss_dist.models.analytic import GaussianMixtureFlowModel
    from olss_dist.models.base import DiffusionModel

    assert DiffusionModel.screen_multiple == 2
    vp, flow = GaussianMixtureModel(), GaussianMixtureFlowModel()
    assert vp.screen_multiple == flow.screen_multiple == 64
    assert CalibrationSpec().screen_count(128, vp.screen_multiple) == 8192
    assert CalibrationSpec(screen_samples=5).screen_count(128, vp.screen_multiple) == 5
    assert default_screen_count(vp, 128) == 8192 and default_screen_count(vp, 8) == DEFAULT_SCREEN_SAMPLES == 1024
    assert default_screen_count(lambda x, t, c: x, 128) == 1024  # a bare denoiser: the least screen
    assert ChoiceRules().screen_samples is None and ChoiceRules().screens and not ChoiceRules(screen_samples=0).screens
    noise, cond = samples(vp, 3, 0)
    fresh, taken = screen_samples(noise, cond, ChoiceRules(), default_screen_count(vp, 20))
    assert fresh.shape == (1280, *vp.latent_shape) and torch.equal(taken, cond[torch.arange(1280) % 3])
    assert len(screen_samples(noise, cond, ChoiceRules(screen_samples=7))[0]) == 7


# ------------------------------------------------------------------------------ adjudication by the teacher

@pytest.fixture(scope="module")
def wrong_reference():
    """A screen whose reference (DEIS at 4 of 40 steps) switches mode on fresh samples that its 8 validation samples
    did not show: there the distance to it is the reference's error, not the sampler's."""
    model, backend, solvers, timesteps = taught(8, 256)
    plans = {"teacher": solvers.plan("ddim", TEACHER_STEPS, timesteps), "deis": solvers.plan("deis", 4, timesteps)}
    return model, backend, solvers, timesteps, plans


def screen_of(wrong_reference, teacher_samples):
    model, backend, solvers, timesteps, plans = wrong_reference
    rules = ChoiceRules(screen_samples=256, screen_reference_steps=4, screen_teacher_samples=teacher_samples)
    return TailScreen(backend, solvers, timesteps, rules), rules


def test_the_teacher_adjudicates_where_a_sampler_and_the_reference_part(wrong_reference):
    model, backend, solvers, timesteps, plans = wrong_reference
    teacher = (plans["teacher"].coefficients, plans["teacher"].timesteps)  # DDIM at N steps: the teacher itself
    unjudged, _ = screen_of(wrong_reference, 0)
    assert unjudged.record["reference"] == "builtin/deis"
    charged = unjudged.distance("teacher", *teacher, adjudicate=True)
    assert unjudged.tail(charged) > 0 and not unjudged.judged  # the reference's own errors, charged to the teacher
    screen, _ = screen_of(wrong_reference, 32)
    distance = screen.distance("teacher", *teacher, adjudicate=True)
    flagged = set(np.flatnonzero(charged > screen.bound))
    assert set(screen.judged) == flagged and len(flagged) > 0
    assert np.all(np.asarray(screen.reference_errors) > screen.bound)  # the reference was wrong on every one
    assert screen.tail(distance) == 0 and distance[screen.judged].max() < 1e-5
    handle = run_to_end(backend, SCREEN, *teacher)
    try:  # the teacher ran once per sample and is kept: asked again, the same exact values, in the order asked
        again = backend.teacher_differences(handle, screen.judged[::-1] + screen.judged[:1])
        np.testing.assert_allclose(np.sqrt(again), list(distance[screen.judged[::-1]]) + [distance[screen.judged[0]]])
        with pytest.raises(ValueError, match="screen split"):
            handle_v = run_to_end(backend, "validation", *teacher)
            try:
                backend.teacher_differences(handle_v, [0])
            finally:
                backend.close(handle_v)
    finally:
        backend.close(handle)
    capped, _ = screen_of(wrong_reference, 2)  # at most this many teacher runs, the farthest first
    capped.distance("teacher", *teacher, adjudicate=True)
    assert capped.judged == [int(i) for i in np.argsort(-charged, kind="stable")[:2]]


def test_a_sampler_measured_before_an_adjudication_is_measured_again(wrong_reference):
    """The built-in that is the reference goes free until the teacher shows where it is wrong; then it is charged."""
    model, backend, solvers, timesteps, plans = wrong_reference
    screen, rules = screen_of(wrong_reference, 32)
    names = ["builtin/deis", "on_policy/follows_the_teacher"]
    samplers = [(plans["deis"].coefficients, plans["deis"].timesteps),
                (plans["teacher"].coefficients, plans["teacher"].timesteps)]
    assert screen.tail(screen.distance(*names[:1], *samplers[0])) == 0  # measured first: zero against itself
    deis_errors = validation_errors(backend, *samplers[0])
    choice = screen.choose(names, [deis_errors, deis_errors * 0.25], [True, False], [14.6, 14.6], 8, samplers, rules)
    record = choice.record["tail_screen"]
    assert record["teacher_samples"] == record["reference_beyond_bound"] > 0
    assert record["screened"]["builtin/deis"]["tail"] > 0 == record["screened"]["on_policy/follows_the_teacher"]["tail"]
    assert choice.record["shipped"] == "on_policy/follows_the_teacher", choice.record["reason"]


def test_a_sampler_screened_before_an_adjudication_is_not_run_again_and_reads_the_same(wrong_reference):
    """Within one step count's choice a screened sampler's rollout stays open: samples the teacher adjudicates after
    it cost their teacher differences, not a second rollout over the screen, and the distances equal a fresh run's;
    the rollouts are closed when the choice is made."""
    model, backend, solvers, timesteps, plans = wrong_reference
    screen, rules = screen_of(wrong_reference, 32)
    names = ["builtin/deis", "on_policy/follows_the_teacher"]
    samplers = [(plans["deis"].coefficients, plans["deis"].timesteps),
                (plans["teacher"].coefficients, plans["teacher"].timesteps)]
    deis_errors = validation_errors(backend, *samplers[0])
    open_before = set(backend.rollouts)
    started = []
    original = backend.start
    backend.start = lambda split, *args, **kwargs: started.append(split) or original(split, *args, **kwargs)
    try:
        choice = screen.choose(names, [deis_errors, deis_errors * 0.25], [True, False], [14.6, 14.6], 8, samplers, rules)
    finally:
        del backend.start
    assert choice.record["tail_screen"]["teacher_samples"] > 0 and choice.record["shipped"] == names[1]
    assert started.count(SCREEN) == 2, "each screened sampler ran once over the screen"
    assert not screen.open and set(backend.rollouts) == open_before, "the choice closed the rollouts it kept"
    for name, (coefficients, step_timesteps) in zip(names, samplers):
        handle = run_to_end(backend, SCREEN, coefficients, step_timesteps)
        try:
            expected = np.sqrt(backend.final_differences(handle, screen.handle))
            expected[screen.judged] = np.sqrt(backend.teacher_differences(handle, screen.judged))
        finally:
            backend.close(handle)
        np.testing.assert_allclose(screen.distances[f"{name}@{len(step_timesteps)}"][0], expected, rtol=1e-12, atol=0)


def test_the_teacher_budget_is_per_step_count_and_follows_the_screen_size(wrong_reference):
    model, backend, solvers, timesteps, plans = wrong_reference
    rules = ChoiceRules(screen_samples=256, screen_reference_steps=4)
    screen = TailScreen(backend, solvers, timesteps, rules)
    assert screen.teacher_budget == 1  # one per 256 screen samples
    teacher = (plans["teacher"].coefficients, plans["teacher"].timesteps)
    screen.distance("builtin/ddim", *teacher)  # a built-in asks for no teacher run
    assert screen.judged == []
    screen.distance("on_policy/a", *teacher, adjudicate=True)
    assert len(screen.judged) == 1
    coarse = solvers.plan("ddim", 8, timesteps)  # another step count has its own budget
    screen.distance("on_policy/b", coarse.coefficients, coarse.timesteps, adjudicate=True)
    assert len(screen.judged) == 2 and screen.judged_by_steps == {TEACHER_STEPS: 1, 8: 1}


def test_a_screen_of_fewer_than_256_samples_asks_the_teacher_nothing_unless_told(screened):
    model, backend, screen, plans, rules = screened  # 96 screen samples: a network's screen size
    assert screen.samples == 96 and screen.teacher_budget == 0
    told = TailScreen(backend, process_builtins(model.noise_process), model.noise_process.teacher_schedule(TEACHER_STEPS)
                      .stored_timesteps(), ChoiceRules(screen_samples=96, screen_teacher_samples=3))
    assert told.teacher_budget == 3
