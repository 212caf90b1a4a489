"""The comparison script end to end on a tiny study: outputs, resume, failures, shards, bad input."""
import csv
import json
import sys

import pytest

from conftest import ROOT
from diffusion_lib.results import RunDir
from diffusion_lib.study import load_study
from diffusion_lib.trainer import Trainer1D

sys.path.insert(0, str(ROOT / "experiments"))
import matrix_inversion_mining_comparison as comparison  # noqa: E402

TINY_STUDY = """
name: tiny
seeds: [0, 1]
strategies:
  none: {strategy: none}
  adversarial: {strategy: adversarial, opt_steps: 2}
task: {dataset: inverse, rank: 3}
model: {hidden_dim: 32}
train: {steps: 24, batch_size: 32, log_every: 4, save_every: 8}
eval: {every: 8, num_samples: 32, batch_size: 32, inference_steps_sweep: [0, 2]}
device: cpu
"""
RUN_IDS = ["none__seed0", "adversarial__seed0", "none__seed1", "adversarial__seed1"]
TIMINGS = ("train_seconds", "steps_per_second", "loadavg")


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY)
    return path


def rows(folder):
    with open(folder / "summary.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(handle)]


def main(*args):
    return comparison.main([str(a) for a in args])


def test_tiny_study_writes_every_output(tmp_path, study_file, capsys):
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out) == 0
    printed = capsys.readouterr().out
    assert "[1/4] none seed 0: starting" in printed and "[4/4] adversarial seed 1: adversarial__seed1 done" in printed
    table = rows(out)
    assert [r["run_id"] for r in table] == RUN_IDS
    assert all(r["status"] == "finished" and float(r["mse_id"]) > 0 for r in table)
    for run_id in RUN_IDS:
        for name in ("config.yaml", "metrics.jsonl", "final.json"):
            assert (out / "runs" / run_id / name).exists(), (run_id, name)
        assert list((out / "runs" / run_id / "checkpoints").glob("step-*.pt"))
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 4 and summary["counts"]["finished"] == 4
    report = (out / "report.md").read_text()
    for section in ("adversarial vs none", "Equal-compute view", "Test-time compute", "0 inner steps"):
        assert section in report
    for plot in ("val_mse_vs_step", "val_mse_vs_seconds", "final_mse", "training_curves", "mse_vs_inference_steps"):
        assert (out / "plots" / f"{plot}.png").read_bytes().startswith(b"\x89PNG")


def test_resume_after_an_interrupted_study_redoes_nothing_finished(tmp_path, study_file, monkeypatch, capsys):
    out = tmp_path / "study"
    original = Trainer1D.train_step
    calls = {"n": 0}

    def interrupt_third_run(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 2 * 24 + 13:  # 13 steps into the third run, as if Ctrl-C arrived
            self._on_signal(2, None)

    monkeypatch.setattr(Trainer1D, "train_step", interrupt_third_run)
    assert main("--config", study_file, "--output", out) == 130
    assert "resume the study with:" in capsys.readouterr().err
    monkeypatch.undo()
    finished = {r: (out / "runs" / r / "final.json").stat().st_mtime_ns for r in RUN_IDS[:2]}
    assert not (out / "runs" / RUN_IDS[2] / "final.json").exists()
    assert main("--config", study_file, "--output", out) == 2  # not without --resume
    assert "pass --resume" in capsys.readouterr().err

    spy = []
    real = comparison.run_in_process

    def recording(pack, resume, label=""):
        spy.extend((run.run_id, resume) for run in pack)
        return real(pack, resume, label)

    monkeypatch.setattr(comparison, "run_in_process", recording)
    assert main("--config", study_file, "--output", out, "--resume") == 0
    assert [run_id for run_id, _ in spy] == RUN_IDS[2:]  # finished runs are kept, the rest continue or start
    steps = [r["step"] for r in RunDir(out / "runs" / RUN_IDS[2]).read_metrics() if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # the partial run continued from its checkpoint: no step logged twice
    assert {r: (out / "runs" / r / "final.json").stat().st_mtime_ns for r in RUN_IDS[:2]} == finished
    assert [r["status"] for r in rows(out)] == ["finished"] * 4


def test_a_diverging_run_is_marked_failed_and_the_study_goes_on(tmp_path, study_file, poison_batch, capsys):
    poison_batch(25 + 6)  # step 5 of the second run (each run draws step 0's batch once more to count FLOPs)
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out) == 0
    assert "[2/4] adversarial seed 0: adversarial__seed0 FAILED: non-finite loss or gradient at step 5" in capsys.readouterr().out
    table = {r["run_id"]: r for r in rows(out)}
    assert table["adversarial__seed0"]["status"] == "failed"
    assert all(table[r]["status"] == "finished" for r in RUN_IDS if r != "adversarial__seed0")
    report = (out / "report.md").read_text()
    assert "failed: `adversarial__seed0`" in report and "non-finite" in report


def test_shards_cover_the_study_and_merge_into_the_same_summary(tmp_path, study_file):
    whole = tmp_path / "whole"
    assert main("--config", study_file, "--output", whole) == 0
    sharded = tmp_path / "sharded"
    for index in range(3):
        assert main("--config", study_file, "--output", sharded, "--shard", f"{index}/3") == 0
    assert not (sharded / "report.md").exists()
    assert main("--report-only", sharded) == 0
    assert rows(sharded) == rows(whole)


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, study_file, capsys):
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert all(run_id in printed for run_id in RUN_IDS) and "estimated cost" in printed
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--strategies", "greedy"], "unknown strategy 'greedy'; this study has: none, adversarial"),
        (["train.stpes=3"], "did you mean 'train.steps'?"),
        (["--shard", "3/3"], "--shard '3/3' must have 0 <= I < N"),
        (["--num-processes", "2"], "--num-processes needs --launcher accelerate"),
        (["--launcher", "accelerate", "--num-processes", "0"], "--num-processes 0 must be >= 1"),
        (["--shard", "0/2", "--overwrite"], "--overwrite with --shard would delete the other shards' runs"),
        (["seed=3"], "override 'seed' is set per run by the study"),
        (["mining.strategy=random"], "use --strategies"),
        (["mining.opt_steps=0"], "mining_config['opt_steps'] = 0 is invalid"),
    ],
)
def test_bad_study_input_is_refused(tmp_path, study_file, capsys, extra, fragment):
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_different_study_in_the_same_folder_is_refused(tmp_path, study_file, capsys):
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none") == 0
    assert main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none", "train.steps=8",
                "--resume") == 2
    assert "holds a different study" in capsys.readouterr().err


def test_extends_merges_sections_and_replaces_strategies(tmp_path, study_file):
    child = tmp_path / "child.yaml"
    child.write_text("extends: tiny.yaml\ntrain: {steps: 5}\nstrategies: {random: {strategy: random}}\n"
                     "sweep: {mining.noise_scale: [2.0, 3.0]}\n")
    study = load_study(child)
    assert study.name == "child" and list(study.strategies) == ["random"]
    assert study.base["train.steps"] == 5 and study.base["train.batch_size"] == 32
    assert study.sweep == {"mining.noise_scale": [2.0, 3.0]}


@pytest.mark.parametrize("name", ["matrix_inversion_mining", "pilot", "quick", "ablations/opt_steps",
                                  "ablations/scale_factor", "ablations/mining_every", "ablations/mixed"])
def test_shipped_study_configs_are_valid(name, tmp_path):
    study = load_study(ROOT / "configs" / f"{name}.yaml")
    runs = comparison.expand(study, tmp_path)
    assert runs and len({r.run_id for r in runs}) == len(runs)


def test_a_run_killed_before_its_first_checkpoint_restarts_on_resume(tmp_path, study_file):
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none") == 0
    run = RunDir(out / "runs" / "none__seed0")
    reference = [{k: v for k, v in r.items() if k not in TIMINGS + ("sec_per_step",)} for r in run.read_metrics()]
    # as if killed after 3 logged steps, before any checkpoint: config and metrics, no checkpoints
    for path in [*run.checkpoints.iterdir(), run.final]:
        path.unlink()
    run.checkpoints.rmdir()
    run.metrics.write_text("".join(line + "\n" for line in run.metrics.read_text().splitlines()[:3]))
    assert main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none", "--resume") == 0
    again = [{k: v for k, v in r.items() if k not in TIMINGS + ("sec_per_step",)} for r in run.read_metrics()]
    assert again == reference  # started over, metrics not duplicated


def test_command_line_overrides_apply_to_every_strategy(tmp_path, study_file):
    study = load_study(study_file, {"mining.opt_steps": 5})
    runs = comparison.expand(study, tmp_path)
    assert {r.config.mining["opt_steps"] for r in runs} == {5}  # adversarial's own opt_steps: 2 is overridden
