"""Fault injection on real processes: SIGKILL, SIGINT and SIGTERM mid-training, then --resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, TINY
from diffusion_lib.results import RunDir

LONG = [*TINY, "--train-steps", "600", "train.save_every=50", "eval.every=200"]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in ("sec_per_step", "train_seconds")} for r in records]


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
    for key in ("mse_id", "mse_ood", "mse_id_raw", "mse_ood_raw", "loss", "loss_denoise", "loss_energy", "grad_evals"):
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
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
