"""On-policy evaluation of a published OLSS run against diffusers' built-in solvers on held-out samples.

Samplers, each run by the same generic diffusers loop from the same ``x_T`` and scored against the
N-step teacher's final latent (``run``): the model's noise process's teacher, DDIM for VP models and the
model's own flow-matching Euler schedule for flow models:

- ``olss (shipped)``: the run's ``scheduler_config.json`` as users load it (``OLSSScheduler``).
- ``olss-paper (same nodes)`` / ``olss-paper (uniform)``: the paper's teacher-forced fit from the run's
  calibration statistics, on the shipped nodes and on evenly spaced nodes.
- ``olss-onpolicy (uniform)``: the method's on-policy fit on evenly spaced nodes, refitted on fresh fit
  samples (the run keeps no teacher states) when ``uniform_fit_samples > 0``.
- ``ddim``, ``pndm``, ``dpmsolver++`` (2M), ``unipc``, ``euler``, ``deis`` (``core.builtin.BUILTIN_SOLVERS``),
  each twice: ``(config)`` built with ``from_config(model.scheduler_config)`` as users do, and
  ``(trailing)`` with ``timestep_spacing="trailing"`` and, where the solver has it, ``set_alpha_to_one=True``
  (the last step reaches the clean sample, as the teacher's does). Both use ``prediction_type="epsilon"``:
  model adapters return epsilon.
- flow models instead: ``flow-euler`` (``FlowMatchEulerDiscreteScheduler``), ``flow-dpmsolver++`` (2M) and
  ``flow-unipc`` (``use_flow_sigmas=True, prediction_type="flow_prediction"``, ``flow_shift`` = the model's
  shift), each ``(config)`` only, run at the model's ``mu`` where it shifts dynamically.

Modules: ``samples`` (held-out seeds and samples), ``samplers`` (the samplers above), ``published``
(reading the run), ``run`` (teacher, sampling loop, metrics, ``run_evaluation``), ``results`` (what it
returns), ``report`` (markdown, terminal tables, JSON, ``write_outputs``, ``evaluate_and_report``),
``plots`` (matplotlib figures).
"""

from olss_dist.apps.evaluate.published import CalibratedRun, calibration_seeds, load_calibrated_run
from olss_dist.apps.evaluate.report import evaluate_and_report, rich_tables, to_markdown, write_outputs
from olss_dist.apps.evaluate.results import SHIPPED_LABEL, Evaluation, SamplerResult
from olss_dist.apps.evaluate.run import evaluate, run_evaluation, run_sampler, sample_metrics, teacher_states
from olss_dist.apps.evaluate.samplers import (
    Sampler,
    builtin_samplers,
    fit_uniform_on_policy,
    olss_sampler,
    paper_plans,
    shipped_sampler,
)
from olss_dist.apps.evaluate.samples import EvaluationSet, evaluation_seeds, evaluation_set
from olss_dist.core.builtin import builtin_scheduler

__all__ = [
    "SHIPPED_LABEL",
    "CalibratedRun",
    "Evaluation",
    "EvaluationSet",
    "Sampler",
    "SamplerResult",
    "builtin_samplers",
    "builtin_scheduler",
    "calibration_seeds",
    "evaluate",
    "evaluate_and_report",
    "evaluation_seeds",
    "evaluation_set",
    "fit_uniform_on_policy",
    "load_calibrated_run",
    "olss_sampler",
    "paper_plans",
    "rich_tables",
    "run_evaluation",
    "run_sampler",
    "sample_metrics",
    "shipped_sampler",
    "teacher_states",
    "to_markdown",
    "write_outputs",
]
