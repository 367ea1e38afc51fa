"""Core maths against raw-row least squares: teacher, statistics, fits, merge, planner."""

import numpy as np
import pytest
import torch

from core_data import raw_lstsq, raw_rows, small_model, trajectories
from olss_dist import Calibration, record_trajectories, trailing_timesteps
from olss_dist.core.path_search import SearchErrors, even_nodes, exhaustive_greedy_path, greedy_path, search_nodes
from olss_dist.core.lstsq import tail_sums_of_squares
from olss_dist.core.tsqr import fold_into, streaming_r_factor


def assert_same_gram(a: Calibration, b: Calibration) -> None:
    """R is unique only up to row signs and, since DDIM states are exact combinations of earlier
    columns, up to rotations of its rank-deficient rows; R^T R (= A^T A) is unique."""
    gram_a, gram_b = a.r_factor.T @ a.r_factor, b.r_factor.T @ b.r_factor
    np.testing.assert_allclose(gram_a, gram_b, rtol=1e-10, atol=1e-10 * np.abs(gram_b).max())


def test_trailing_timesteps_cover_999_to_0():
    assert trailing_timesteps(1000).tolist() == list(range(999, -1, -1))
    coarse = trailing_timesteps(10)
    assert coarse[0] == 999 and np.all(np.diff(coarse) < 0) and len(coarse) == 10


def test_teacher_equals_hand_written_ddim():
    model = small_model()
    x = torch.randn(3, *model.latent_shape, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2])
    timesteps = trailing_timesteps(25)
    states, noise_preds = record_trajectories(model, x, cond, timesteps, model.alphas_cumprod)
    alphas = list(model.alphas_cumprod[timesteps]) + [1.0]
    for n, t in enumerate(timesteps):
        eps = model(x, int(t), cond)
        x0 = (x - (1 - alphas[n]) ** 0.5 * eps) / alphas[n] ** 0.5
        x = alphas[n + 1] ** 0.5 * x0 + (1 - alphas[n + 1]) ** 0.5 * eps
        torch.testing.assert_close(noise_preds[:, n], eps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(states[:, n + 1], x, rtol=1e-10, atol=1e-10)


def test_fit_equals_raw_row_lstsq():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    nodes = [0, 3, 9, 20, 31]
    coefficients, step_errors = calibration.fit(nodes)
    s, e = raw_rows(states, noise_preds)
    targets = nodes[1:] + [len(timesteps)]
    for i, target in enumerate(targets):
        features = np.column_stack([s[:, 0]] + [e[:, n] for n in nodes[: i + 1]])
        weights, error = raw_lstsq(features, s[:, target])
        np.testing.assert_allclose(coefficients[i, : i + 2], weights, rtol=1e-8)
        assert coefficients[i, i + 2 :].tolist() == [0.0] * (len(nodes) - i - 1)
        np.testing.assert_allclose(step_errors[i], error, rtol=1e-6)


def test_search_errors_equal_raw_local_fits():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    nodes = [0, 5, 14, 27]
    s, e = raw_rows(states, noise_preds)
    targets = nodes[1:] + [len(timesteps)]
    expected = [
        raw_lstsq(np.column_stack([s[:, n]] + [e[:, m] for m in nodes[: i + 1]]), s[:, targets[i]])[1]
        for i, n in enumerate(nodes)
    ]
    np.testing.assert_allclose(calibration.search_errors(nodes), expected, rtol=1e-6, atol=1e-14)


def test_merge_matches_concatenated_batch_in_any_order():
    states, noise_preds, timesteps = trajectories()
    whole = Calibration.from_trajectories(states, noise_preds, timesteps)
    parts = [Calibration.from_trajectories(states[a:b], noise_preds[a:b], timesteps) for a, b in ((0, 5), (5, 13), (13, 24))]
    nodes = [0, 4, 11, 30]
    for ordering in ([0, 1, 2], [2, 0, 1]):
        merged = Calibration.merge([parts[i] for i in ordering])
        assert merged.num_samples == whole.num_samples and merged.num_rows == whole.num_rows
        assert_same_gram(merged, whole)
        for got, want in zip(merged.fit(nodes), whole.fit(nodes)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_chunked_streaming_equals_one_chunk(chunk_rows):
    states, noise_preds, timesteps = trajectories()
    whole = Calibration.from_trajectories(states, noise_preds, timesteps, chunk_rows=10**6)
    chunked = Calibration.from_trajectories(states, noise_preds, timesteps, chunk_rows=chunk_rows)
    assert_same_gram(chunked, whole)
    for got, want in zip(chunked.fit([0, 2, 17]), whole.fit([0, 2, 17])):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


def test_save_load_round_trip(tmp_path):
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states.numpy(), noise_preds.numpy(), timesteps)
    calibration.save(tmp_path / "calibration.safetensors")
    loaded = Calibration.load(tmp_path / "calibration.safetensors")
    assert np.array_equal(loaded.r_factor, calibration.r_factor)
    assert np.array_equal(loaded.timesteps, calibration.timesteps)
    assert (loaded.num_samples, loaded.num_rows) == (calibration.num_samples, calibration.num_rows)
    assert np.allclose(np.tril(loaded.r_factor, -1), 0)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 39, 40])
