"""Two CPU processes through `accelerate launch` (torchrun + gloo): one writer, sharded validation."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

import train
from conftest import ROOT, TINY
from diffusion_lib.harness.run_dir import RunDir

# accelerate's `--cpu` always uses its single-process launcher; `--multi_gpu` selects torchrun, which on a
# machine without GPUs runs the processes on the CPU with the gloo backend (our --device cpu asks for it)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# 65 problems: the shards are unequal (33 + 32). float64: the two processes score 33 + 32 problems where one
# process scores 65, and float32 GEMMs of different shapes and thread counts round differently (2.2e-5
# relative was seen on an AMD EPYC); in double the same difference is ~1e-15, far inside the 1e-9 below.
LEARNING = [*TINY, "--train-steps", "150", "train.lr=3e-3", "train.save_every=50", "eval.every=50",
            "eval.num_samples=65", "model.dtype=float64"]


def launch(*args):
    result = subprocess.run([*LAUNCH, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_train_write_once_and_validate_on_the_whole_set(tmp_path, capsys):
    folder = tmp_path / "run"
    result = launch(*LEARNING, "--results-dir", str(folder))
    assert result.stdout.count("# resolved config") == 1 and result.stdout.count("done at step 150") == 1
    final = json.loads((folder / "final.json").read_text())
    assert final["num_processes"] == 2 and final["step"] == 150
    assert final["mse_id"] < 0.3 * final["yardsticks"]["id"]["zeros"]["mse"], final  # it learns
    records = RunDir(folder).read_metrics()
    counts = Counter((r["kind"], r["step"]) for r in records)
    assert counts and max(counts.values()) == 1, "every metrics line must be written once"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-000000100.pt", "step-000000150.pt"]
    # one process scoring the same checkpoint on the whole held-out set gets the same MSE: the two
    # shards covered every problem exactly once
    assert train.main([*LEARNING, "--results-dir", str(folder), "--evaluate"]) == 0
    evaluation = json.loads((folder / "evaluations" / "step-150__as_trained.json").read_text())
    assert evaluation["mse_id"] == pytest.approx(final["mse_id"], rel=1e-9)
    assert evaluation["mse_ood"] == pytest.approx(final["mse_ood"], rel=1e-9)


@pytest.mark.parametrize("first, then", [("two", "one"), ("one", "two")])
def test_checkpoints_move_between_process_counts(tmp_path, first, then):
    folder = tmp_path / "run"
    args = [*TINY, "--results-dir", str(folder), "--train-steps"]
    start = {"two": lambda *a: launch(*a), "one": lambda *a: train.main(list(a)) == 0 or pytest.fail("run failed")}
    start[first](*args, "20")
    start[then](*args, "30", "--resume")
    final = json.loads((folder / "final.json").read_text())
    assert final["step"] == 30 and final["num_processes"] == (2 if then == "two" else 1)
    steps = [r["step"] for r in RunDir(folder).read_metrics() if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # continued from step 20, nothing repeated


def test_study_runs_through_the_accelerate_launcher(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: launched\nseeds: [0]\nstrategies: {adversarial: {strategy: adversarial}}\n"
        "task: {rank: 3}\nmodel: {hidden_dim: 32}\ntrain: {steps: 12, batch_size: 32, log_every: 4}\n"
        "eval: {every: 6, num_samples: 33, batch_size: 32}\ndevice: cpu\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "matrix_inversion_mining_comparison.py"), "--config", str(study),
         "--output", str(out), "--launcher", "accelerate", "--num-processes", "2"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((out / "runs" / "adversarial__seed0" / "final.json").read_text())
    assert final["num_processes"] == 2 and final["step"] == 12
    assert (out / "report.md").exists()


def wait_for_file(process: subprocess.Popen, path, errors) -> None:
    deadline = time.time() + 120
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, errors()[-2000:]
        time.sleep(0.05)


@pytest.mark.parametrize("signum, receivers", [
    (signal.SIGINT, "launcher"),  # a terminal's Ctrl-C: torchrun's workers have their own sessions, it forwards it
    (signal.SIGTERM, "every process"),  # a scheduler (e.g. SLURM) signals all; the launcher forwards a second copy
])
def test_a_signal_stops_both_processes_at_one_checkpoint(tmp_path, signum, receivers):
    folder = tmp_path / "run"
    process = subprocess.Popen(
        [*LAUNCH, str(ROOT / "train.py"), *TINY, "--train-steps", "5000", "train.save_every=25",
         "--results-dir", str(folder)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for_file(process, folder / "checkpoints" / "step-000000025.pt", lambda: process.stderr.read())
    if receivers == "launcher":
        os.killpg(process.pid, signum)
    else:
        for target in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
            target.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert err.count(f"interrupted: {signum.name} at step") == 1, err[-2000:]  # one process speaks for both
    step = int(err.split(f"interrupted: {signum.name} at step ")[1].split(":")[0])
    assert (folder / "checkpoints" / f"step-{step:09d}.pt").exists()
    assert train.main(["--config", str(folder / "config.yaml"), "--train-steps", str(step + 10), "--resume"]) == 0


@pytest.mark.parametrize("processes, signum", [(1, signal.SIGTERM), (2, signal.SIGINT)])
def test_a_signal_to_the_study_alone_stops_its_launched_run_at_a_checkpoint(tmp_path, processes, signum):
    # a scheduler or a container runtime may signal only the study's process; the launched run must
    # still stop cleanly, and the study must wait for it (accelerate's 1-process launcher exits at once)
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: stopped\nseeds: [0]\nstrategies: {none: {strategy: none}}\ntask: {rank: 3}\n"
        "model: {hidden_dim: 32}\ntrain: {steps: 4000, batch_size: 32, log_every: 5, save_every: 25}\n"
        "eval: {every: 26, num_samples: 3000, batch_size: 3000}\ndevice: cpu\n"  # slow to stop: step 26 evaluates
    )
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    command = [sys.executable, str(ROOT / "experiments" / "matrix_inversion_mining_comparison.py"),
               "--config", str(study), "--output", str(out), "--launcher", "accelerate",
               "--num-processes", str(processes)]
    with log.open("w") as stderr:  # a file, not a pipe: a pipe would make us wait for the run's processes too
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        run = out / "runs" / "none__seed0"
        wait_for_file(process, run / "checkpoints" / "step-000000025.pt", log.read_text)
        launched = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signum)  # to the study's process only
        assert process.wait(timeout=120) == 128 + signum, log.read_text()[-2000:]
    still_running = [p for p in launched if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not still_running, "the study exited before its run's processes"
    err = log.read_text()
    assert err.count(f"interrupted: {signum.name} at step") == 1, err[-2000:]
    step = int(err.split(f"interrupted: {signum.name} at step ")[1].split(":")[0])
    assert (run / "checkpoints" / f"step-{step:09d}.pt").exists()
    assert f"interrupted: run none__seed0 stopped by {signum.name}; resume the study with:" in err
    assert err.count("--resume") == 1, err[-2000:]  # one resume command: the study's, not the run's too
    assert not (run / "final.json").exists()
