"""Fault injection on real processes: SIGKILL, SIGINT and SIGTERM mid-training, then --resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import ROOT, TINY
from diffusion_lib.harness.run_dir import RunDir
from diffusion_lib.harness.stopping import StopRequest

LONG = [*TINY, "--train-steps", "600", "train.save_every=50", "eval.every=200"]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in ("sec_per_step", "train_seconds", "loadavg")} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, uninterrupted."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    assert train.main([*LONG, "--results-dir", str(folder)]) == 0
    return folder


def start(folder):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *LONG, "--results-dir", str(folder)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_for_checkpoint(process, folder, step, timeout=120):
    target = folder / "checkpoints" / f"step-{step:09d}.pt"
    deadline = time.time() + timeout
    while not target.exists():
        assert process.poll() is None, f"training ended before step {step}: {process.stderr.read()}"
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.02)


def assert_same_as_reference(folder, reference):
    assert comparable(RunDir(folder).read_metrics()) == comparable(RunDir(reference).read_metrics())
    got, want = (json.loads((d / "final.json").read_text()) for d in (folder, reference))
    for key in ("mse_id", "mse_ood", "mse_id_raw", "mse_ood_raw", "loss", "loss_denoise", "loss_energy", "energy_grad_evals", "train_flops"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    folder = tmp_path / "run"
    process = start(folder)
    wait_for_checkpoint(process, folder, 100)
    process.kill()
    process.wait()
    assert not (folder / "final.json").exists(), "the run finished before the kill: make it longer"
    assert train.main([*LONG, "--results-dir", str(folder), "--resume"]) == 0
    assert_same_as_reference(folder, reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])  # SIGUSR1: SLURM's --signal
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, reference, signum):
    folder = tmp_path / "run"
    process = start(folder)
    wait_for_checkpoint(process, folder, 50)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"interrupted: {signal.Signals(signum).name} at step (\d+): checkpoint saved in \S+; "
        rf"resume with: python train.py --config (\S+) --resume",
        last,
    )
    assert match, last
    step = int(match.group(1))
    assert (folder / "checkpoints" / f"step-{step:09d}.pt").exists()
    assert not (folder / "final.json").exists()
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # the metrics file was left whole
    # the printed command resumes the run, and it ends exactly as the uninterrupted one
    assert train.main(["--config", match.group(2), "--resume"]) == 0
    assert_same_as_reference(folder, reference)


def test_a_repeated_signal_forces_a_stop_except_when_a_launcher_forwards_it(monkeypatch):
    # a scheduler may signal every process and torchrun forwards its own copy, so a worker sees the signal
    # twice; that copy must not cancel the checkpoint (the launcher escalates to SIGKILL after its timeout)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    alone = StopRequest()
    alone.on_signal(signal.SIGINT, None)
    assert alone.caught == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        alone.on_signal(signal.SIGINT, None)

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    launched = StopRequest()
    launched.on_signal(signal.SIGINT, None)
    launched.on_signal(signal.SIGINT, None)
    assert launched.caught == signal.SIGINT


def test_a_signal_arriving_while_processes_agree_on_stopping_is_not_lost(monkeypatch):
    # the handler runs whenever the interpreter gets control, e.g. right after a collective returns;
    # the flag it sets must survive the bookkeeping of the check it interrupted
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    stop = StopRequest()

    def gather_interrupted_by_ctrl_c(flags):
        if stop.caught is None:
            stop.on_signal(signal.SIGINT, None)
        return torch.cat([flags, torch.zeros_like(flags)])  # the other process saw nothing

    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=gather_interrupted_by_ctrl_c)
    stop.requested(accelerator, step=0, log_every=5)  # this check may or may not see it ...
    assert stop.requested(accelerator, step=1, log_every=5)  # ... but the next one must
    assert stop.agreed == signal.SIGINT


def test_gpu_processes_agree_on_stopping_only_at_log_lines():
    """On GPUs the agreement (a collective) waits for the device: not on every step, only at log lines and
    when asked at any step (after the last one); CPU processes (gloo) agree on every step."""
    gathered = []
    stop = StopRequest()
    stop.caught = signal.SIGTERM
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cuda"),
                                  gather=lambda flags: gathered.append(flags) or flags.repeat(2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "tensor", lambda data, device=None: torch.as_tensor(data))  # no CUDA here
        assert not stop.requested(accelerator, 7, log_every=5) and not gathered  # step 7: between log lines
        assert stop.requested(accelerator, 7, log_every=5, at_any_step=True) and len(gathered) == 1
        assert stop.requested(accelerator, 10, log_every=5) and len(gathered) == 2
        accelerator.device = torch.device("cpu")
        assert stop.requested(accelerator, 7, log_every=5) and len(gathered) == 3


# while scoring, the final checkpoint is on disk: a scheduler's stop lands there as often as anywhere
SCORING_STEPS = [*TINY, "--train-steps", "25"]  # the last step is no multiple of train.save_every
SLOW_SCORING = """
import sys, time
from pathlib import Path
import train
from diffusion_lib.harness.evaluate import Evaluator
original = Evaluator.final_scores

def slow(self, *args, **kwargs):  # the final scoring (validation passes call `scores`)
    Path(sys.argv[1]).touch()
    time.sleep(120)  # the test's signal lands here
    return original(self, *args, **kwargs)

Evaluator.final_scores = slow
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The final scores of the scoring tests' run, uninterrupted."""
    folder = tmp_path_factory.mktemp("scored") / "run"
    assert train.main([*SCORING_STEPS, "--results-dir", str(folder)]) == 0
    return json.loads((folder / "final.json").read_text())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_while_scoring_says_how_to_resume(tmp_path, scored, signum):
    folder, scoring = tmp_path / "run", tmp_path / "scoring"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SCORING, str(scoring), *SCORING_STEPS, "--results-dir", str(folder)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not scoring.exists():
        assert process.poll() is None, f"the run ended before scoring: {process.stderr.read()}"
        assert time.time() < deadline, "timed out waiting for the scoring"
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"interrupted: {signal.Signals(signum).name} while scoring step 25: checkpoint saved in \S+; "
        rf"resume with: python train.py --config (\S+) --resume",
        last,
    )
    assert match, last
    assert (folder / "checkpoints" / "step-000000025.pt").exists()  # saved before scoring
    assert not (folder / "final.json").exists()
    assert train.main(["--config", match.group(1), "--resume"]) == 0
    final = json.loads((folder / "final.json").read_text())
    for key in ("step", "mse_id", "mse_ood", "mse_id_raw", "mse_ood_raw", "loss", "energy_grad_evals"):
        assert final[key] == pytest.approx(scored[key], abs=1e-6), key