def test_plan_has_exactly_k_valid_nodes_and_beats_uniform(num_steps):
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    plan = calibration.plan(num_steps)
    assert len(plan.nodes) == num_steps and plan.nodes[0] == 0
    assert all(b > a for a, b in zip(plan.nodes, plan.nodes[1:])) and plan.nodes[-1] < 40
    assert plan.timesteps.tolist() == timesteps[plan.nodes].tolist()
    assert plan.coefficients.shape == (num_steps, num_steps + 1)
    uniform = calibration.search_errors(even_nodes(40, num_steps)).max()
    assert plan.search_errors.max() <= uniform * (1 + 1e-12)
    np.testing.assert_allclose(plan.search_errors, calibration.search_errors(plan.nodes))


def test_plan_is_strictly_better_than_uniform_on_curved_trajectories():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    plan = calibration.plan(6)
    assert plan.spacing == "minimax"
    assert plan.search_errors.max() < 0.9 * calibration.search_errors(even_nodes(40, 6)).max()


def test_plan_on_exact_linear_data_splits_short_greedy_paths():
    """A pure-noise teacher is exactly linear: every step has zero error, greedy needs one node."""
    timesteps = trailing_timesteps(12)
    x = torch.randn(6, 3, dtype=torch.float64)
    states = torch.stack([x * (1 - n / 12) for n in range(13)], 1)
    noise_preds = torch.stack([x] * 12, 1)
    plan = Calibration.from_trajectories(states, noise_preds, timesteps).plan(4)
    assert len(plan.nodes) == 4 and plan.nodes[0] == 0


@pytest.mark.parametrize("num_steps", [0, 41, -1])
def test_plan_rejects_out_of_range_step_counts(num_steps):
    states, noise_preds, timesteps = trajectories()
    with pytest.raises(ValueError, match="num_steps must be between 1 and"):
        Calibration.from_trajectories(states, noise_preds, timesteps).plan(num_steps)


