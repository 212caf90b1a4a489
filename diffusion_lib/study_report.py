"""A study's report: its description (what the study file says and what was actually run) and report.md."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from .mining import STRATEGIES
from .study import Study


def describe(study: Study) -> str:
    """The report's description: the study file's text (unless it names strategies this study does not
    run, e.g. after --strategies), then what was actually run, from the first run's resolved config."""
    config = study.runs[0].config
    run_strategies = set(study.strategies) | {m.get("strategy") for m in study.strategies.values()}
    absent = [name for name in STRATEGIES if name not in run_strategies
              and re.search(rf"\b{re.escape(name)}\b", study.description)]  # fmt: skip
    text = study.description.strip()
    if absent:  # the file's description was written for its full set of strategies
        text = (f"(The study file's description is left out: it names {', '.join(absent)}, which this study does "
                "not run.)")
    budget = config.train.budget_flops  # 0: the runs trained train.steps
    length = f"a budget of {budget:.3g} training FLOPs" if budget else f"{config.train.steps} steps"
    flow = {label: yaml.safe_dump(mining, default_flow_style=True, sort_keys=False, width=10**6).strip()
            for label, mining in study.strategies.items()}  # fmt: skip
    lines = [
        text,
        f"Strategies ({len(flow)}): " + "; ".join(f"`{label}: {mining}`" for label, mining in flow.items()) + ".",
        f"Task: {config.task['dataset']} ({_keys(config.task, 'dataset')}); model {config.model['name']} "
        f"({_keys(config.model, 'name')}); {length} of batch {config.train.batch_size}, lr {config.train.lr}, "
        f"{config.diffusion.timesteps} diffusion steps, {config.diffusion.inference_steps} inner steps per step "
        f"when sampling; held-out sets of {config.eval.num_samples} problems; seeds {', '.join(map(str, study.seeds))}.",
    ]
    if study.sweep:
        lines.append("Sweep: " + "; ".join(f"{key} in {values}" for key, values in study.sweep.items()) + ".")
    return "\n\n".join(line for line in lines if line)


def _keys(options: dict, skip: str) -> str:
    """'rank 20, ood False': a resolved task or model map's keys but its name."""
    return ", ".join(f"{key} {value}" for key, value in options.items() if key != skip)


def report(study: Study, study_dir: Path) -> int:
    """Write the study's report.md (tables and plots) from its runs' records, and say where; the exit
    code: 1 when no run finished (the report then has no result)."""
    from .report import write_report
    from .tasks import task_title  # torch: not needed to answer --help

    records = [run.record() for run in study.runs]
    tasks = ", ".join(dict.fromkeys(task_title(run.config.task) for run in study.runs))
    write_report(study_dir, records, title=f"Negative mining on {tasks}: study '{study.name}'",
                 description=describe(study), primary=study.primary)
    print(f"report: {study_dir / 'report.md'}")
    if not any(record.finished for record in records):
        print(f"error: no run of the study finished ({', '.join(sorted({r.status for r in records}))}); "
              f"see {study_dir / 'report.md'}", file=sys.stderr)
        return 1
    return 0
