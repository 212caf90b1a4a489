"""Runs packed into one batched model: each run's folder is what it would be had it trained alone."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from diffusion_lib.harness.run_dir import RunDir
from diffusion_lib.tasks.matrix import InverseTask
from diffusion_lib.harness.trainer import Trainer1D
from diffusion_lib.tasks.base import mix_seed

from diffusion_lib.study import cli as comparison

STUDY = """
name: packed
seeds: [0, 1, 2]
strategies:
  adversarial: {strategy: adversarial, opt_steps: 2}
task: {dataset: inverse, rank: 3}
model: {hidden_dim: 32, dtype: float64}
train: {steps: 40, batch_size: 32, log_every: 4, save_every: 10}
eval: {every: 20, num_samples: 32, batch_size: 32, inference_steps_sweep: [0, 2]}
device: cpu
"""
RUNS = [f"adversarial__seed{seed}" for seed in range(3)]
# wall-clock fields, and the pack size itself, are the only ones allowed to differ
CLOCKS = {"sec_per_step", "train_seconds", "steps_per_second", "loadavg", "pack_size"}


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "packed.yaml"
    path.write_text(STUDY)
    return path


def study(study_file, out, *extra):
    return comparison.main(["--config", str(study_file), "--output", str(out), *map(str, extra)])


def assert_close(got, want, path="", rel=1e-5):
    """Recursive comparison: numbers to `rel` (float32 GEMMs of a pack may round differently), the rest equal."""
    if isinstance(want, dict):
        assert set(got) - CLOCKS == set(want) - CLOCKS, path
        for key in set(want) - CLOCKS:
            assert_close(got[key], want[key], f"{path}.{key}", rel)
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]", rel)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=1e-9), path
    else:
        assert got == want, path


def run_outputs(out, run_id):
    run = RunDir(out / "runs" / run_id)
    return run.read_metrics(), run.read_final()


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The three runs, trained one at a time."""
    folder = tmp_path_factory.mktemp("alone")
    (folder / "packed.yaml").write_text(STUDY)
    assert study(folder / "packed.yaml", folder / "out", "--pack", 1) == 0
    return folder / "out"


def test_a_pack_of_three_writes_what_three_lone_runs_write(tmp_path, study_file, alone, capsys):
    out = tmp_path / "out"
    assert study(study_file, out, "--pack", 3) == 0
    assert "[1/1] adversarial seeds 0, 1, 2: starting" in capsys.readouterr().out
    for run_id in RUNS:
        metrics, final = run_outputs(out, run_id)
        metrics_alone, final_alone = run_outputs(alone, run_id)
        assert_close(metrics, metrics_alone, run_id)
        assert_close(final, final_alone, run_id)
        assert final["pack_size"] == 3 and final_alone["pack_size"] == 1
    # the seeds differ, so the runs do too: the pack did not train one run three times
    finals = [run_outputs(out, r)[1]["mse_id"] for r in RUNS]
    assert len(set(finals)) == 3


def test_a_killed_pack_resumes_exactly(tmp_path, study_file, alone):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "experiments" / "matrix_inversion_mining_comparison.py"),
               "--config", str(study_file), "--output", str(out), "--pack", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "runs" / RUNS[-1] / "checkpoints" / "step-000000020.pt"
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "runs" / RUNS[0] / "final.json").exists(), "the pack finished before the kill"
    assert study(study_file, out, "--pack", 3, "--resume") == 0
    for run_id in RUNS:
        for got, want in zip(run_outputs(out, run_id), run_outputs(alone, run_id)):
            assert_close(got, want, run_id)


def test_packs_join_only_runs_of_one_setup_and_shards_mix_every_setup(tmp_path):
    from diffusion_lib.study.spec import expand, load_study, pack_runs, shard

    runs = expand(load_study(ROOT / "configs" / "studies" / "matrix_inversion_mining.yaml"), tmp_path)
    packs = pack_runs(runs, 10, lambda run: 0)
    assert sorted(len(pack) for pack in packs) == [10] * 4  # one pack per strategy, every seed in it
    assert all(len({run.strategy for run in pack}) == 1 for pack in packs)
    slices = [shard(runs, i, 4) for i in range(4)]
    assert sorted(r.run_id for s in slices for r in s) == sorted(r.run_id for r in runs)  # disjoint, complete
    for part in slices:  # each slice holds 2 or 3 seeds of every strategy, not all seeds of one
        counts = [sum(r.strategy == label for r in part) for label in ("none", "random", "adversarial",
                                                                       "adversarial_reference")]
        assert sorted(counts) == [2, 2, 3, 3], counts


def test_a_diverging_run_fails_alone_and_the_rest_of_its_pack_finishes(tmp_path, study_file, monkeypatch, alone):
    original = InverseTask.sample
    poisoned_seed = mix_seed(1, 13, 0)  # seed 1's batch of step 13 (generators are keyed to seed, step, process)

    def sample(self, batch_size, generator):
        batch = original(self, batch_size, generator)
        return batch._replace(x=batch.x * math.nan) if generator.initial_seed() == poisoned_seed else batch

    monkeypatch.setattr(InverseTask, "sample", sample)
    out = tmp_path / "out"
    assert study(study_file, out, "--pack", 3) == 0
    failed = RunDir(out / "runs" / RUNS[1])
    final = failed.read_final()
    assert final["status"] == "failed" and "non-finite loss or gradient at step 14" in final["error"], final
    # noticed at the next log line (step 16) or earlier, its last good checkpoint (step 10) kept
    assert sorted(p.name for p in failed.checkpoints.iterdir()) == ["step-000000010.pt"]
    assert max(r["step"] for r in failed.read_metrics()) <= 12
    for run_id in (RUNS[0], RUNS[2]):
        for got, want in zip(run_outputs(out, run_id), run_outputs(alone, run_id)):
            assert_close(got, want, run_id)
    summary = json.loads((out / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["finished", "failed", "finished"]


def test_a_damaged_checkpoint_splits_the_pack_instead_of_stopping_the_study(tmp_path, study_file, alone, monkeypatch):
    """Runs resume from their newest checkpoint that verifies: one whose newest is damaged goes back a
    checkpoint, so it is packed apart from the others (a pack resumes from one step)."""
    out = tmp_path / "out"
    original = Trainer1D.train_step

    def interrupt(self):
        original(self)
        if self.step == 25:
            self.stop.on_signal(signal.SIGINT, None)

    monkeypatch.setattr(Trainer1D, "train_step", interrupt)
    assert study(study_file, out, "--pack", 3) == 128 + signal.SIGINT
    monkeypatch.undo()
    damaged = out / "runs" / RUNS[1] / "checkpoints" / "step-000000025.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert study(study_file, out, "--pack", 3, "--resume") == 0
    for run_id in RUNS:
        for got, want in zip(run_outputs(out, run_id), run_outputs(alone, run_id)):
            assert_close(got, want, run_id)
