"""The 5-step frontier (issue 16 §4): on-policy node search and Gauss-Newton refinement, measured on held-out samples.

    python benchmarks/quality_5step_frontier.py --model analytic --prompts 192 --held-out 256
    python benchmarks/quality_5step_frontier.py --model embedded --prompts 80 --held-out 128 --batch-size 16

Calibrates in one process as the job does (``run_method`` on an ``InProcessBackend``, N = 1000, the prompts
split by ``--validation-fraction``), keeping every train teacher state. Then, from the best fitted 5-step
candidate by validation RMSE, ``method.node_search.search_nodes`` moves one node at a time, each trial
refitted on-policy and scored by the train split's final error; ``refine_coefficients`` runs Levenberg-
Marquardt on every coefficient against the final train error, from the shipped plan and from the searched
one. Every variant, the shipped 5- and 10-step plans and every built-in at 5 and 10 steps (trailing in OLSS
form; the model's config through the diffusers loop) run on ``--held-out`` fresh samples (evaluate's seed
domain) against the 1000-step teacher. Prints pooled / median / worst RMSE and each ratio to the best
built-in at 5 and at 10 steps. A quality measurement, not a timing.
"""

from __future__ import annotations

import tempfile
import time

from common import pin_threads

pin_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402

from olss_dist.apps.evaluate.run import run_sampler  # noqa: E402
from olss_dist.apps.evaluate.samples import evaluation_set  # noqa: E402
from olss_dist.core.builtin import builtin_scheduler, family_builtins, process_builtins  # noqa: E402
from olss_dist.core.teacher import schedule_states  # noqa: E402
from olss_dist.method.node_search import final_mse, refine_coefficients, search_nodes  # noqa: E402
from olss_dist.method.rollouts import InProcessBackend, batch_slices, select  # noqa: E402
from olss_dist.method.run import run_method  # noqa: E402
from olss_dist.models import load_model  # noqa: E402
from olss_dist.prompts import read_prompts, split_validation  # noqa: E402


def main(
    model_spec: str = typer.Option("analytic", "--model", help="load_model spec"),
    prompts: int = typer.Option(192, help="calibration prompts (the model's, cycled)"),
    validation_fraction: float = typer.Option(0.3334, help="held out of the fit to choose each plan"),
    held_out: int = typer.Option(256, help="fresh samples that score the samplers"),
    batch_size: int = typer.Option(0, help="samples per model call (0: all)"),
    rounds: int = typer.Option(3, help="Levenberg-Marquardt steps"),
    max_evaluations: int = typer.Option(120, help="on-policy fits the node search may try"),
) -> None:
    started = time.monotonic()
    model = load_model(model_spec)
    base_prompts = model.default_prompts()
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as handle:
        handle.write("\n".join(base_prompts[i % len(base_prompts)] for i in range(prompts)))
        handle.flush()
        records = read_prompts(handle.name)
    fit, validation = split_validation(records, validation_fraction, base_seed=0)
    encode = lambda rs: (model.initial_noise([r.seed for r in rs]), model.encode_prompts([r.prompt for r in rs]))
    batch = batch_size or None
    backend = InProcessBackend(model, *encode(fit), *encode(validation), batch_size=batch)
    backend.keep_train_states = lambda *args, **kwargs: None  # the search reaches any node
    process = model.noise_process
    plans, _ = run_method(backend, process, 1000, (5, 10))
    timesteps = process.teacher_schedule(1000).stored_timesteps()
    print(f"calibrated in {time.monotonic() - started:.0f} s: {len(fit)} fit / {len(validation)} validation samples")
    fitted = [c for c in plans[5].candidates if c["fit"] == "on_policy"]
    start = min(fitted, key=lambda c: c["rmse"])
    print(f"5 steps: shipped {plans[5].choice['shipped']} nodes {plans[5].nodes}; search starts at {start['name']} {start['nodes']}")
    searched = search_nodes(backend, start["nodes"], timesteps, start["ridge"] or 0.0, max_evaluations=max_evaluations, progress=print)
    print(f"node search: {searched.evaluations} fits, train RMSE {searched.start_rmse:.4g} -> {searched.train_rmse:.4g}, nodes {searched.nodes}")
    x_T, cond = backend.splits["train"]
    target = backend.train_states[1000]
    refined_shipped, history_shipped = refine_coefficients(plans[5].coefficients, model, x_T, cond, plans[5].timesteps, target, rounds)
    refined_searched, history_searched = refine_coefficients(searched.coefficients, model, x_T, cond, timesteps[searched.nodes], target, rounds)
    print(f"refinement train RMSE: shipped {history_shipped}, searched {history_searched}")
    print(f"search and refinement done at {time.monotonic() - started:.0f} s")

    held = evaluation_set(model, held_out, None, None, 7, [r.seed for r in records])
    teacher = process.teacher_schedule(1000)
    reference = torch.cat([schedule_states(model, held.x_T[rows], select(held.cond, rows), teacher, [1000])[:, 0]
                           for rows in batch_slices(held_out, batch)])

    def olss(coefficients, step_timesteps):
        return np.concatenate([final_mse(coefficients, model, held.x_T[rows], select(held.cond, rows), step_timesteps, reference[rows])
                               for rows in batch_slices(held_out, batch)])

    rows = {
        "5: shipped": olss(plans[5].coefficients, plans[5].timesteps),
        "5: node search": olss(searched.coefficients, timesteps[searched.nodes]),
        "5: shipped + LM refinement": olss(refined_shipped, plans[5].timesteps),
        "5: node search + LM refinement": olss(refined_searched, timesteps[searched.nodes]),
        "10: shipped": olss(plans[10].coefficients, plans[10].timesteps),
    }
    solvers = process_builtins(process)
    for k in (5, 10):
        for name in solvers.names:
            plan = solvers.plan(name, k, timesteps)
            rows[f"{k}: {name} ({solvers.spacing})"] = olss(plan.coefficients, plan.timesteps)
        if process.kind == "vp":
            for name in family_builtins("vp"):
                scheduler_mse = []
                for part in batch_slices(held_out, batch):
                    final, _ = run_sampler(builtin_scheduler(name, dict(model.scheduler_config)), model, held.x_T[part],
                                           select(held.cond, part), k)
                    scheduler_mse.append(((final.double() - reference[part].double()) ** 2).reshape(len(final), -1).mean(1).numpy())
                rows[f"{k}: {name} (config)"] = np.concatenate(scheduler_mse)
    best = {k: min((v.mean(), n) for n, v in rows.items() if n.startswith(f"{k}:") and "shipped" not in n and "search" not in n)
            for k in (5, 10)}
    print(f"{held_out} held-out samples; best built-in at 5: {best[5][1]}, at 10: {best[10][1]}")
    print("| sampler | pooled RMSE | median | worst | / best built-in at 5 | / best built-in at 10 |\n|---|---|---|---|---|---|")
    for name, mse in rows.items():
        root = np.sqrt(mse)
        print(f"| {name} | {np.sqrt(mse.mean()):.4g} | {np.median(root):.4g} | {root.max():.3g} | "
              f"{np.sqrt(mse.mean() / best[5][0]):.3f} | {np.sqrt(mse.mean() / best[10][0]):.3f} |")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    typer.run(main)
