"""The default job (``python jobs/calibrate.py``: embedded model, N = 1000) in two worker layouts, one run.

- ``before``: the layout the job used until the planner moved onto the job's actors: one CPU actor
  fewer than the machine has CPUs (one core kept free for planner tasks that start only after the
  teacher), i.e. ``--num-workers <CPUs - 1>``, validation prompts in shards of ``--shard-size``;
- ``after``: the job's default now: one actor per CPU (every core works during the teacher), the
  path search on those actors, the held-out prompts spread over all of them.

Both run the same command otherwise (same prompts, seeds, N, steps), one after the other, each in its
own local Ray (``jobs/calibrate.py`` as a subprocess, wall time from start to the printed URI). The
script prints both wall times, their ratio, and compares the published validation figures: every
candidate's held-out RMSE, the shipped plan per step count and its nodes.

    python benchmarks/bench_default_job.py                    # full size (N = 1000): two default jobs in a row
    python benchmarks/bench_default_job.py --quick            # N = 100 (the same on-policy rounds, a tenth of the teacher)
    python benchmarks/bench_default_job.py --json out.json    # also write the figures
    python benchmarks/bench_default_job.py --quick -- --steps 10,20 --img2img-strengths none   # options for both jobs

Both jobs must publish the same config (the script stops otherwise: on a working tree others edit,
the defaults could change between the two runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import describe_machine, pin_threads  # noqa: E402  (pins threads before numpy loads)


def run_layout(name: str, workers: int | None, root: Path, teacher_steps: int, extra: list[str]) -> dict:
    """One default job; returns its wall time, published report and the lines it printed."""
    output = root / name
    command = [sys.executable, "jobs/calibrate.py", "--output", str(output), "--teacher-steps", str(teacher_steps), *extra]
    if workers is not None:
        command += ["--num-workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local Ray
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for attempt in range(2):  # a local Ray that timed out starting (a loaded machine) is started once more
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode == 0 or "timed out during startup" not in result.stderr:
            break
        print(f"{name}: the local Ray timed out starting; starting it once more", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the {name} layout failed: {result.stderr.strip().splitlines()[-1:]}")
    run = Path(result.stdout.strip().splitlines()[-1])
    report = json.loads((run / "report.json").read_text())
    return {"seconds": seconds, "report": report, "stdout": result.stdout}


def validation_figures(report: dict) -> dict:
    """``{K: {"shipped": name, "nodes": [...], "rmse": {candidate: rmse}}}`` of a report."""
    return {
        plan["num_steps"]: {
            "shipped": next(c["name"] for c in plan["candidates"] if c["rmse"] == plan["validation_rmse"]),
            "nodes": plan["nodes"],
            "rmse": {c["name"]: c["rmse"] for c in plan["candidates"]},
        }
        for plan in report["plans"]
    }


def compare(before: dict, after: dict) -> dict:
    """Largest relative difference of any candidate's RMSE, and whether shipped plans and nodes agree."""
    worst = 0.0
    for k, figures in before.items():
        for name, rmse in figures["rmse"].items():
            other = after[k]["rmse"][name]
            worst = max(worst, abs(other - rmse) / max(abs(rmse), 1e-300))
    return {
        "max_relative_rmse_difference": worst,
        "same_shipped_plans": all(before[k]["shipped"] == after[k]["shipped"] for k in before),
        "same_nodes": all(before[k]["nodes"] == after[k]["nodes"] for k in before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="N = 100 (same layouts, a few minutes)")
    parser.add_argument("--order", default="before,after", help="layouts in run order (default: before,after)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("job_options", nargs="*", help="after --: more jobs/calibrate.py options, for both layouts")
    arguments = parser.parse_args()
    pin_threads()
    teacher_steps = 100 if arguments.quick else arguments.teacher_steps
    cpus = os.cpu_count() or 1
    layouts = {"before": max(1, cpus - 1), "after": None}
    print(describe_machine(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_default_job_") as root:
        for name in arguments.order.split(","):
            results[name] = run_layout(name, layouts[name], Path(root), teacher_steps, ["--quiet", *arguments.job_options])
            workers = len(results[name]["report"]["workers"])
            print(f"{name}: {workers} workers, {results[name]['seconds']:.1f} s", flush=True)
    configs = {name: r["report"]["config"] for name, r in results.items()}
    if configs["before"] != configs["after"]:
        raise SystemExit(f"error: the two jobs ran different configs: {configs}")
    figures = {name: validation_figures(r["report"]) for name, r in results.items()}
    agreement = compare(figures["before"], figures["after"])
    summary = {
        "machine": describe_machine(),
        "teacher_steps": teacher_steps,
        "job_options": arguments.job_options,
        "config": configs["after"],
        "cpus": cpus,
        "seconds": {name: r["seconds"] for name, r in results.items()},
        "workers": {name: len(r["report"]["workers"]) for name, r in results.items()},
        "report_seconds": {name: r["report"]["seconds"] for name, r in results.items()},
        "speedup": results["before"]["seconds"] / results["after"]["seconds"],
        **agreement,
        "figures": figures,
    }
    print(
        f"N={teacher_steps}: before {summary['seconds']['before']:.1f} s ({summary['workers']['before']} workers), "
        f"after {summary['seconds']['after']:.1f} s ({summary['workers']['after']} workers): "
        f"{summary['speedup']:.2f}x; validation RMSEs differ by at most {agreement['max_relative_rmse_difference']:.2e} "
        f"(relative), same shipped plans: {agreement['same_shipped_plans']}, same nodes: {agreement['same_nodes']}"
    )
    for k, shipped in figures["after"].items():
        print(f"  {k} steps: shipped {shipped['shipped']} (RMSE {shipped['rmse'][shipped['shipped']]:.4g}), nodes {shipped['nodes']}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
