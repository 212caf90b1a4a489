"""The helpers every script builds runs with: a run's task, its model, its trainer (train.py and the study
script use them; an experiment script of your own imports them from train.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from diffusion_lib.harness.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from diffusion_lib.diffusion import GaussianDiffusion1D
    from diffusion_lib.harness.trainer import Trainer1D
    from diffusion_lib.tasks.base import Task


def create_dataset(config: RunConfig) -> Task:
    """The task `config.task` names (tasks.TASKS)."""
    from diffusion_lib.tasks.base import make_task

    return make_task(config.task)


def create_diffusion_model(config: RunConfig | Sequence[RunConfig], task: Task) -> GaussianDiffusion1D:
    """The model for one run, or for a pack of runs (configs differing only in seed and folder); a model
    that does not pack refuses more than one run in one line."""
    from diffusion_lib.diffusion import GaussianDiffusion1D
    from diffusion_lib.models import build_model

    configs = [config] if isinstance(config, RunConfig) else list(config)
    try:
        model = build_model(configs[0].model, task, runs=len(configs))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for run, run_config in enumerate(configs):
        model.ebm.init_run(run, run_config.seed)  # the seed fixes the initial weights
    settings = configs[0].diffusion
    return GaussianDiffusion1D(
        model,
        timesteps=settings.timesteps,
        mining_config=configs[0].mining,
        inference_steps=settings.inference_steps,
        inference_step_scale=settings.inference_step_scale,
        inference_step_schedule=settings.inference_step_schedule,
        answer=settings.answer,
        data_bound=task.answer_bound,
        sampler=settings.sampler,
        corrupt=task.corrupt,
    )


def create_trainer(
    config: RunConfig | Sequence[RunConfig],
    diffusion: GaussianDiffusion1D,
    task: Task,
    *,
    resume: bool = False,
    overwrite: bool = False,
    label: str = "",
) -> Trainer1D:
    from diffusion_lib.harness.trainer import Trainer1D, make_accelerator

    first = config if isinstance(config, RunConfig) else config[0]
    return Trainer1D(
        diffusion, task, config, make_accelerator(first.device),
        resume=resume, overwrite=overwrite, label=label,
    )


def build_trainer(configs: list[RunConfig], **options: object) -> Trainer1D:
    """A pack's trainer, built as train.py builds a run's (options: create_trainer's resume=, label=)."""
    task = create_dataset(configs[0])
    return create_trainer(configs, create_diffusion_model(configs, task), task, **options)
