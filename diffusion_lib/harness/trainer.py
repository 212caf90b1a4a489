"""Trainer1D: trains one run, or a pack of runs that share every shape, as one batched model.

A pack's runs differ only in their seed (and folder): their weights are stacked on a leading dimension
(models.py), each draws its own data and noise from its own seed, and each keeps its own optimiser
state, EMA, metrics, checkpoints and final.json, exactly as if it trained alone. Nothing reads the
device on a training step: statistics and divergence flags accumulate there and are read when the loop
pauses to log, validate or save. Scoring is the Evaluator's (evaluate.py).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from ema_pytorch import EMA
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from diffusion_lib.diffusion import Draws, GaussianDiffusion1D
from diffusion_lib.harness.checkpoint import load_pack, save_pack
from diffusion_lib.harness.cli import out_of_memory
from diffusion_lib.harness.config import PER_RUN_KEYS, ConfigError, RunConfig, TrainConfig, config_differences
from diffusion_lib.harness.evaluate import Evaluator, precision
from diffusion_lib.harness.io import FolderLock, bar_rate
from diffusion_lib.harness.run_dir import (
    RESUMABLE_CHANGES, Final, RunDir, ScoringOutOfMemory, TrainingInterrupted, code_version,
)
from diffusion_lib.harness.stopping import Divergence, ScoringInterrupted, StopRequest
from diffusion_lib.tasks.base import Task, mix_seed

# per-run statistics averaged over a log interval ("accept_rate_steps" is a list: one rate per inner step)
LOGGED = ("loss", "loss_denoise", "loss_energy", "energy_pos", "energy_neg",
          "accept_rate", "accept_rate_steps", "energy_decrease", "move_rms")


@lru_cache(maxsize=None)
def make_accelerator(device: str = "auto") -> Accelerator:
    """One Accelerator per process and device (accelerate's state is process-global)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use --device auto or --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device = 'mps' but MPS is not available here; use --device auto or --device cpu")
    return Accelerator(cpu=device == "cpu")


def check_pack(configs: Sequence[RunConfig], accelerator: Accelerator) -> None:
    """Runs train together only if their configs agree on everything but seed and folder; their dashboard's
    package must be installed, and their batch split evenly over the processes."""
    for other in configs[1:]:
        differing = config_differences(configs[0], other, ignore=PER_RUN_KEYS)
        if differing:
            raise ValueError(f"runs of a pack must share their config but for {PER_RUN_KEYS}; these differ: {differing}")
    train = configs[0].train
    check_tracker(train.log_with)
    if train.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size = {train.batch_size} must be divisible by the {accelerator.num_processes} processes"
        )


