"""Why training stops before its last step: a stop signal (StopRequest), or a run diverging (Divergence).

SIGINT (Ctrl-C), SIGTERM (a scheduler's stop) and SIGUSR1 (what SLURM's `--signal` sends first) are stop
requests. While training, a signal only sets a flag: the loop saves a checkpoint at the next step and
stops (TrainingInterrupted). While the finished runs are scored their checkpoint is on disk already, so a
signal ends the scoring where it lands (ScoringInterrupted). Either way the command line says which
checkpoint to resume from and exits with 128 + the signal's number.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from diffusion_lib.harness.run_dir import TrainingInterrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class ScoringInterrupted(TrainingInterrupted):
    """A stop signal arrived while the trained runs were scored; each has its checkpoint at `step`."""

    def __str__(self) -> str:
        folders = ", ".join(str(d.checkpoints) for d in self.run_dirs)
        return f"{signal.Signals(self.signum).name} while scoring step {self.step}: checkpoint saved in {folders}"


def under_elastic_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopRequest:
    """The stop signal this process caught, and the one every process of the run agreed to stop on."""

    def __init__(self) -> None:
        self.caught: int | None = None  # written only by the handler: a signal landing mid-agreement is kept
        self.agreed: int | None = None
        self._raise: Callable[[int], BaseException] | None = None  # set by stop_at_once

    @contextmanager
    def catching(self) -> Iterator[None]:
        """Handle the stop signals until the block ends (in the main thread only: Python runs handlers there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            # a launcher's forwarded copy of the signal may still be on its way: let it pass quietly
            forwarded = self.caught is not None and under_elastic_launcher()
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if forwarded else handler)

    def stop_at_once(self, error: Callable[[int], BaseException]) -> None:
        """From now on a stop signal raises `error(signum)` where it lands (one caught already: right here)."""
        if self.caught is not None:
            raise error(self.caught)
        self._raise = error

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.caught is None:
            self.caught = signum
            if self._raise is not None:
                raise self._raise(signum)
        elif not under_elastic_launcher():
            raise KeyboardInterrupt  # a second signal: stop now, without the checkpoint
        # Under torchrun a repeat is a copy, not a second request: a scheduler may signal every process
        # and the launcher forwards its own; it escalates to SIGKILL itself after its shutdown timeout.

    def requested(self, accelerator: Any, step: int, log_every: int, at_any_step: bool = False) -> bool:
        """Whether any process caught a stop signal; all processes agree, so they stop at the same step.

        Agreeing is a collective that waits for the device, so several GPU processes agree only at log
        lines (or when `at_any_step`): a signal stops them up to `log_every` steps later.
        """
        caught = self.caught or 0
        if accelerator.num_processes > 1:
            if accelerator.device.type != "cpu" and step % log_every and not at_any_step:
                return False
            caught = int(accelerator.gather(torch.tensor([caught], device=accelerator.device)).max())
        self.agreed = caught or None
        return self.agreed is not None


class Divergence:
    """Per run of a pack, the first step whose loss or gradient norm was not finite, and the values then.

    Kept on the device, so a training step reads nothing back; `found` reads it at the loop's pauses.
    """

    def __init__(self, runs: int, device: torch.device):
        self.bad_step = torch.full((runs,), -1, dtype=torch.long, device=device)  # -1: finite so far
        self.values = torch.zeros(runs, 4, device=device)  # loss, loss_denoise, loss_energy, grad norm

    def watch(self, step: int, stats: dict[str, Any], grad_norm: torch.Tensor) -> None:
        """Note the runs whose step `step + 1` (the one being taken) is the first not finite."""
        newly = ~(torch.isfinite(stats["loss"]) & torch.isfinite(grad_norm)) & (self.bad_step < 0)
        energy = stats.get("loss_energy", torch.full_like(grad_norm, math.nan))
        values = torch.stack([stats["loss"], stats["loss_denoise"], energy, grad_norm], dim=1).float()
        self.bad_step = torch.where(newly, step + 1, self.bad_step)
        self.values = torch.where(newly.unsqueeze(1), values, self.values)

    def found(self, accelerator: Any, mining: bool) -> dict[int, tuple[int, str]]:
        """Run index -> (its first non-finite step, what was not finite) for each run that diverged; a
        collective (every process calls it at one step). `mining`: the loss has an energy term."""
        bad = accelerator.reduce(self.bad_step, reduction="max").tolist()
        if max(bad, default=-1) < 0:
            return {}
        found = {}
        for run, (step, (loss, denoise, energy, grad_norm)) in enumerate(zip(bad, self.values.tolist())):
            if step >= 0:
                energy_part = f"loss_energy={energy:.4g}, " if mining else ""
                found[run] = step, f"loss={loss:.4g}, loss_denoise={denoise:.4g}, {energy_part}grad_norm={grad_norm:.4g}"
        return found

    def keep(self, rows: torch.Tensor) -> None:
        self.bad_step, self.values = self.bad_step.index_select(0, rows), self.values.index_select(0, rows)