def test_bad_inputs_raise_clear_errors():
    states, noise_preds, timesteps = trajectories()
    broken = states.clone()
    broken[0, 3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Calibration.from_trajectories(broken, noise_preds, timesteps)
    with pytest.raises(ValueError, match="noise_preds must have shape"):
        Calibration.from_trajectories(states, noise_preds[:, :-1], timesteps)
    with pytest.raises(ValueError, match="states per sample"):
        Calibration.from_trajectories(states, noise_preds, timesteps[:-1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        Calibration.from_trajectories(states, noise_preds, timesteps[::-1])
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    with pytest.raises(ValueError, match="different teacher timesteps"):
        other_states, other_preds, other_timesteps = trajectories(num_teacher_steps=20)
        Calibration.merge([calibration, Calibration.from_trajectories(other_states, other_preds, other_timesteps)])
    with pytest.raises(ValueError, match="strictly increasing"):
        calibration.fit([0, 5, 5])
    with pytest.raises(ValueError, match="start at 0"):
        calibration.fit([1, 5])


def random_r(num_teacher_steps: int, num_rows: int, seed: int) -> np.ndarray:
    """R of random rows with a random walk per column: search errors that are not monotone in the step."""
    rng = np.random.default_rng(seed)
    rows = np.cumsum(rng.standard_normal((num_rows, 2 * num_teacher_steps + 1)), axis=1)
    rows += 0.3 * rng.standard_normal(rows.shape) * rng.uniform(0, 3, rows.shape[1])
    return np.linalg.qr(rows, mode="r")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_search_equals_exhaustive_scan_on_random_r(seed):
    n = 30
    r = random_r(n, 200, seed)
    errors = SearchErrors(r, 200)
    non_monotone = sum(np.any(np.diff(errors.from_prefix((0, m))) < 0) for m in range(1, n))
    assert non_monotone > 0  # a bisection on the step length would not be exact here
    for num_steps in (1, 2, 3, 5, 8, 13, 30):
        pruned_errors, full_errors = SearchErrors(r, 200), SearchErrors(r, 200)
        pruned = search_nodes(pruned_errors, num_steps)
        full = search_nodes(full_errors, num_steps, greedy=exhaustive_greedy_path)
        assert pruned[0] == full[0]
        np.testing.assert_allclose(pruned[1], full[1], rtol=1e-12)
        assert pruned_errors.evaluations <= full_errors.evaluations
    for bound in np.quantile(errors.from_prefix((0,)), [0.05, 0.3, 0.7]):
        for max_nodes in (2, 4, 30):
            assert greedy_path(SearchErrors(r, 200), bound, max_nodes) == exhaustive_greedy_path(SearchErrors(r, 200), bound, max_nodes)


def test_lower_bounds_never_exceed_search_errors():
    errors = SearchErrors(random_r(20, 100, 3), 100)
    for prefix in [(0,), (0, 3), (0, 3, 9), (0, 1, 2, 15)]:
        assert np.all(errors.lower_bounds(prefix) <= errors.from_prefix(prefix))


def test_pruned_search_equals_exhaustive_scan_on_trajectories():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    for num_steps in (2, 5, 10, 20):
        pruned = search_nodes(SearchErrors(calibration.r_factor, calibration.num_rows), num_steps)
        full = search_nodes(SearchErrors(calibration.r_factor, calibration.num_rows), num_steps, greedy=exhaustive_greedy_path)
        assert pruned[0] == full[0]


def test_streamed_fold_equals_one_qr_and_accepts_any_chunking():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((300, 41)) @ rng.standard_normal((41, 41))
    whole = np.linalg.qr(rows, mode="r")
    for size in (1, 37, 41, 300):
        streamed = streaming_r_factor(iter(torch.from_numpy(rows).split(size)), 41).numpy()
        assert np.allclose(np.tril(streamed, -1), 0)
        np.testing.assert_allclose(streamed.T @ streamed, whole.T @ whole, rtol=1e-10, atol=1e-10 * np.abs(rows).max() ** 2)
    few = np.linalg.qr(rows[:10], mode="r")
    folded = np.zeros((41, 41), order="F")
    fold_into(folded, rows[:10])
    np.testing.assert_allclose(folded.T @ folded, few.T @ few, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="expected 41"):
        streaming_r_factor(iter([torch.zeros(3, 40)]), 41)


def test_float32_trajectories_reduce_like_their_float64_copy():
    states, noise_preds, timesteps = trajectories()
    single = Calibration.from_trajectories(states.float(), noise_preds.float(), timesteps, chunk_rows=50)
    double = Calibration.from_trajectories(states.float().double(), noise_preds.float().double(), timesteps)
    assert_same_gram(single, double)


def test_search_errors_do_not_depend_on_the_order_they_are_asked_for():
    r = random_r(40, 150, 4)
    forward, backward = SearchErrors(r, 150), SearchErrors(r, 150)
    prefix = (0, 3, 11)
    steps = np.arange(40 - 11)
    for step in steps:
        forward.at(prefix, [step])
    backward.at(prefix, steps[::-7])
    assert np.array_equal(forward.from_prefix(prefix), backward.from_prefix(prefix))
    np.testing.assert_array_equal(SearchErrors(r, 150).state_tails, tail_sums_of_squares(r, np.arange(0, 81, 2)))


def test_plans_sharing_one_memo_equal_fresh_searches():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    for num_steps in (7, 3, 12):
        fresh, _ = search_nodes(SearchErrors(calibration.r_factor, calibration.num_rows), num_steps)
        assert calibration.plan(num_steps).nodes == fresh
