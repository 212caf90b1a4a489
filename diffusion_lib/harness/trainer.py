"""Trainer1D: trains one run, or a pack of runs that share every shape, as one batched model.

A pack's runs differ only in their seed (and folder): their weights are stacked on a leading dimension
(models.py), each draws its own data and noise from its own seed, and each keeps its own optimiser
state, EMA, metrics, checkpoints and final.json, exactly as if it trained alone. Nothing reads the
device on a training step: statistics and divergence flags accumulate there and are read when the loop
pauses to log, validate or save.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from diffusion_lib.harness.checkpoint import load_pack, save_pack
from diffusion_lib.harness.config import PER_RUN_KEYS, ConfigError, RunConfig, config_differences
from diffusion_lib.diffusion import Draws, GaussianDiffusion1D
from diffusion_lib.harness.ema import make_ema, restore_ema_step
from diffusion_lib.harness.landscape import best_of_flops, best_of_n, fixed_noise, rank_true_answers, verifier_flops
from diffusion_lib.harness.io import FolderLock
from diffusion_lib.harness.malloc import keep_freed_memory
from diffusion_lib.harness.provenance import code_version
from diffusion_lib.harness.run_dir import EVALUATION_CHANGES, RESUMABLE_CHANGES, RunDir, TrainingInterrupted
from diffusion_lib.samplers import sampler_label, sampling_flops
from diffusion_lib.harness.stopping import Divergence, ScoringInterrupted, StopRequest
from diffusion_lib.tasks.base import HeldOutSet, Task, mix_seed
from diffusion_lib.harness.tracking import RunTracker, check_tracker

# per-run statistics averaged over a log interval ("accept_rate_steps" is a list: one rate per inner step)
LOGGED = ("loss", "loss_denoise", "loss_energy", "energy_pos", "energy_neg",
          "accept_rate", "accept_rate_steps", "energy_decrease", "move_rms")
# model.dtype -> the dtype of weights and data (bfloat16 is mixed precision: float32 weights, bf16 autocast)
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
FLOP_PROBLEMS = 64  # problems a sampling pass's FLOPs per answer are counted on


@lru_cache(maxsize=None)
def make_accelerator(device: str = "auto") -> Accelerator:
    """One Accelerator per process and device (accelerate's state is process-global)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use --device auto or --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device = 'mps' but MPS is not available here; use --device auto or --device cpu")
    return Accelerator(cpu=device == "cpu")


def check_pack(configs: Sequence[RunConfig]) -> None:
    """Runs train together only if their configs agree on everything but seed and folder."""
    for other in configs[1:]:
        differing = config_differences(configs[0], other, ignore=PER_RUN_KEYS)
        if differing:
            raise ValueError(f"runs of a pack must share their config but for {PER_RUN_KEYS}; these differ: {differing}")


@dataclass
class Run:
    """One run of a pack: its config and folder, and what the trainer tracks for it on the host."""

    config: RunConfig
    dir: RunDir
    energy_grad_evals: float = 0.0  # cumulative energy-gradient evaluations per sample
    train_seconds: float = 0.0  # its share of the pack's training time
    last_log: dict[str, Any] = field(default_factory=dict)
    tracker: RunTracker | None = None  # a live dashboard, if train.log_with asks for one


def _releasing_run_locks(method: Any) -> Any:
    """For train()/evaluate_saved(): release the run locks taken in __init__ however the method ends."""

    @functools.wraps(method)
    def wrapper(self: Trainer1D, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._release_locks()

    return wrapper


class Trainer1D:
    """Trains a GaussianDiffusion1D on a task as the config(s) say; each run writes under its results_dir.

    `config` is one RunConfig (one run) or a sequence of them (a pack: `diffusion` then holds as many
    runs, in the same order). `train()` returns each run's final.json content.
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
        evaluate_only: bool = False,
        label: str = "",
    ):
        """`resume`: continue the runs in their folders; `overwrite`: start them over; `evaluate_only`: only
        score the saved model (`evaluate_saved`), possibly with other sampling settings. `label` names
        the progress bar."""
        configs = [config] if isinstance(config, RunConfig) else list(config)
        if len(configs) != diffusion.runs:
            raise ValueError(f"{len(configs)} configs for a model packing {diffusion.runs} runs")
        check_pack(configs)
        self.config, self.task = configs[0], task  # the settings every run shares
        self.runs = [Run(c, RunDir(c.results_dir)) for c in configs]
        self._all_runs = list(self.runs)  # the pack as built; `runs` loses those that fail
        self.label = label or ", ".join(r.dir.root.name for r in self.runs)
        self.resume, self.overwrite = resume or evaluate_only, overwrite
        check_tracker(self.config.train.log_with)
        self.accelerator = acc = accelerator or make_accelerator(self.config.device)
        train = self.config.train
        if train.batch_size % acc.num_processes:
            raise ConfigError(
                f"train.batch_size = {train.batch_size} must be divisible by the {acc.num_processes} processes"
            )
        # one writer per run folder: the main process holds each <run>/.lock until train()/evaluate_saved() end
        self._locks: list[FolderLock] = []
        try:
            for run in self.runs:
                if acc.is_main_process:
                    self._locks.append(run.dir.lock(optional=evaluate_only))
                run.dir.check(run.config, self.resume, overwrite, EVALUATION_CHANGES if evaluate_only else RESUMABLE_CHANGES)
        except BaseException:
            self._release_locks()
            raise
        # the code that trains the runs, recorded in config.yaml, final.json and evaluations (one git call)
        self.code = code_version() if acc.is_main_process else {}
        self.local_batch = train.batch_size // acc.num_processes
        torch.set_float32_matmul_precision(train.matmul_precision)
        if acc.device.type == "cpu":
            keep_freed_memory()
        self.dtype = TORCH_DTYPES[self.config.model["dtype"]]
        self.autocast = self.config.model["dtype"] == "bfloat16"
        # held-out errors are summed in double, where the device has it (MPS does not)
        self._sum_dtype = torch.float32 if acc.device.type == "mps" else torch.float64

        self.diffusion = diffusion.to(device=acc.device, dtype=self.dtype)
        self.ema = make_ema(diffusion, train)
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=train.lr, betas=tuple(train.adam_betas))
        self.model, self.optimizer = acc.prepare(diffusion, optimizer)
        self.params = dict(diffusion.named_parameters())

        # each process scores its own slice of every held-out set; the sums are reduced across processes
        self.held_out = task.held_out(self.config.eval.num_samples)
        self.local_held_out = {
            name: data.shard(acc.process_index, acc.num_processes).to(acc.device) for name, data in self.held_out.items()
        }

        self.step = 0
        self.total_steps = train.steps  # a FLOP budget replaces it once the step's FLOPs are measured
        self.flops_per_step = math.nan  # per run, all processes together
        self._sums: dict[str, torch.Tensor] = {}  # per-run statistics summed since the last log line, on device
        self._counts: dict[str, int] = {}  # steps that contributed to each sum (mining stats skip some)
        self._saved_step: int | None = None  # of the newest checkpoint this pack has (saved or resumed from)
        self.divergence = Divergence(len(self.runs), acc.device)
        self.stop = StopRequest()
        self._clock: float | None = None  # start of the current stretch of training time
        self.scoring_bar: Any = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    # -- the loop ------------------------------------------------------------------------------------
    @_releasing_run_locks
    def train(self) -> list[dict[str, Any]]:
        """Train every run to its last step, pausing to log, validate and save on schedule; then score them."""
        finished = self._start()
        if finished is not None:
            return finished
        every = self.config.train.log_every, self.config.eval.every, self.config.train.save_every
        with self._trackers(), self.stop.catching():
            with tqdm(total=self.total_steps, initial=self.step, desc=self.label, disable=not self.main,
                      dynamic_ncols=True, **_bar_rate()) as bar:
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

    def _start(self) -> list[dict[str, Any]] | None:
        """Prepare the run folders, resume from the checkpoints, measure a step's FLOPs; the runs' results
        if they had all finished already, else None (and their stale final.json is gone)."""
        if self.main:
            for run in self.runs:
                run.dir.prepare(run.config, self.overwrite, self.code)
        self.accelerator.wait_for_everyone()
        if self.resume and not self._load(truncate_metrics=True) and self.main:
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
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()  # once per step: ema-pytorch's count is the step, shared by the pack
        self.step += 1
        for run in self.runs:
            run.energy_grad_evals += stats["energy_grad_evals"]
        for key in LOGGED:
            if key in stats:
                self._sums[key] = self._sums[key] + stats[key].float() if key in self._sums else stats[key].float()
                self._counts[key] = self._counts.get(key, 0) + 1

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
        self._sums = {k: v.index_select(0, rows) for k, v in self._sums.items()}
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
    def _reduced_sums(self) -> list[dict[str, Any]]:
        """Per run, the interval's sums averaged over processes (every process calls this at one step)."""
        reduced = {k: self.accelerator.reduce(v, reduction="mean").tolist() for k, v in sorted(self._sums.items())}
        return [{k: v[i] for k, v in reduced.items()} for i in range(len(self.runs))]

    def _log(self, bar: Any) -> None:
        """Each run's train line: its statistics averaged over the interval since the last one."""
        if self._counts and self.runs:
            steps = self._counts.get("loss", 1)
            load = _load_average()
            for run, sums in zip(self.runs, self._reduced_sums()):
                record: dict[str, Any] = {"kind": "train", "step": self.step}
                record.update({k: _mean(sums[k], self._counts[k]) for k in LOGGED if k in sums})
                if "energy_neg" in record:
                    record["energy_gap"] = record["energy_neg"] - record["energy_pos"]
                interval_seconds = run.train_seconds - run.last_log.get("train_seconds", 0.0)
                record.update(sec_per_step=interval_seconds / steps, **self._clocks(run), **load)
                run.last_log = record
                self._record(run, record)
            bar.set_postfix(_postfix(self.runs), refresh=False)
        self._sums, self._counts = {}, {}

    def _clocks(self, run: Run) -> dict[str, float]:
        return {"flops": self.flops_per_step * self.step, "train_seconds": run.train_seconds,
                "energy_grad_evals": run.energy_grad_evals}

    def _validate(self) -> None:
        if self.runs:
            for run, score in zip(self.runs, self._score_models(sweep=False)):
                self._log_validation(run, score)

    def _log_validation(self, run: Run, score: dict[str, Any]) -> None:
        """A val line: val_<metric>_<set> (EMA model) and val_<metric>_<set>_raw."""
        keys = [f"{key}{kind}" for key in self._metric_keys() for kind in ("", "_raw")]
        values = {f"val_{k}": score[k] for k in keys}
        self._record(run, {"kind": "val", "step": self.step, **values, **self._clocks(run), **_load_average()})

    def _metric_keys(self) -> list[str]:
        """'<metric>_<set>' for every metric of the task and held-out set, in the task's order."""
        return [f"{metric.name}_{name}" for name in self.held_out for metric in self.task.metrics]

    def _record(self, run: Run, record: dict[str, Any]) -> None:
        """One metrics line: to metrics.jsonl and, if one is set, the run's dashboard (main process only)."""
        if self.main:
            run.dir.append_metrics(record)
            if run.tracker is not None:
                run.tracker.log(record)

    # -- validation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, diffusion: GaussianDiffusion1D | None = None, inner_steps: int | None = None,
                 sampler: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
        """Per run, '<metric>_<set>' of `diffusion` (default: the EMA model) sampling with `sampler` (default:
        its own): each metric's mean over the problems of each held-out set (each process scores its slice;
        the sums are reduced)."""
        diffusion = diffusion or self.ema.ema_model
        means = self._set_means(lambda name, data: self._score_sums(diffusion, name, data, inner_steps, sampler))
        return [{f"{metric}_{name}": value for name, values in run.items() for metric, value in values.items()}
                for run in means]

    def _set_means(self, sums_of: Callable[[str, HeldOutSet], dict[str, torch.Tensor]]) -> list[dict[str, dict[str, Any]]]:
        """Per run and held-out set name, key -> the mean over the set's problems of what `sums_of(name, slice)`
        sums over this process's slice (key -> [P, ...]); the sums are reduced across processes."""
        results: list[dict[str, dict[str, Any]]] = [{} for _ in self.runs]
        for name, data in self.local_held_out.items():
            count = self.held_out[name].y.shape[0]
            for key, total in sums_of(name, data).items():
                reduced = (self.accelerator.reduce(total, reduction="sum") / count).tolist()
                for result, value in zip(results, reduced):
                    result.setdefault(name, {})[key] = value
            if self.scoring_bar is not None:
                self.scoring_bar.update(1)
        return results

    def _chunks(self, data: HeldOutSet) -> Iterator[tuple[int, HeldOutSet]]:
        chunk = self.config.eval.batch_size
        for start in range(0, data.x.shape[0], chunk):
            yield start, data.select(slice(start, start + chunk))

    def _given(self, part: HeldOutSet) -> Any:
        return None if part.mask is None else (part.mask, part.y.to(self.dtype))

    def _generator(self, name: str, start: int) -> torch.Generator:
        """A noisy sampler's numbers for the chunk of held-out set `name` at `start`: fixed by the set, the
        process and the chunk, so scoring is reproducible and every strategy and seed draws the same."""
        seed = mix_seed(zlib.crc32(name.encode()), self.accelerator.process_index, start)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def _sample(self, diffusion: GaussianDiffusion1D, name: str, start: int, part: HeldOutSet,
                inner_steps: int | None = None, sampler: Mapping[str, Any] | None = None) -> torch.Tensor:
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return diffusion.sample_with_stats(part.x.to(self.dtype), noise=part.noise, inner_steps=inner_steps,
                                               generator=self._generator(name, start), given=self._given(part),
                                               sampler=sampler).answer

    def _score_sums(self, diffusion: GaussianDiffusion1D, name: str, data: HeldOutSet, inner_steps: int | None,
                    sampler: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Per metric, each run's sum [P] over this process's problems of the task's per-problem score."""
        sums: dict[str, torch.Tensor] = {}
        for start, part in self._chunks(data):
            answer = self._sample(diffusion, name, start, part, inner_steps, sampler)
            for metric, values in self.task.score(answer, part).items():
                total = values.to(self._sum_dtype).sum(dim=-1)
                sums[metric] = sums[metric] + total if metric in sums else total
        return sums

    @torch.no_grad()
    def _score_models(self, sweep: bool) -> list[dict[str, Any]]:
        """Per run: held-out metrics of the EMA and the raw model; at the end (`sweep`) also, per sampler
        (the configured one at the top level, eval.samplers under "samplers"), the inference inner-step sweep
        and best-of-N, with FLOPs per answer, and the ranking of true answers (eval.ranking_scales)."""
        if not sweep:
            return self._model_scores(None)
        scores = self._sampler_scores(None)
        if self.config.eval.ranking_scales:
            for score, ranking in zip(scores, self._rankings()):
                score.update(ranking)
        for config in self.config.eval.samplers:
            for score, other in zip(scores, self._sampler_scores(config)):
                score.setdefault("samplers", {})[sampler_label(config)] = other
        return scores

    def _model_scores(self, sampler: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        ema, raw = self.evaluate(sampler=sampler), self.evaluate(self.accelerator.unwrap_model(self.model), sampler=sampler)
        return [{**e, **{f"{k}_raw": v for k, v in r.items()}} for e, r in zip(ema, raw)]

    def _sampler_scores(self, sampler: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """What scoring with `sampler` (None: the configured one) gives, per run: see _score_models."""
        scores = self._model_scores(sampler)
        steps = self.config.eval.inference_steps_sweep
        for score in scores:
            score["inference_steps_sweep"] = {}
        for n in steps:
            for score, result in zip(scores, self.evaluate(inner_steps=n, sampler=sampler)):
                score["inference_steps_sweep"][str(n)] = result
        flops = self._sampling_flops(sampler, [self.diffusion.inference_steps, *steps])
        config = sampler or self.diffusion.sampler_config
        for score in scores:
            score.update(sampler=config, sampler_flops_per_answer=flops[0],
                         inference_steps_sweep_flops=dict(zip(map(str, steps), flops[1:])))
        if self.config.eval.best_of:
            models = {"": self.ema.ema_model, "_raw": self.accelerator.unwrap_model(self.model)}
            for suffix, diffusion in models.items():
                for score, best in zip(scores, self._best_of(diffusion, sampler, flops[0])):
                    score.update({f"best_of_{name}{suffix}": table for name, table in best.items()})
        return scores

    # -- the energy landscape (landscape.py), final scoring only -----------------------------------------
    def _sampling_flops(self, sampler: Mapping[str, Any] | None, inner_steps: Sequence[int]) -> list[float]:
        """Matmul FLOPs per answer of one sampling pass with each inner-step count, counted on (at most)
        FLOP_PROBLEMS problems of the first held-out set (the count grows with the problems, plus a per-batch
        term for the time embedding that this many problems make small)."""
        diffusion = self.ema.ema_model
        name, data = next(iter(self.local_held_out.items()))
        part = data.select(slice(0, FLOP_PROBLEMS))
        x, noise = diffusion._packed(part.x.to(self.dtype)), diffusion._packed(part.noise)
        return [sampling_flops(diffusion, x, noise, n, diffusion.inference_step_scale, self._given(part),
                               self._generator(name, 0), sampler) for n in inner_steps]

    def _extra_noise(self, name: str, count: int, salt: int) -> torch.Tensor:
        """[count, this process's problems, D] standard normals fixed by the held-out set (every strategy,
        seed and process count sees the same per problem)."""
        full = self.held_out[name].y
        noise = fixed_noise(count, full.shape[0], full.shape[1], mix_seed(zlib.crc32(name.encode()), salt))
        acc = self.accelerator
        return torch.tensor_split(noise, acc.num_processes, dim=1)[acc.process_index].to(acc.device)

    def _rankings(self) -> list[dict[str, Any]]:
        """Per run, "ranking_<set>" (EMA) and "ranking_<set>_raw": {distance: {level: fraction ranked right}}."""
        scales, levels = self.config.eval.ranking_scales, self.config.eval.ranking_levels
        levels = levels or list(range(self.diffusion.num_timesteps))
        distances = [f"sigma_{sigma:g}" for sigma in scales] + ["samples"]
        results: list[dict[str, Any]] = [{} for _ in self.runs]
        for suffix, diffusion in (("", self.ema.ema_model), ("_raw", self.accelerator.unwrap_model(self.model))):
            means = self._set_means(lambda name, data: self._ranking_sums(diffusion, name, data, levels))
            for result, run in zip(results, means):
                for name, values in run.items():
                    result[f"ranking_{name}{suffix}"] = {
                        d: {str(t): v for t, v in zip(levels, row)} for d, row in zip(distances, values["correct"])
                    }
        return results

    def _ranking_sums(self, diffusion: GaussianDiffusion1D, name: str, data: HeldOutSet, levels: list[int]) -> dict[str, torch.Tensor]:
        """{"correct": [P, distances, levels]}: pairs ranked right, summed over this process's problems; the
        candidates are the true answer plus sigma * noise per scale, and the model's own samples."""
        scales = self.config.eval.ranking_scales
        directions = self._extra_noise(name, len(scales), salt=1)
        # a 'scaled' answer is sqrt(abar_0) x0: rank the x0 it stands for
        unscale = diffusion.sqrt_alphas_cumprod[0] if diffusion.answer == "scaled" else 1.0
        total = None
        for start, part in self._chunks(data):
            samples = self._sample(diffusion, name, start, part) / unscale
            with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                ranking = rank_true_answers(diffusion, part.x.to(self.dtype), part.y.to(self.dtype), scales,
                                            directions[:, start:start + part.x.shape[0]], candidates={"samples": samples},
                                            levels=levels, given=self._given(part))
            sums = ranking.correct.to(self._sum_dtype).sum(dim=-1)
            total = sums if total is None else total + sums
        return {"correct": total}

    def _best_of(self, diffusion: GaussianDiffusion1D, sampler: Mapping[str, Any] | None,
                 sample_flops: float) -> list[dict[str, Any]]:
        """Per run and held-out set: {"<n>": {"<metric>": {"energy", "random", "oracle"}, "flops_per_answer"}}."""
        ns = sorted(set(self.config.eval.best_of))
        means = self._set_means(lambda name, data: self._best_of_sums(diffusion, name, data, ns, sampler))
        name, data = next(iter(self.local_held_out.items()))
        x = diffusion._packed(data.x[:FLOP_PROBLEMS].to(self.dtype))
        flops = {n: best_of_flops(n, sample_flops, verifier_flops(diffusion, x, n)) for n in ns}
        results = []
        for run in means:
            tables = {}
            for set_name, values in run.items():
                table: dict[str, Any] = {str(n): {"flops_per_answer": flops[n]} for n in ns}
                for key, value in values.items():
                    n, metric, pick = key.split("/")
                    table[n].setdefault(metric, {})[pick] = value
                tables[set_name] = table
            results.append(tables)
        return results

    def _best_of_sums(self, diffusion: GaussianDiffusion1D, name: str, data: HeldOutSet, ns: list[int],
                      sampler: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """'<n>/<metric>/<pick>' -> [P] sums over this process's problems; candidate 0 is the set's own start
        noise and generator, so n = 1 is plain scoring."""
        extra = self._extra_noise(name, max(ns) - 1, salt=2)
        directions = {m.name: m.higher_is_better for m in self.task.metrics}
        sums: dict[str, torch.Tensor] = {}
        for start, part in self._chunks(data):
            noises = torch.cat([part.noise[None], extra[:, start:start + part.x.shape[0]]])
            with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                results = best_of_n(diffusion, part.x.to(self.dtype), noises, lambda a: self.task.score(a, part),
                                    directions, ns, given=self._given(part), generator=self._generator(name, start),
                                    sampler=sampler)
            for result in results:
                for pick, values in (("energy", result.energy_pick), ("random", result.random_pick), ("oracle", result.oracle)):
                    for metric, v in values.items():
                        key, total = f"{result.n}/{metric}/{pick}", v.to(self._sum_dtype).sum(dim=-1)
                        sums[key] = sums[key] + total if key in sums else total
        return sums

    def _scoring_passes(self) -> int:
        """Held-out set passes of the final scoring (for its progress bar)."""
        ev = self.config.eval
        per_sampler = 2 + len(ev.inference_steps_sweep) + (2 if ev.best_of else 0)
        return len(self.held_out) * (per_sampler * (1 + len(ev.samplers)) + (2 if ev.ranking_scales else 0))

    def _finish(self) -> list[dict[str, Any]]:
        """Score the runs still going (EMA, raw, inference sweep), write their final.json; every run's result."""
        if self.runs:
            self.scoring_bar = tqdm(total=self._scoring_passes(), desc=f"{self.label}: scoring", leave=False, disable=not self.main,
                                    **_bar_rate())
            try:
                scores = self._score_models(sweep=True)
            finally:
                self.scoring_bar.close()
                self.scoring_bar = None
            if self.main:
                self._write_finals(scores)
        self.accelerator.wait_for_everyone()
        return [run.dir.read_final() or {} for run in self._all_runs]

    def _write_finals(self, scores: list[dict[str, Any]]) -> None:
        marks = {name: self.task.yardsticks(data) for name, data in self.held_out.items()}
        metrics = self.task.metrics
        for run, score in zip(self.runs, scores):
            # a run killed between its final val line and final.json has that line already: log it once
            if not any(r.get("kind") == "val" and r["step"] == self.step for r in run.dir.read_metrics()):
                self._log_validation(run, score)
            last = {k: run.last_log[k] for k in ("loss", "loss_denoise", "loss_energy") if k in run.last_log}
            final = {
                "status": "finished",
                "step": self.step,
                "metrics": {m.name: "higher" if m.higher_is_better else "lower" for m in metrics},
                "metric_labels": {m.name: m.label for m in metrics},
                "sets": list(self.held_out),
                **score,
                "yardsticks": marks,
                **last,
                **self._run_info(run),
            }
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

    @_releasing_run_locks
    def evaluate_saved(self) -> dict[str, Any]:
        """Sample-only: score the latest checkpoint's EMA and raw model (no training, nothing truncated)."""
        if not self._load(truncate_metrics=False):
            raise ConfigError(f"--evaluate: no readable checkpoint in '{self.runs[0].dir.checkpoints}'")
        return {"step": self.step, **self._score_models(sweep=True)[0], **self.code}

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self) -> None:
        """Every run's checkpoint at this step (a collective: the interval's sums are averaged over processes)."""
        sums = self._reduced_sums()
        if self.main:
            states = [{"config": run.config.to_dict(), "energy_grad_evals": run.energy_grad_evals,
                       "train_seconds": run.train_seconds, "last_log": run.last_log,
                       "interval": {"sums": run_sums, "counts": dict(self._counts)}}
                      for run, run_sums in zip(self.runs, sums)]
            save_pack([run.dir.checkpoints for run in self.runs], self.step, self.diffusion, self.ema.ema_model,
                      self.optimizer, states, keep=self.config.train.keep_checkpoints)
        self._saved_step = self.step

    def _load(self, truncate_metrics: bool) -> bool:
        """Every run's newest readable checkpoint (they must be at one step); False if none has one."""
        loaded = load_pack([run.dir.checkpoints for run in self.runs], self.diffusion, self.ema.ema_model, self.optimizer)
        if loaded is None:
            return False
        self.step, states = loaded
        self._saved_step = self.step
        restore_ema_step(self.ema, self.step)
        for run, state in zip(self.runs, states):
            run.energy_grad_evals, run.train_seconds = state["energy_grad_evals"], state["train_seconds"]
            run.last_log = dict(state["last_log"])
        self._counts = dict(states[0]["interval"]["counts"])
        device = self.accelerator.device
        self._sums = {key: torch.tensor([s["interval"]["sums"][key] for s in states], device=device)
                      for key in states[0]["interval"]["sums"]}
        if truncate_metrics and self.main:
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


def _bar_rate() -> dict[str, float]:
    """Redraw a terminal's bar often, but a bar going to a file (a log) only every 30 s (and not from tqdm's
    monitor thread, whose forced redraws come on top)."""
    return {"mininterval": 0.1} if sys.stderr.isatty() else {"mininterval": 30.0, "maxinterval": math.inf}


def _postfix(runs: list[Run]) -> dict[str, str]:
    """The bar's stats: only those the strategy has, averaged over the pack's runs."""
    keys = [k for k in ("loss", "loss_denoise", "energy_gap", "accept_rate") if k in runs[0].last_log]
    return {k: f"{sum(r.last_log[k] for r in runs) / len(runs):.3g}" for k in keys}


def _done_line(run: Run, final: dict[str, Any]) -> str:
    """'<run>: done at step N: held-out <headline> (EMA) <id> id, <ood> ood (<yardstick> <id> / <ood>, ...)'."""
    metric, sets = next(iter(final["metrics"])), final["sets"]
    label = final["metric_labels"][metric]
    values = ", ".join(f"{final[f'{metric}_{name}']:.3g} {name}" for name in sets)
    names = [n for n in ("linear", "zeros") if all(metric in final["yardsticks"][s].get(n, {}) for s in sets)]
    marks = ", ".join(f"{n} " + " / ".join(f"{final['yardsticks'][s][n][metric]:.3g}" for s in sets) for n in names)
    return f"{run.dir.root.name}: done at step {final['step']}: held-out {label} (EMA) {values}" + (f" ({marks})" if marks else "")