def learning_rate(train: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of the optimiser step taken at `step` (0-based) of `total_steps`."""
    if train.lr_decay == "constant":
        return train.lr
    return train.lr * (1 + math.cos(math.pi * step / total_steps)) / 2


# -- the EMA: ema-pytorch's, with the warm-up the reference runs used ---------------------------------------
# The trainer calls `update()` once per optimiser step, so ema-pytorch's update count is the training step
# (one count for a pack: its runs' weights are stacked in one model). The update made after `step` steps,
# when `step` is a multiple of `update_every`, is a plain copy up to `update_after_step`, then moves towards
# the online model with decay min(beta, 1 - (1 + step - update_after_step)^-power). With the reference
# values (beta 0.995, every 10, after 100, power 2/3) the decay reaches 0.995 only near step 2 900, so an
# EMA read early in training lags well behind the model it averages.
def make_ema(model: nn.Module, train: TrainConfig) -> EMA:
    """The EMA of `model` as `train.ema_*` say; its averaged copy is `.ema_model` (`.model` is `model`)."""
    return EMA(
        model, beta=train.ema_decay, update_every=train.ema_every, update_after_step=train.ema_update_after_step,
        power=train.ema_power, inv_gamma=1.0, min_value=0.0,
        include_online_model=False,  # the trainer saves the online model itself
        ignore_names={name for name, _ in model.named_buffers()},  # the noise schedule's constants
        use_foreach=True,
    )


def restore_ema_step(ema: EMA, step: int) -> None:
    """Continue, after a resume at `step`, as an EMA that has made `step` updates (the first: its copy).

    Its step counter stays where ema-pytorch keeps it, on the host: reading it costs no device sync."""
    ema.step.fill_(step)
    ema.initted.fill_(step > 0)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep what is freed (Linux, CPU training).

    By default glibc maps every block above its mmap threshold afresh and unmaps it when freed, so each
    training step page-faults its big activations back in: at rank 20, batch 2048 that cost 6 % of a lone
    run's step and half the throughput of a pack of 10 on a 2-core CPU (benchmarks/results.md). The
    process then keeps its peak heap until it exits. Returns whether the settings took (False where the
    C library is not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


# -- live dashboards: each run's metrics.jsonl records, also sent to TensorBoard or Weights & Biases ---------
# accelerate's tracker classes do the sending. One tracker per run (not one per Accelerator, which
# accelerate's `log_with` would give): a pack trains several runs in one process, and a study many.
# TensorBoard events go to `<run>/tensorboard/` (`tensorboard --logdir results/<study>/runs` shows every run
# under its id); W&B runs are named by the run id in the project `ired`.
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(kind: str) -> None:
    """Refuse a tracker whose package is missing, or installed but failing to import, in one line."""
    package = _TRACKER_PACKAGES.get(kind)
    if package is None:
        return
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.log_with = '{kind}' needs the {package} package: pip install {package}")
    try:
        importlib.import_module(package)
    except Exception as error:  # a broken install raises anything from its own imports
        raise ConfigError(f"train.log_with = '{kind}': the {package} package is installed but fails to import "
                          f"({type(error).__name__}: {str(error)[:200]}); reinstall it or set train.log_with=none"
                          ) from None


class RunTracker:
    """Sends one run's records to a dashboard, as `<kind>/<key>` scalars at the record's step (its package
    checked by the trainer, `check_tracker`)."""

    def __init__(self, kind: str, run_folder: Path, config: dict[str, Any]):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        if kind == "tensorboard":
            self.tracker = TensorBoardTracker("tensorboard", run_folder)
        else:
            # reinit="create_new": the runs of a pack are live at once, each its own W&B run (wandb >= 0.19.10)
            self.tracker = WandBTracker("ired", name=run_folder.name, dir=str(run_folder), config=config,
                                        reinit="create_new")
        self.tracker.start()

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        for key, value in record.items():
            if key in ("kind", "step"):
                continue
            if isinstance(value, list):  # per inner step: accept_rate_steps -> accept_rate_step1, ...
                values.update({f"{record['kind']}/{key[:-1]}{i}": v for i, v in enumerate(value, 1)})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{record['kind']}/{key}"] = value
        self.tracker.log(values, step=record["step"])

    def finish(self) -> None:
        self.tracker.finish()


@dataclass
class Run:
    """One run of a pack: its config and folder, and what the trainer tracks for it on the host."""

    config: RunConfig
    dir: RunDir
    energy_grad_evals: float = 0.0  # cumulative energy-gradient evaluations per sample
    train_seconds: float = 0.0  # its share of the pack's training time
    last_log: dict[str, Any] = field(default_factory=dict)
    tracker: RunTracker | None = None  # a live dashboard, if train.log_with asks for one

    def record(self, record: dict[str, Any]) -> None:
        """One metrics line: to metrics.jsonl and, if one is set, the run's dashboard."""
        self.dir.append_metrics(record)
        if self.tracker is not None:
            self.tracker.log(record)

    def state(self) -> dict[str, Any]:
        """What its checkpoint keeps of it (besides the weights), for `restore`."""
        return {"config": self.config.to_dict(), "energy_grad_evals": self.energy_grad_evals,
                "train_seconds": self.train_seconds, "last_log": self.last_log}

    def restore(self, state: dict[str, Any]) -> None:
        self.energy_grad_evals, self.train_seconds = state["energy_grad_evals"], state["train_seconds"]
        self.last_log = dict(state["last_log"])


def claim_folders(runs: list[Run], main: bool, resume: bool, overwrite: bool) -> list[FolderLock]:
    """One writer per run folder: the main process takes each <run>/.lock (RunDir.lock); every process
    refuses to clobber a run unless asked (RunDir.check). What was taken is released if a run refuses."""
    locks: list[FolderLock] = []
    try:
        for run in runs:
            if main:
                locks.append(run.dir.lock())
            run.dir.check(run.config, resume, overwrite, RESUMABLE_CHANGES)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


class Interval:
    """Each run's training statistics (LOGGED) summed on the device since the last train line, and the
    steps that added to each (mining statistics skip some); read only when the loop pauses."""

    def __init__(self, sums: dict[str, torch.Tensor] | None = None, counts: dict[str, int] | None = None):
        self.sums, self.counts = sums or {}, counts or {}

    def add(self, stats: dict[str, Any]) -> None:
        for key in LOGGED:
            if key in stats:
                self.sums[key] = self.sums[key] + stats[key].float() if key in self.sums else stats[key].float()
                self.counts[key] = self.counts.get(key, 0) + 1

    def reduced(self, accelerator: Accelerator, runs: int) -> list[dict[str, Any]]:
        """Per run, the sums averaged over processes (every process calls this at one step)."""
        reduced = {k: accelerator.reduce(v, reduction="mean").tolist() for k, v in sorted(self.sums.items())}
        return [{k: v[i] for k, v in reduced.items()} for i in range(runs)]

    def means(self, sums: dict[str, Any]) -> dict[str, Any]:
        """One run's statistics averaged over the steps that added to them (`sums`: one run's `reduced`)."""
        return {k: _mean(sums[k], self.counts[k]) for k in LOGGED if k in sums}

    def keep(self, rows: torch.Tensor) -> None:
        """Only the runs at `rows` (the pack shrank)."""
        self.sums = {k: v.index_select(0, rows) for k, v in self.sums.items()}

    @classmethod
    def restored(cls, states: list[dict[str, Any]], device: torch.device) -> Interval:
        """The interval the runs' checkpoints hold (each run's "interval": its reduced sums, the counts)."""
        sums = {key: torch.tensor([s["interval"]["sums"][key] for s in states], device=device)
                for key in states[0]["interval"]["sums"]}
        return cls(sums, dict(states[0]["interval"]["counts"]))


def _releasing_run_locks(method: Any) -> Any:
    """For train(): release the run locks taken in __init__ however it ends."""

    @functools.wraps(method)
    def wrapper(self: Trainer1D, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            for lock in self._locks:
                lock.release()
            self._locks = []

    return wrapper


class Trainer1D:
    """Trains a GaussianDiffusion1D on a task as the config(s) say; each run writes under its results_dir.

    `config` is one RunConfig (one run) or a sequence of them (a pack: `diffusion` then holds as many
    runs, in the same order). `train()` returns each run's final.json content; `evaluator` scores the runs.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion1D,
        task: Task,
        config: RunConfig | Sequence[RunConfig],
        accelerator: Accelerator | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        label: str = "",
    ):
        """`resume`: continue the runs in their folders; `overwrite`: start them over. `label` names the
        progress bar."""
        configs = [config] if isinstance(config, RunConfig) else list(config)
        if len(configs) != diffusion.runs:
            raise ValueError(f"{len(configs)} configs for a model packing {diffusion.runs} runs")
        self.config, self.task = configs[0], task  # the settings every run shares
        check_tracker(self.config.train.log_with)  # before any folder is written: a refusal leaves none
        self.accelerator = acc = accelerator or make_accelerator(self.config.device)
        check_pack(configs, acc)
        self.runs = [Run(c, RunDir(c.results_dir)) for c in configs]
        self._all_runs = list(self.runs)  # the pack as built; `runs` loses those that fail
        self.label = label or ", ".join(r.dir.root.name for r in self.runs)
        self.resume, self.overwrite = resume, overwrite
        train = self.config.train
        self._locks = claim_folders(self.runs, acc.is_main_process, resume, overwrite)  # held until train() ends
        # the code that trains the runs, recorded in config.yaml, final.json and evaluations (one git call)
        self.code = code_version() if acc.is_main_process else {}
        self.local_batch = train.batch_size // acc.num_processes
        torch.set_float32_matmul_precision(train.matmul_precision)
        if acc.device.type == "cpu":
            keep_freed_memory()
        self.dtype, self.autocast = precision(self.config)

        self.diffusion = diffusion.to(device=acc.device, dtype=self.dtype)
        self.ema = make_ema(diffusion, train)
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=train.lr, betas=tuple(train.adam_betas))
        self.model, self.optimizer = acc.prepare(diffusion, optimizer)
        self.params = dict(diffusion.named_parameters())
        self.evaluator = Evaluator(task, self.config, acc, self.ema.ema_model, acc.unwrap_model(self.model))

        self.step = 0
        self.total_steps = train.steps  # a FLOP budget replaces it once the step's FLOPs are measured
        self.flops_per_step = math.nan  # per run, all processes together
        self.interval = Interval()
        self._saved_step: int | None = None  # of the newest checkpoint this pack has (saved or resumed from)
        self.divergence = Divergence(len(self.runs), acc.device)
        self.stop = StopRequest()
        self._clock: float | None = None  # start of the current stretch of training time

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # -- the loop ------------------------------------------------------------------------------------
    @_releasing_run_locks
    def train(self) -> list[Final]:
        """Train every run to its last step, pausing to log, validate and save on schedule; then score them."""
        finished = self._start()
        if finished is not None:
            return finished
        every = self.config.train.log_every, self.config.eval.every, self.config.train.save_every
        with self._trackers(), self.stop.catching():
            with tqdm(total=self.total_steps, initial=self.step, desc=self.label, disable=not self.main,
                      dynamic_ncols=True, **bar_rate()) as bar:
                self._clock = time.perf_counter()
                while self.step < self.total_steps and self.runs:
                    self._stop_if_requested()
                    self.train_step()  # draw the batches, loss, backward, clip, Adam, EMA
                    bar.update(1)
                    last = self.step == self.total_steps
                    log, validate, save = (self.step % n == 0 for n in every)
                    # the last step is saved too: before scoring, so a stop while scoring loses no steps
                    if log or validate or save or last:
                        with self._paused():  # the clock stops; runs that diverged leave the pack
                            if log or last:
                                self._log(bar)
                            if validate and not last:
                                self._validate()
                            if save or last:
                                self._save()
                self._stop_if_requested(at_any_step=True)  # a signal in the last steps still stops before scoring
            # the checkpoint is on disk: from here a stop signal ends the scoring where it lands
            self.stop.stop_at_once(lambda signum: ScoringInterrupted(self.step, signum, [r.dir for r in self.runs]))
            return self._finish()

    def _start(self) -> list[Final] | None:
        """Prepare the run folders, resume from the checkpoints, measure a step's FLOPs; the runs' results
        if they had all finished already, else None (and their stale final.json is gone)."""
        if self.main:
            for run in self.runs:
                final = run.dir.read_final() if self.resume else None
                # a finished run resumed to no more steps keeps the config it was scored with
                if final is None or final["step"] < run.config.train.steps:
                    run.dir.prepare(run.config, self.overwrite, self.code)
        self.accelerator.wait_for_everyone()
        if self.resume and not self._load() and self.main:
            for run in self.runs:  # no checkpoint yet: the run starts over, so do its metrics
                run.dir.truncate_metrics(0)
        self.measure_flops()
        if self.step >= self.total_steps:
            finals = [run.dir.read_final() for run in self.runs]
            if all(final is not None for final in finals):
                return finals
        if self.main:
            for run in self.runs:
                run.dir.final.unlink(missing_ok=True)  # the runs continue: an old final.json is stale
        return None

    @contextmanager
    def _trackers(self) -> Iterator[None]:
        """Each run's live dashboard, if train.log_with asks for one, open for the block."""
        if self.main and self.config.train.log_with != "none":
            for run in self.runs:
                run.tracker = RunTracker(self.config.train.log_with, run.dir.root, run.config.to_dict())
        try:
            yield
        finally:
            for run in self._all_runs:
                if run.tracker is not None:
                    run.tracker.finish()

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """Stop the training clock (waiting for the device) and fail the runs that diverged; restart the
        clock after the block."""
        self._account_time()
        self._drop_diverged()
        yield
        self._clock = time.perf_counter()

    def _stop_if_requested(self, at_any_step: bool = False) -> None:
        """If any process caught a stop signal: every run's checkpoint at this step, then TrainingInterrupted."""
        if not self.stop.requested(self.accelerator, self.step, self.config.train.log_every, at_any_step):
            return
        if self._saved_step != self.step:
            with self._paused():
                self._save()
        self.accelerator.wait_for_everyone()  # no process leaves before the checkpoint is on disk
        raise TrainingInterrupted(self.step, self.stop.agreed, [run.dir for run in self.runs])

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, Draws, torch.Tensor | None]:
        """Every run's data, noise and given-entries mask (None: the task gives none) for `step`, each from a
        generator keyed to (seed, step, process): a resumed or packed run draws exactly what it would alone."""
        acc = self.accelerator
        generators = [
            torch.Generator(device=acc.device).manual_seed(mix_seed(run.config.seed, step, acc.process_index))
            for run in self.runs
        ]
        batches = [self.task.sample(self.local_batch, g) for g in generators]
        draws = self.diffusion.draw(self.local_batch, generators, acc.device)
        x, y = (torch.stack([getattr(b, k) for b in batches]).to(self.dtype) for k in ("x", "y"))
        mask = None if batches[0].mask is None else torch.stack([b.mask for b in batches])
        return x, y, draws, mask

    def _loss(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y, draws, mask = self._batch(step)
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(x, y, step=step, draws=draws, mask=mask)

    def train_step(self) -> None:
        """One optimisation step of every run on fresh batches, with EMA update and bookkeeping."""
        loss, stats = self._loss(self.step)
        self.accelerator.backward(loss)
        grad_norm = self._clip_gradients()
        self.divergence.watch(self.step, stats, grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config.train, self.step, self.total_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()  # once per step: ema-pytorch's count is the step, shared by the pack
        self.step += 1
        for run in self.runs:
            run.energy_grad_evals += stats["energy_grad_evals"]
        self.interval.add(stats)

    def _clip_gradients(self) -> torch.Tensor:
        """Each run's gradient-norm clip (as torch.nn.utils.clip_grad_norm_ does for a lone model); [P] norms."""
        grads = [p.grad for p in self.params.values()]
        norms = torch.stack([torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim()))) for g in grads])
        total = torch.linalg.vector_norm(norms, dim=0)
        coef = (self.config.train.grad_clip / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
        return total

    def _drop_diverged(self) -> None:
        """Fail the runs that diverged since the last pause (in their final.json) and drop them from the pack."""
        found = self.divergence.found(self.accelerator, mining=self.diffusion.strategy.mine is not None)
        if not found:
            return
        # every checkpoint was saved at a pause that found no divergence, so the newest one is good
        kept = ("no checkpoint was saved before it" if self._saved_step is None
                else f"last good checkpoint (step {self._saved_step}) kept")
        for i, (step, detail) in found.items():
            run, message = self.runs[i], f"non-finite loss or gradient at step {step} ({detail}); {kept}"
            if self.main:
                run.dir.write_final({"status": "failed", "error": message, "step": step - 1, **self._run_info(run)})
                tqdm.write(f"{run.dir.root.name}: FAILED: {message}", file=sys.stderr)
        self._keep([i for i in range(len(self.runs)) if i not in found])

    def _keep(self, index: list[int]) -> None:
        """Shrink the pack to the runs at `index`: every packed tensor keeps those rows."""
        self.runs = [self.runs[i] for i in index]
        rows = torch.tensor(index, dtype=torch.long, device=self.accelerator.device)
        optimizer_state = self.optimizer.state
        for p, p_ema in zip(self.params.values(), self.ema.ema_model.parameters()):
            p.data, p_ema.data = p.data.index_select(0, rows), p_ema.data.index_select(0, rows)
            for key, value in optimizer_state.get(p, {}).items():
                if value.dim() > 0:  # the moments; Adam's step count is shared
                    optimizer_state[p][key] = value.index_select(0, rows.to(value.device))
        self.interval.keep(rows)
        self.divergence.keep(rows)

    # -- compute accounting --------------------------------------------------------------------------
    def measure_flops(self) -> None:
        """Matmul FLOPs of one training step per run, counted (FlopCounterMode) over forward and backward of
        the strategy's period of steps; sets the step count of a FLOP-budget run. Leaves the runs unchanged
        (no optimiser step; data and noise are keyed to the step, not drawn from shared state)."""
        period = self.diffusion.strategy.period(self.diffusion.mining_config)
        with FlopCounterMode(display=False) as counter:
            for i in range(period):
                loss, _ = self._loss(self.step + i)
                self.accelerator.backward(loss)
        self.optimizer.zero_grad(set_to_none=True)
        local = torch.tensor(counter.get_total_flops() / period / len(self.runs), device=self.accelerator.device)
        self.flops_per_step = float(self.accelerator.reduce(local, reduction="sum"))
        budget = self.config.train.budget_flops
        if budget > 0:
            self.total_steps = max(1, math.ceil(budget / self.flops_per_step))

    def synchronize(self) -> None:
        """Wait for the device to finish the work queued so far (timing needs it; training does not)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)

    def _account_time(self) -> None:
        """Close the current stretch of training time (waiting for the device), each run taking its share."""
        if self._clock is None:
            return
        self.synchronize()
        share = (time.perf_counter() - self._clock) / max(len(self.runs), 1)
        for run in self.runs:
            run.train_seconds += share
        self._clock = None

    # -- metrics -------------------------------------------------------------------------------------
    def _log(self, bar: Any) -> None:
        """Each run's train line: its statistics averaged over the interval since the last one."""
        if self.interval.counts and self.runs:
            steps = self.interval.counts.get("loss", 1)
            load = _load_average()
            for run, sums in zip(self.runs, self.interval.reduced(self.accelerator, len(self.runs))):
                record: dict[str, Any] = {"kind": "train", "step": self.step, **self.interval.means(sums)}
                if "energy_neg" in record:
                    record["energy_gap"] = record["energy_neg"] - record["energy_pos"]
                interval_seconds = run.train_seconds - run.last_log.get("train_seconds", 0.0)
                record.update(sec_per_step=interval_seconds / steps, **self._clocks(run), **load)
                run.last_log = record
                self._record(run, record)
            bar.set_postfix(_postfix(self.runs), refresh=False)
        self.interval = Interval()

    def _clocks(self, run: Run) -> dict[str, float]:
        return {"flops": self.flops_per_step * self.step, "train_seconds": run.train_seconds,
                "energy_grad_evals": run.energy_grad_evals}

    def _validate(self) -> None:
        if self.runs:
            for run, score in zip(self.runs, self.evaluator.scores()):
                self._log_validation(run, score)

    def _log_validation(self, run: Run, score: dict[str, Any]) -> None:
        """A val line: val_<metric>_<set> (EMA model) and val_<metric>_<set>_raw."""
        keys = [f"{key}{kind}" for key in self.evaluator.metric_keys() for kind in ("", "_raw")]
        values = {f"val_{k}": score[k] for k in keys}
        self._record(run, {"kind": "val", "step": self.step, **values, **self._clocks(run), **_load_average()})

    def _record(self, run: Run, record: dict[str, Any]) -> None:
        if self.main:
            run.record(record)

    def _finish(self) -> list[Final]:
        """Score the runs still going (the Evaluator's final scoring), write their final.json; every run's result."""
        if self.runs:
            try:
                scores = self.evaluator.final_scores(progress=f"{self.label}: scoring")
            except (MemoryError, RuntimeError) as error:
                if not out_of_memory(error) or self.config.eval.batch_size == 1:  # then fewer at once cannot help
                    raise
                runs = [r.dir for r in self.runs]
                raise ScoringOutOfMemory(self.step, self.config.eval.batch_size, runs, error) from None
            if self.main:
                self._write_finals(scores)
        self.accelerator.wait_for_everyone()
        return [run.dir.read_final() or {} for run in self._all_runs]

    def _write_finals(self, scores: list[dict[str, Any]]) -> None:
        declaration, marks = self.evaluator.declaration(), self.evaluator.yardsticks()
        for run, score in zip(self.runs, scores):
            # a run killed between its final val line and final.json has that line already: log it once
            if not any(r.get("kind") == "val" and r["step"] == self.step for r in run.dir.read_metrics()):
                self._log_validation(run, score)
            last = {k: run.last_log[k] for k in ("loss", "loss_denoise", "loss_energy") if k in run.last_log}
            final = Final(status="finished", step=self.step, **declaration, **score, yardsticks=marks, **last,
                          **self._run_info(run))
            tqdm.write(_done_line(run, final))  # shown before it is written: a failed write loses nothing
            run.dir.write_final(final)

    def _run_info(self, run: Run) -> dict[str, Any]:
        return {
            "energy_grad_evals": run.energy_grad_evals,
            "num_processes": self.accelerator.num_processes,
            "pack_size": len(self._all_runs),
            "train_seconds": run.train_seconds,
            "steps_per_second": self.step / run.train_seconds if run.train_seconds else math.nan,
            "flops_per_step": self.flops_per_step,
            "train_flops": self.flops_per_step * self.step,
            "budget_flops": self.config.train.budget_flops,
            **self.code,
        }

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self) -> None:
        """Every run's checkpoint at this step (a collective: the interval's sums are averaged over processes)."""
        sums = self.interval.reduced(self.accelerator, len(self.runs))
        if self.main:
            states = [{**run.state(), "interval": {"sums": run_sums, "counts": dict(self.interval.counts)}}
                      for run, run_sums in zip(self.runs, sums)]
            save_pack([run.dir.checkpoints for run in self.runs], self.step, self.diffusion, self.ema.ema_model,
                      self.optimizer, states, keep=self.config.train.keep_checkpoints)
        self._saved_step = self.step

    def _load(self) -> bool:
        """Every run's newest readable checkpoint (they must be at one step), its later metrics lines dropped;
        False if none has one."""
        loaded = load_pack([run.dir.checkpoints for run in self.runs], self.diffusion, self.ema.ema_model, self.optimizer)
        if loaded is None:
            return False
        self.step, states = loaded
        self._saved_step = self.step
        restore_ema_step(self.ema, self.step)
        for run, state in zip(self.runs, states):
            run.restore(state)
        self.interval = Interval.restored(states, self.accelerator.device)
        if self.main:
            for run in self.runs:
                run.dir.truncate_metrics(self.step)  # lines logged after this checkpoint will be logged again
        self.accelerator.wait_for_everyone()
        return True


