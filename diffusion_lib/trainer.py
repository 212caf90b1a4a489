"""Trainer1D: accelerate-driven training with EMA, validation, metrics, atomic checkpoints and resume."""
from __future__ import annotations

import functools
import math
import os
import shlex
import signal
import threading
import time
from functools import lru_cache
from typing import Any

import torch
from accelerate import Accelerator
from ema_pytorch import EMA
from tqdm.auto import tqdm

from .checkpoint import capture_rng_state, load_latest_checkpoint, restore_rng_state, save_checkpoint
from .config import ConfigError, RunConfig
from .diffusion import GaussianDiffusion1D
from .results import EVALUATION_CHANGES, RESUMABLE_CHANGES, RunDir
from .tasks import MatrixTask
from .utils import mix_seed

LOGGED = ("loss", "loss_denoise", "loss_energy", "energy_pos", "energy_neg", "accept_rate")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at `step`."""

    def __init__(self, step: int, signum: int, run_dir: RunDir):
        self.step, self.signum, self.run_dir = step, signum, run_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step}: checkpoint saved in {run_dir.checkpoints}; "
            f"resume with: python train.py --config {shlex.quote(str(run_dir.config))} --resume"
        )


class RunDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, its last good checkpoint stays."""


@lru_cache(maxsize=None)
def make_accelerator(device: str = "auto") -> Accelerator:
    """One Accelerator per process and device (accelerate's state is process-global)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use --device auto or --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device = 'mps' but MPS is not available here; use --device auto or --device cpu")
    return Accelerator(cpu=device == "cpu")


def _releasing_run_lock(method: Any) -> Any:
    """For train()/evaluate_saved(): release the run lock taken in __init__ however the method ends."""

    @functools.wraps(method)
    def wrapper(self: Trainer1D, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            if self._lock is not None:
                self._lock.release()

    return wrapper


class Trainer1D:
    """Trains a GaussianDiffusion1D on a task as `config` says, writing everything under config.results_dir."""

    def __init__(
        self,
        diffusion: GaussianDiffusion1D,
        task: MatrixTask,
        config: RunConfig,
        accelerator: Accelerator | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        evaluate_only: bool = False,
    ):
        """`resume`: continue the run in config.results_dir; `overwrite`: start it over; `evaluate_only`:
        only score its saved model (`evaluate_saved`), possibly with other sampling settings."""
        self.config, self.task = config, task
        self.resume, self.overwrite = resume or evaluate_only, overwrite
        self.run_dir = RunDir(config.results_dir)
        self.accelerator = acc = accelerator or make_accelerator(config.device)
        train = config.train
        if train.batch_size % acc.num_processes:
            raise ConfigError(
                f"train.batch_size = {train.batch_size} must be divisible by the {acc.num_processes} processes"
            )
        # one writer per run folder: the main process holds <run>/.lock until train()/evaluate_saved() end
        self._lock = self.run_dir.lock(optional=evaluate_only) if acc.is_main_process else None
        try:
            self.run_dir.check(config, self.resume, overwrite, EVALUATION_CHANGES if evaluate_only else RESUMABLE_CHANGES)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self.local_batch = train.batch_size // acc.num_processes

        self.diffusion = diffusion.to(acc.device)
        self.ema = EMA(diffusion, beta=train.ema_decay, update_every=train.ema_every, include_online_model=False)
        self.ema.to(acc.device)
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=train.lr, betas=tuple(train.adam_betas))
        self.model, self.optimizer = acc.prepare(diffusion, optimizer)

        # each process scores its own slice of every held-out set; the sums are reduced across processes
        self.held_out = {
            name: task.held_out(ood, config.eval.num_samples)
            for name, ood in (("id", False), ("ood", True))
        }
        self.zeros_mse = {name: data.y.pow(2).mean().item() for name, data in self.held_out.items()}
        self.local_held_out = {
            name: data.shard(acc.process_index, acc.num_processes).to(acc.device) for name, data in self.held_out.items()
        }

        self.step = 0
        self.grad_evals = 0.0  # energy-gradient evaluations per sample, cumulative
        self.train_seconds = 0.0
        self._sums: dict[str, Any] = {}  # logged stats summed since the last log line (tensors until logged)
        self._counts: dict[str, int] = {}  # how many steps contributed to each sum (mining stats skip some)
        self._last_log: dict[str, float] = {}
        self._caught_signal: int | None = None  # SIGINT/SIGTERM seen by this process
        self._stop_signal: int | None = None  # the signal all processes agreed to stop on

    # -- the loop ------------------------------------------------------------------------------------
    @_releasing_run_lock
    def train(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            self.run_dir.prepare(cfg, self.overwrite)
        acc.wait_for_everyone()
        if self.resume and not self._load(truncate_metrics=True) and acc.is_main_process:
            self.run_dir.truncate_metrics(0)  # no checkpoint yet: the run starts over, so do its metrics
        if self.step >= cfg.train.steps and (final := self.run_dir.read_final()) is not None:
            return final
        if acc.is_main_process:
            self.run_dir.final.unlink(missing_ok=True)  # the run continues: an old final.json is stale

        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not acc.is_main_process, dynamic_ncols=True)
        previous_handlers = self._catch_signals()
        try:
            while self.step < cfg.train.steps:
                self._stop_if_requested()
                self.train_step()
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    self._log()
                    bar.set_postfix(loss=f"{self._last_log['loss']:.4f}", gap=f"{self._last_log.get('energy_gap', 0):.3f}")
                if self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                    self._log_validation(self.evaluate())
                if self.step % cfg.train.save_every == 0:
                    self._save()
            self._stop_if_requested()  # a signal during the last step still stops the run before scoring
        finally:
            bar.close()
            self._restore_signals(previous_handlers)
        return self._finish()

    def train_step(self) -> None:
        """One optimisation step on a fresh batch (data keyed to the step), with EMA update and bookkeeping."""
        acc, train = self.accelerator, self.config.train
        started = time.perf_counter()
        # data and noise are keyed to (seed, step, process): a resumed run draws exactly what it would have
        generator = torch.Generator(device=acc.device).manual_seed(
            mix_seed(self.config.seed, self.step, acc.process_index)
        )
        x, y = self.task.sample(self.local_batch, generator)
        loss, stats = self.model(x, y, step=self.step, generator=generator)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        if not torch.isfinite(loss.detach() + grad_norm).item():
            self._diverged(stats, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        self.grad_evals += stats["grad_evals"]
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        for key, value in [*((k, stats[k]) for k in LOGGED if k in stats), ("seconds", seconds)]:
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1

    def _diverged(self, stats: dict[str, Any], grad_norm: torch.Tensor) -> None:
        parts = {k: float(stats[k]) for k in ("loss", "loss_denoise", "loss_energy") if k in stats}
        parts["grad_norm"] = float(grad_norm)
        detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        message = f"non-finite loss or gradient at step {self.step + 1} ({detail}); last good checkpoint kept"
        if self.accelerator.is_main_process:
            self.run_dir.write_final({"status": "failed", "error": message, "step": self.step, **self._run_info()})
        raise RunDiverged(message)

    # -- metrics -------------------------------------------------------------------------------------
    def _reduced_sums(self) -> dict[str, float]:
        """The interval's sums, averaged over processes (every process calls this at the same step)."""
        keys = sorted(self._sums)
        values = torch.tensor([float(self._sums[k]) for k in keys], device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist()))

    def _log(self) -> None:
        if not self._counts:
            return
        sums = self._reduced_sums()
        record: dict[str, Any] = {"kind": "train", "step": self.step}
        record.update({k: sums[k] / self._counts[k] for k in LOGGED if k in sums})
        if "energy_neg" in record:
            record["energy_gap"] = record["energy_neg"] - record["energy_pos"]
        record.update(
            sec_per_step=sums["seconds"] / self._counts["seconds"],
            grad_evals=self.grad_evals,
            train_seconds=self.train_seconds,
        )
        self._last_log = record
        self._sums, self._counts = {}, {}
        if self.accelerator.is_main_process:
            self.run_dir.append_metrics(record)

    def _log_validation(self, mse: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            record = {"kind": "val", "step": self.step, **{f"val_{k}": v for k, v in mse.items()}}
            record.update(grad_evals=self.grad_evals, train_seconds=self.train_seconds)
            self.run_dir.append_metrics(record)

    # -- validation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, diffusion: GaussianDiffusion1D | None = None, inner_steps: int | None = None) -> dict[str, float]:
        """Held-out MSE of `diffusion` (default: the EMA model) on the in-distribution and ood sets."""
        diffusion = diffusion or self.ema.ema_model
        chunk = self.config.eval.batch_size
        result = {}
        for name, data in self.local_held_out.items():
            squared_error = torch.zeros((), device=self.accelerator.device)
            for start in range(0, data.x.shape[0], chunk):
                part = slice(start, start + chunk)
                answer = diffusion.sample(data.x[part], noise=data.noise[part], inner_steps=inner_steps)
                squared_error += (answer - data.y[part]).pow(2).sum()
            total = self.accelerator.reduce(squared_error, reduction="sum")
            result[f"mse_{name}"] = total.item() / self.held_out[name].y.numel()
        return result

    def _scores(self) -> dict[str, Any]:
        """Held-out MSE of the EMA and the raw model, and of the EMA model per inference inner-step count."""
        return {
            **self.evaluate(),
            **{f"{k}_raw": v for k, v in self.evaluate(self.accelerator.unwrap_model(self.model)).items()},
            "inference_steps_sweep": {
                str(steps): self.evaluate(inner_steps=steps) for steps in self.config.eval.inference_steps_sweep
            },
        }

    def _finish(self) -> dict[str, Any]:
        if self.step % self.config.train.save_every:
            self._save()  # before scoring, so a kill while scoring loses no steps
        scores = self._scores()
        # a run killed between its final val line and final.json has that line already: log it once
        if not any(r.get("kind") == "val" and r["step"] == self.step for r in self.run_dir.read_metrics()):
            self._log_validation({k: scores[k] for k in ("mse_id", "mse_ood")})
        last = {k: self._last_log[k] for k in ("loss", "loss_denoise", "loss_energy") if k in self._last_log}
        final = {
            "status": "finished",
            "step": self.step,
            **scores,
            "zeros_mse_id": self.zeros_mse["id"],
            "zeros_mse_ood": self.zeros_mse["ood"],
            **last,
            **self._run_info(),
        }
        if self.accelerator.is_main_process:
            self.run_dir.write_final(final)
        self.accelerator.wait_for_everyone()
        return final

    def _run_info(self) -> dict[str, Any]:
        return {
            "grad_evals": self.grad_evals,
            "num_processes": self.accelerator.num_processes,
            "train_seconds": self.train_seconds,
            "steps_per_second": self.step / self.train_seconds if self.train_seconds else math.nan,
        }

    @_releasing_run_lock
    def evaluate_saved(self) -> dict[str, Any]:
        """Sample-only: score the latest checkpoint's EMA and raw model (no training, nothing truncated)."""
        if not self._load(truncate_metrics=False):
            raise ConfigError(f"--evaluate: no readable checkpoint in '{self.run_dir.checkpoints}'")
        return {"step": self.step, **self._scores()}

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self) -> None:
        interval = {"sums": self._reduced_sums(), "counts": dict(self._counts)}  # a collective: every process
        if not self.accelerator.is_main_process:
            return
        state = {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng_state(),
            "config": self.config.to_dict(),
            "grad_evals": self.grad_evals,
            "train_seconds": self.train_seconds,
            "interval": interval,
            "last_log": self._last_log,
        }
        save_checkpoint(self.run_dir.checkpoints, self.step, state, keep=self.config.train.keep_checkpoints)

    def _load(self, truncate_metrics: bool) -> bool:
        state = load_latest_checkpoint(self.run_dir.checkpoints, required=("model", "ema", "optimizer", "rng"))
        if state is None:
            return False
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        self.step, self.grad_evals = state["step"], state["grad_evals"]
        self.train_seconds = state["train_seconds"]
        self._sums, self._counts = dict(state["interval"]["sums"]), dict(state["interval"]["counts"])
        self._last_log = dict(state["last_log"])
        if truncate_metrics and self.accelerator.is_main_process:
            self.run_dir.truncate_metrics(self.step)  # lines logged after this checkpoint will be logged again
        self.accelerator.wait_for_everyone()
        return True

    # -- signals -------------------------------------------------------------------------------------
    def _catch_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        # a launcher's forwarded copy of the stop signal may still be on its way: let it pass quietly
        forwarded = self._stop_signal is not None and _under_elastic_launcher()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if forwarded else handler)

    def _stop_if_requested(self) -> None:
        if self._stop_requested():
            self._save()
            self.accelerator.wait_for_everyone()  # no process leaves before the checkpoint is on disk
            raise TrainingInterrupted(self.step, self._stop_signal, self.run_dir)

    def _stop_requested(self) -> bool:
        """Whether any process caught SIGINT/SIGTERM; all processes agree, so they stop at the same step."""
        caught = self._caught_signal or 0
        if self.accelerator.num_processes > 1:
            caught = int(self.accelerator.gather(torch.tensor([caught], device=self.accelerator.device)).max())
        self._stop_signal = caught or None
        return self._stop_signal is not None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # only the handler writes _caught_signal, so a signal landing mid-gather is never overwritten
        if self._caught_signal is None:
            self._caught_signal = signum
        elif not _under_elastic_launcher():
            raise KeyboardInterrupt  # a second signal: stop now, without the checkpoint
        # Under torchrun a repeat is a copy, not a second request: a scheduler may signal every process
        # and the launcher forwards its own; it escalates to SIGKILL itself after its shutdown timeout.


def _under_elastic_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ
