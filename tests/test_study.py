"""The comparison script end to end on a tiny study: outputs, resume, failures, shards, bad input."""
import csv
import importlib.util
import json
import re
import shlex

import pytest
import yaml

from conftest import ROOT
from diffusion_lib.study import launch
from diffusion_lib.harness.config import ConfigError
from diffusion_lib.harness.run_dir import RunDir
from diffusion_lib.study.spec import StudyDir, load_study, select
from diffusion_lib.harness.trainer import Trainer1D

from diffusion_lib.study import cli as comparison

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
primary: {compare: [adversarial, none], metric: mse_id}
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
    # from these real runs, the verdict opens with the declared primary comparison, on the EMA and the raw
    # model: its paired difference is the mean of the per-seed differences of the runs' final.json
    verdict = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    finals = {run_id: json.loads((out / "runs" / run_id / "final.json").read_text()) for run_id in RUN_IDS}
    for model, key in (("EMA", "mse_id"), ("raw", "mse_id_raw")):
        line = next(line for line in verdict.splitlines() if line.startswith(f"- {model}:"))
        by_hand = sum(finals[f"adversarial__seed{s}"][key] - finals[f"none__seed{s}"][key] for s in (0, 1)) / 2
        shown = float(re.search(r"A − B = ([-+0-9.e]+)", line).group(1))
        assert shown == pytest.approx(by_hand, rel=5e-3), (line, by_hand)
        assert "paired t, 2 pairs" in line
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
            self.stop.on_signal(2, None)

    monkeypatch.setattr(Trainer1D, "train_step", interrupt_third_run)
    assert main("--config", study_file, "--output", out) == 130
    assert "resume the study with:" in capsys.readouterr().err
    monkeypatch.undo()
    finished = {r: (out / "runs" / r / "final.json").stat().st_mtime_ns for r in RUN_IDS[:2]}
    assert not (out / "runs" / RUN_IDS[2] / "final.json").exists()
    assert main("--config", study_file, "--output", out) == 2  # not without --resume
    assert "pass --resume" in capsys.readouterr().err

    spy = []
    real = launch.run_in_process

    def recording(pack, resume, *rest):
        spy.extend((run.run_id, resume) for run in pack)
        return real(pack, resume, *rest)

    monkeypatch.setattr(launch, "run_in_process", recording)
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
    assert all(f"{run_id} " in printed and "24 of 24 steps left" in printed for run_id in RUN_IDS)
    assert not out.exists()


def test_dry_run_refuses_what_the_real_command_refuses_and_costs_only_what_is_left(tmp_path, study_file, capsys,
                                                                                monkeypatch):
    out = tmp_path / "study"
    original = Trainer1D.train_step

    def interrupt_the_second_run(self):
        original(self)
        if self.runs[0].dir.root.name == RUN_IDS[1] and self.step == 13:  # as if Ctrl-C: a checkpoint at 13
            self.stop.on_signal(2, None)

    monkeypatch.setattr(Trainer1D, "train_step", interrupt_the_second_run)
    assert main("--config", study_file, "--output", out) == 130
    monkeypatch.undo()
    capsys.readouterr()
    # the real command refuses a folder holding this study without --resume, or a different study
    for extra in ([], ["--resume", "train.steps=48"]):
        assert main("--config", study_file, "--output", out, "--dry-run", *extra) == 2
        assert "study folder" in capsys.readouterr().err
    assert main("--config", study_file, "--output", out, "--dry-run", "--resume") == 0
    printed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "finished" in printed[RUN_IDS[0]] and "0 of 24 steps left" in printed[RUN_IDS[0]]
    assert "partial (step 13)" in printed[RUN_IDS[1]] and "11 of 24 steps left" in printed[RUN_IDS[1]]
    assert "24 of 24 steps left" in printed[RUN_IDS[2]]


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
    study = load_study(ROOT / "configs" / "studies" / f"{name}.yaml")
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


def write_study(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused_study(capsys, *args):
    assert main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- run identity (class 3 of the robustness issue) ----------------------------------------------------
# class 3: runs that share a folder were merged silently; swept per-run keys mislabelled runs
@pytest.mark.parametrize(
    "change, fragment",
    [  # two labels or sweep values whose runs share a folder were merged silently
        ("strategies: {'a b': {strategy: none}, a-b: {strategy: random}}",
         "strategy labels 'a b' and 'a-b' in {src} map to the same run folder 'a-b__seed0'"),
        ("strategies: {Random: {strategy: random}, random: {strategy: random}}",
         "strategy labels 'Random' and 'random' in {src} map to the same run folder 'random__seed0'"),
        ("sweep: {mining.noise_scale: [1, 1.0]}",
         "sweep values 1 and 1.0 of 'mining.noise_scale' in {src} give the same run of strategy 'none'"),
        ("sweep: {mining.noise_scale: [2.0, 3.0, 2.0]}", "sweep key 'mining.noise_scale' in {src} lists the value 2.0 twice"),
        # the study sets these per run: a sweep over them mislabelled every run
        ("sweep: {seed: [1, 2]}", "sweep key 'seed' in {src} is set per run by the study; use its 'seeds' instead"),
        ("sweep: {results_dir: [a, b]}", "sweep key 'results_dir' in {src} is set per run by the study"),
        ("sweep: {mining.strategy: [random, none]}", "sweep key 'mining.strategy' in {src} is set per run by the study"),
        ("sweep: {mining.noise_scale: [[1, [2]]]}", "value [1, [2]] must be a number, text or a flat list"),
        ("strategies: {1: {strategy: none}}", "strategy label 1 in {src} must be non-empty text"),
    ],
)
def test_runs_that_would_share_a_folder_or_a_label_are_refused_before_training(tmp_path, study_file, capsys,
                                                                              change, fragment):
    child = write_study(tmp_path, f"extends: tiny.yaml\n{change}\n")
    out = tmp_path / "study"
    err = refused_study(capsys, "--config", child, "--output", out)
    assert fragment.format(src=child) in err
    assert not out.exists()


# class 4: a study of absurd size took minutes of silence to expand (and would then train it all)
@pytest.mark.parametrize(
    "change, fragment",
    [
        ("seeds: [" + ", ".join(map(str, range(1001))) + "]", "study key 'seeds' in {src} lists 1001 seeds: at most 1000"),
        ("sweep: {mining.noise_scale: [" + ", ".join(str(1 + i / 1000) for i in range(2000)) + "]}\nseeds: [0, 1, 2]",
         "{src} makes 12000 runs (seeds x sweep points x strategies): at most 10000"),
    ],
)
def test_studies_of_absurd_size_are_refused(tmp_path, study_file, change, fragment):
    child = write_study(tmp_path, f"extends: tiny.yaml\n{change}\n")
    with pytest.raises(ConfigError) as refusal:
        comparison.expand(load_study(child), tmp_path / "study")
    assert fragment.format(src=child) in str(refusal.value)


# -- damaged study.yaml (class 6) ----------------------------------------------------------------------
# class 6: a damaged study.yaml crashed --report-only and --resume
@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda saved: saved.pop("seeds"), "{file} is damaged: it lacks key 'seeds'"),
        (lambda saved: saved.update(seeds="zero"), "study key 'seeds' in {file} = 'zero' must be a non-empty list"),
        (lambda saved: saved.update(strategies=["none"]), "study key 'strategies' in {file} must map labels"),
        (lambda saved: saved.update(base=5), "{file} is damaged: key 'base' must map config keys to values"),
        (lambda saved: saved["base"].update({"name": "x"}), "unknown config key 'name' in {file} (base)"),
        (lambda saved: saved.update(extra=1), "{file} is damaged: unknown key 'extra'"),
        (lambda saved: saved.update(sweep={"train.steps": 3}), "sweep key 'train.steps' in {file} must map to a non-empty list"),
        (lambda saved: saved["base"].update({"train.steps": "many"}),
         "{file}, run none__seed0: config key 'train.steps' = 'many' has the wrong type"),
    ],
)
def test_a_damaged_study_yaml_is_refused_in_one_line(tmp_path, study_file, capsys, damage, fragment):
    out = tmp_path / "study"
    StudyDir(out).prepare(load_study(study_file), overwrite=False)  # as a study leaves it, without training
    saved = yaml.safe_load((out / "study.yaml").read_text())
    damage(saved)
    (out / "study.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    expected = fragment.format(file=out / "study.yaml")
    assert expected in refused_study(capsys, "--report-only", out)
    assert expected in refused_study(capsys, "--config", study_file, "--output", out, "--resume")


# -- the study's primary comparison (item 9) ------------------------------------------------------------
# item 9: the study primary is kept in Study and study.yaml (which always says it, None or not)
def test_primary_is_parsed_saved_and_dropped_with_its_strategies(tmp_path, study_file):
    child = write_study(tmp_path, "extends: tiny.yaml\nprimary: {compare: [adversarial, none], metric: mse_ood}\n")
    study = load_study(child)
    assert study.primary == {"compare": ["adversarial", "none"], "metric": "mse_ood"}
    assert study.to_dict()["primary"] == study.primary
    out = tmp_path / "study"
    StudyDir(out).prepare(study, overwrite=False)
    assert StudyDir(out).load().primary == study.primary
    assert select(load_study(child), ["none"], None).primary is None  # its comparison left the study
    # resuming with another primary is the same study: it only chooses the report's headline
    StudyDir(out).check(select(load_study(child), None, None), resume=True, overwrite=False, sharded=False)
    other = load_study(child)
    other.primary = None
    StudyDir(out).check(other, resume=True, overwrite=False, sharded=False)
    saved = yaml.safe_load((out / "study.yaml").read_text())
    del saved["primary"]
    (out / "study.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match="is damaged: it lacks key 'primary'"):
        StudyDir(out).load()


# item 9: pilot and quick inherit the primary through `extends`
def test_shipped_studies_carry_the_primary_through_extends():
    primary = {"compare": ["adversarial", "random"], "metric": "mse_id", "margin": "2%"}
    for name in ("matrix_inversion_mining", "pilot", "quick"):
        assert load_study(ROOT / "configs" / "studies" / f"{name}.yaml").primary == primary, name
    # an ablation replaces the strategies, so the labels of the inherited primary are not its own
    assert load_study(ROOT / "configs" / "studies" / "ablations" / "opt_steps.yaml").primary is None


# item 9: a bad primary is refused in one line naming the file
@pytest.mark.parametrize(
    "primary, fragment",
    [
        ("{compare: [adversarial, random], metric: mse_id}", "'random' is not a strategy of this study (none, adversarial)"),
        ("{compare: [none, none], metric: mse_id}", "compare = ['none', 'none'] must list two different strategy labels"),
        ("{compare: [none, adversarial], metric: loss}", "metric = 'loss' must be <metric>_<held-out set>, e.g. mse_id"),
        ("{compare: [none, adversarial], metric: accuracy_id}",
         "metric = 'accuracy_id' must be <metric>_<held-out set> with <metric> one of mse (the metrics of task 'inverse')"),
        ("{compare: [none, adversarial]}", "lacks 'metric'"),
        ("{compare: [none, adversarial], metric: mse_id, by: seed}", "has unknown key 'by'; allowed: compare, metric"),
        ("[none, adversarial]", "must be a mapping"),
    ],
)
def test_a_bad_primary_is_refused_in_one_line(tmp_path, study_file, capsys, primary, fragment):
    child = write_study(tmp_path, f"extends: tiny.yaml\nprimary: {primary}\n")
    err = refused_study(capsys, "--config", child, "--output", tmp_path / "study")
    assert f"study key 'primary' in {child}" in err and fragment in err


# -- the study script's own input and faults (classes 4, 5, 7) -------------------------------------------
# class 4: duplicate keys, --config '' and --output '' (the current folder!) were accepted
def test_bad_study_files_and_outputs_are_refused(tmp_path, study_file, capsys):
    twice = write_study(tmp_path, TINY_STUDY + "seeds: [3]\n")
    assert f"duplicate key in {twice}:" in refused_study(capsys, "--config", twice, "--output", tmp_path / "o")
    assert "study file '' is an empty path" in refused_study(capsys, "--config", "")
    assert "--output '' is an empty path" in refused_study(capsys, "--config", study_file, "--output", "")
    assert not (tmp_path / "o").exists()


# class 5: a study output that is a file ended in a traceback
def test_a_study_output_that_is_a_file_is_one_line_and_exit_1(tmp_path, study_file, capsys):
    blocker = tmp_path / "study"
    blocker.write_text("x")
    assert main("--config", study_file, "--output", blocker) == 1
    assert capsys.readouterr().err.strip() == f"error: cannot write '{blocker}': Not a directory"


# class 7: the study's resume command broke on paths with spaces
def test_the_study_resume_command_is_shell_quoted(tmp_path, study_file, monkeypatch, capsys):
    out = tmp_path / "my study"

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer1D, "train_step", interrupt)
    assert main("--config", study_file, "--output", out, "--seeds", "0") == 130
    command = capsys.readouterr().err.strip().splitlines()[-1].split("resume the study with: ", 1)[1]
    words = shlex.split(command)
    assert words[words.index("--output") + 1] == str(out) and words[-1] == "--resume"


# class 7: temp files of atomic writes killed midway were left for good
def test_study_temp_files_are_removed_when_its_report_is_rebuilt(tmp_path):
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(TINY_STUDY.replace("steps: 24", "steps: 4"))
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none") == 0
    stale = [out / ".report.md.abcdefgh.tmp", out / "plots" / ".final_mse.png.12345678.tmp"]
    for path in stale:
        path.write_text("x")
    assert main("--report-only", out) == 0
    assert [p for p in stale if p.exists()] == []


@pytest.mark.parametrize("override", ["model.name=sudoku_net", "train.log_with=wandb"])
def test_a_study_refused_for_bad_input_writes_nothing(tmp_path, study_file, capsys, override):
    """Issue 25: a model that cannot take the task (or a tracker whose package is missing, where wandb is not
    installed) was refused only after study.yaml was written, and the corrected command was then sent to
    --overwrite. Every refusal comes before the folder is made."""
    if override.endswith("wandb") and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "study"
    assert main("--config", study_file, "--output", out, override) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()
    assert main("--config", study_file, "--output", out, "--dry-run") == 0  # the corrected command is not refused