def _mean(total: Any, count: int) -> Any:
    return [v / count for v in total] if isinstance(total, list) else total / count


def _load_average() -> dict[str, float]:
    """The 1-minute load average, so a reader can tell whether wall-clock numbers were measured on a busy machine."""
    try:
        return {"loadavg": os.getloadavg()[0]}
    except (AttributeError, OSError):  # not on every platform
        return {}


def _postfix(runs: list[Run]) -> dict[str, str]:
    """The bar's stats: only those the strategy has, averaged over the pack's runs."""
    keys = [k for k in ("loss", "loss_denoise", "energy_gap", "accept_rate") if k in runs[0].last_log]
    return {k: f"{sum(r.last_log[k] for r in runs) / len(runs):.3g}" for k in keys}


def _done_line(run: Run, final: Final) -> str:
    """'<run>: done at step N: held-out <headline> (EMA) <id> id, <ood> ood (<yardstick> <id> / <ood>, ...)'."""
    metric, sets = next(iter(final["metrics"])), final["sets"]
    label = final["metric_labels"][metric]
    values = ", ".join(f"{final[f'{metric}_{name}']:.3g} {name}" for name in sets)
    names = [n for n in ("linear", "zeros") if all(metric in final["yardsticks"][s].get(n, {}) for s in sets)]
    marks = ", ".join(f"{n} " + " / ".join(f"{final['yardsticks'][s][n][metric]:.3g}" for s in sets) for n in names)
    return f"{run.dir.root.name}: done at step {final['step']}: held-out {label} (EMA) {values}" + (f" ({marks})" if marks else "")
