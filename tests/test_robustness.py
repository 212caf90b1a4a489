"""Hostile and careless input (issue 18): each case ends in one line and the promised exit code, and
nothing the user keeps is deleted or decided by a damaged file."""
import json
import sys

import pytest

import train
from conftest import ROOT
from diffusion_lib.harness.config import ConfigError, build_config
from diffusion_lib.mining import resolve_mining_config
from diffusion_lib.study.spec import load_study

from diffusion_lib.study import cli as comparison

STUDY = """
name: tiny
seeds: [0]
strategies:
  none: {strategy: none}
  random: {strategy: random}
task: {dataset: inverse, rank: 2}
model: {hidden_dim: 16}
train: {steps: 4, batch_size: 16, log_every: 2, save_every: 2}
eval: {every: 2, num_samples: 16, batch_size: 16}
device: cpu
"""


def one_line_error(capsys, *fragments):
    """The single stderr line of a refused command, checked for `fragments`."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def study(tmp_path, text=STUDY, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def compare(*args):
    return comparison.main([str(a) for a in args])


# -- item 4: mining.strategy given a list or a mapping --------------------------------------------------
@pytest.mark.parametrize("value", [["random"], {"a": 1}])
def test_a_mining_strategy_that_is_a_list_or_mapping_is_refused(value):
    with pytest.raises(ValueError, match=r"mining_config\['strategy'\] = .* must be one strategy name; allowed: none, random"):
        resolve_mining_config({"strategy": value})
    with pytest.raises(ConfigError, match="mining_config"):
        build_config({"mining.strategy": value})


@pytest.mark.parametrize("key, kind", [("model.name", "model"), ("task.dataset", "dataset"), ("mining.strategy", "strategy")])
@pytest.mark.parametrize("value", [["mlp"], {"a": 1}])
def test_a_list_or_mapping_where_a_registry_name_goes_is_one_line(key, kind, value):
    """Each registry refuses an unhashable name in one line, never with 'unhashable type'."""
    with pytest.raises(ConfigError) as refusal:
        build_config({key: value})
    message = str(refusal.value)
    assert f"must be one {kind} name; allowed: " in message and "\n" not in message and "unhashable" not in message
    with pytest.raises(ConfigError, match=r"sampler \['mlp'\] must be one sampler name; allowed: ired, langevin, mala"):
        build_config({"diffusion.sampler": {"name": ["mlp"]}})


@pytest.mark.parametrize("value", ["[random]", "{a: 1}"])
def test_a_mining_strategy_list_on_the_command_line_is_one_line_and_exit_2(tiny_args, capsys, value):
    assert train.main(tiny_args(f"mining.strategy={value}")) == 2
    one_line_error(capsys, "mining_config['strategy']", "allowed: none, random")


def test_a_study_strategy_that_is_a_list_is_one_line_and_exit_2(tmp_path, capsys):
    path = study(tmp_path, STUDY.replace("random: {strategy: random}", "random: {strategy: [random]}"))
    assert compare("--config", path, "--output", tmp_path / "out", "--dry-run") == 2
    one_line_error(capsys, "run random__seed0", "mining_config['strategy']")


# -- item 2: a study name of '.' or '..' --------------------------------------------------------------
@pytest.mark.parametrize("name", [".", ".."])
def test_a_study_named_dot_or_dot_dot_is_refused(tmp_path, capsys, name):
    path = study(tmp_path, STUDY.replace("name: tiny", f"name: '{name}'"))
    assert compare("--config", path, "--dry-run") == 2  # its folder would be results/ or the repository
    one_line_error(capsys, "study key 'name'", "must be a folder name")


def test_a_study_file_whose_stem_is_a_dot_is_refused(tmp_path):
    path = study(tmp_path, STUDY.replace("name: tiny\n", ""), name="..yaml")  # Path('..yaml').stem == '.'
    with pytest.raises(ConfigError, match="must be a folder name"):
        load_study(path)


# -- item 8: `seed:` in a study's base ------------------------------------------------------------------
@pytest.mark.parametrize("line, option", [("seed: 3", "seeds"), ("results_dir: somewhere", "--output")])
def test_keys_the_study_sets_per_run_are_refused_in_its_base(tmp_path, capsys, line, option):
    path = study(tmp_path, STUDY + line + "\n")
    assert compare("--config", path, "--output", tmp_path / "out", "--dry-run") == 2
    one_line_error(capsys, f"'{line.split(':')[0]}'", "set per run by the study", f"'{option}'")
    assert not (tmp_path / "out").exists()


# -- item 8: YAML 1.1 numbers nobody meant, and a repeated merge key --------------------------------------
@pytest.mark.parametrize("value, fragment", [
    ("1:30", "'1:30' reads as the base-60 number 90"),
    ("1:30.5", "'1:30.5' reads as the base-60 number 90.5"),
    ("010", "'010' reads as the octal number 8"),
])
def test_yaml_numbers_in_base_60_or_octal_are_refused(tiny_args, tmp_path, capsys, value, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  steps: {value}\n")
    assert train.main(tiny_args("--config", str(path))) == 2
    one_line_error(capsys, f"{path}:2", fragment, "quote it")


@pytest.mark.parametrize("value, expected", [("'1:30'", "1:30"), ("0", 0), ("10", 10), ("0.5", 0.5), ("-3", -3),
                                             ("0x10", 16), ("1_000", 1000)])
def test_plain_yaml_numbers_and_quoted_text_still_read(tmp_path, value, expected):
    from diffusion_lib.harness.config import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text(f"v: {value}\n")
    assert load_yaml(path) == {"v": expected}


def test_a_repeated_merge_key_is_refused(tiny_args, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  <<: {steps: 5}\n  <<: {steps: 7}\n")  # YAML would keep one, silently
    assert train.main(tiny_args("--config", str(path))) == 2
    one_line_error(capsys, f"{path}:3", "merge key '<<' first given at line 2")


# -- item 6: only verified checkpoints count toward a run's progress -------------------------------------
def test_a_damaged_checkpoint_file_does_not_decide_how_far_a_run_got(tmp_path):
    from diffusion_lib.harness.checkpoint import save_checkpoint
    from diffusion_lib.harness.run_dir import RunDir

    config = build_config({"results_dir": str(tmp_path / "run"), "train.steps": 25})
    run = RunDir(config.results_dir)
    run.prepare(config, overwrite=False)
    save_checkpoint(run.checkpoints, 20, {"weights": [1.0]}, keep=2)
    (run.checkpoints / "step-000000999.pt").write_bytes(b"not a checkpoint")  # a stray, unreadable file
    assert run.reached_step() == 20
    run.check(config, resume=True, overwrite=False)  # 25 >= 20: may resume
    with pytest.raises(ConfigError, match="already reached step 20"):
        run.check(build_config({"results_dir": config.results_dir, "train.steps": 10}), resume=True, overwrite=False)


# -- item 7: advice never points at a command that would delete good results ------------------------------
def test_a_study_run_without_config_names_that_run_not_the_study_wide_overwrite(tmp_path, capsys):
    import json

    out = tmp_path / "out"
    finished = out / "runs" / "none__seed0"
    finished.mkdir(parents=True)
    (finished / "final.json").write_text(json.dumps({"status": "finished", "step": 4}))  # its config.yaml deleted
    for flags in (["--resume"], []):
        assert compare("--config", study(tmp_path), "--output", out, "--dry-run", *flags) == 2
        err = one_line_error(capsys, f"'{finished}'", f"move '{finished}' away to train that run again")
        assert "use --overwrite" not in err and "or --overwrite" not in err
    assert (finished / "final.json").exists()


def test_evaluate_advice_names_the_keys_it_may_change_not_overwrite(tmp_path):
    from diffusion_lib.harness.run_dir import EVALUATION_CHANGES, SAMPLING_KEYS, RunDir

    config = build_config({"results_dir": str(tmp_path / "run"), "train.steps": 25})
    run = RunDir(config.results_dir)
    run.prepare(config, overwrite=False)
    changed = build_config({"results_dir": config.results_dir, "train.lr": 0.1})
    with pytest.raises(ConfigError) as refused:
        run.check(changed, resume=True, overwrite=False, may_change=EVALUATION_CHANGES)
    message = str(refused.value)
    assert "cannot evaluate" in message and "train.lr" in message and "--overwrite" not in message
    assert all(key in message.split("may change only", 1)[1] for key in SAMPLING_KEYS)
    # scoring a saved model trains nothing, so a shorter train.steps is no reason to refuse it
    run.metrics.write_text('{"step": 40}\n')
    (run.root / "final.json").write_text('{"status": "finished", "step": 40}')
    run.check(build_config({"results_dir": config.results_dir, "train.steps": 25}), resume=True, overwrite=False,
              may_change=EVALUATION_CHANGES)
    run.config.unlink()
    with pytest.raises(ConfigError, match="cannot evaluate .*: it has no config.yaml; restore it$"):
        run.check(config, resume=True, overwrite=False, may_change=EVALUATION_CHANGES)


# -- item 8: an output folder that is a symlink loop or a dangling link -----------------------------------
@pytest.mark.parametrize("target, fragment", [("self", "is a symbolic link loop"),
                                              ("missing", "is a symbolic link to 'missing', which does not exist")])
def test_an_output_on_a_broken_symlink_says_so(tmp_path, capsys, target, fragment):
    link = tmp_path / "out"
    link.symlink_to("out" if target == "self" else target)
    assert compare("--config", study(tmp_path), "--output", link) == 1
    one_line_error(capsys, f"cannot write '{link}'", fragment)
    assert train.main(["--results-dir", str(link / "run"), "--device", "cpu", "train.steps=1"]) == 1
    one_line_error(capsys, f"cannot write '{link / 'run'}': '{link}' {fragment}")
    assert link.is_symlink() and not (tmp_path / "missing").exists()


# -- item 3: run folder names longer than the file system allows -----------------------------------------
def test_a_run_folder_name_too_long_for_the_file_system_is_refused_by_the_dry_run(tmp_path, capsys):
    label = "x" * 300
    path = study(tmp_path, STUDY.replace("random: {strategy: random}", f"{label}: {{strategy: random}}"))
    assert compare("--config", path, "--output", tmp_path / "out", "--dry-run") == 2
    one_line_error(capsys, "shorten its strategy label or sweep values", "bytes, longer than the file system allows")
    assert not (tmp_path / "out").exists()


def test_a_study_folder_path_too_long_for_the_file_system_is_refused(tmp_path, capsys):
    deep = tmp_path / "d"
    while len(str(deep)) < 4050:  # every name fits, and the study folder's path; its runs' files do not
        deep /= "d" * min(200, 4050 - len(str(deep)))
    assert compare("--config", study(tmp_path), "--output", deep, "--dry-run") == 2
    one_line_error(capsys, "paths in its folder", "longer than the file system allows")


# -- item 5: memory running out while torch loads or a checkpoint is written -----------------------------
FAIL_TORCH_IMPORT = """
import json
import sys
class NoMemoryForTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise {error}
sys.meta_path.insert(0, NoMemoryForTorch())
sys.argv[1:] = {argv!r}
import train
sys.exit(train.main())
"""


@pytest.mark.parametrize("error", ["MemoryError()",
                                   "ImportError('libtorch_cpu.so: failed to map segment from shared object')"])
def test_memory_running_out_while_torch_loads_is_one_line_and_exit_1(tmp_path, error):
    import subprocess

    argv = ["--results-dir", str(tmp_path / "run"), "--device", "cpu", "train.steps=1"]
    done = subprocess.run([sys.executable, "-c", FAIL_TORCH_IMPORT.format(error=error, argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: out of memory while loading Python modules") and "ulimit -v" in err, err
    assert not (tmp_path / "run").exists()


def test_memory_running_out_while_a_checkpoint_is_written_is_one_line_and_leaves_no_file(tiny_args, tmp_path,
                                                                                         capsys, monkeypatch):
    import torch

    def save_without_memory(obj, buffer, *args, **kwargs):
        buffer.write(b"PK\x03\x04 partial")  # what torch.save had written when the buffer could not grow
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save_without_memory)
    assert train.main(tiny_args("train.save_every=2", "train.steps=2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: out of memory (while writing the checkpoint ") and "step-000000002.pt" in err, err
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # no checkpoint, no temp file


# -- item 8: a study in which every run failed ------------------------------------------------------------
def test_a_study_in_which_every_run_failed_says_so_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    from diffusion_lib.tasks.matrix import InverseTask

    original = InverseTask.sample

    def poisoned(self, *args):
        batch = original(self, *args)
        return batch._replace(x=batch.x * float("nan"))

    monkeypatch.setattr(InverseTask, "sample", poisoned)
    out = tmp_path / "out"
    assert compare("--config", study(tmp_path), "--output", out) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no run of the study finished (failed)"), err
    verdict = (out / "report.md").read_text().split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "**No run finished** (2 failed)" in verdict and "No disagreements" not in verdict
    capsys.readouterr()
    assert compare("--report-only", out) == 1  # rebuilding the report says it again
    assert "no run of the study finished" in capsys.readouterr().err


# -- beyond the issue: a section given a value, not a mapping ---------------------------------------------
@pytest.mark.parametrize("text", ["train: 5\n", "mining: random\n", "task: [inverse, 3]\n"])
def test_a_section_given_a_value_is_named_as_a_section(tmp_path, text):
    from diffusion_lib.harness.config import config_from_file

    path = tmp_path / "c.yaml"
    path.write_text(text)
    section = text.split(":")[0]
    with pytest.raises(ConfigError, match=f"config key '{section}' in .* is a section: give it a mapping of its keys"):
        config_from_file(path)


def test_an_empty_mining_section_is_an_empty_section(tmp_path):
    from diffusion_lib.harness.config import config_from_file

    path = tmp_path / "c.yaml"
    path.write_text("mining:\ntrain:\n")
    assert config_from_file(path).mining["strategy"] == "adversarial"


# -- beyond the issue: the dry run refuses an output the real run cannot make -----------------------------
@pytest.mark.parametrize("output", ["a_file", "a_file/study", "loop", "dangling/study"])
def test_the_dry_run_refuses_an_output_that_cannot_be_made(tmp_path, capsys, output):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("missing")
    for dry in (["--dry-run"], []):
        assert compare("--config", study(tmp_path), "--output", tmp_path / output, *dry) == 1
        one_line_error(capsys, f"cannot write '{tmp_path / output}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dangling", "loop", "tiny.yaml"]


# -- beyond the issue: foreign lines in metrics.jsonl ------------------------------------------------------
def test_metrics_lines_that_are_not_records_are_skipped_and_dropped_on_resume(tmp_path):
    from diffusion_lib.harness.run_dir import RunDir

    run = RunDir(tmp_path)
    good = [{"kind": "train", "step": 2}, {"kind": "val", "step": 4}]
    lines = [json.dumps(good[0]), "junk", "[1]", '"s"', '{"step": "x"}', '{"kind": "val"}', '{"step": true}',
             json.dumps(good[1]), '{"kind": "train", "step": 6}']
    run.metrics.write_text("\n".join(lines) + "\n")
    assert run.read_metrics() == [*good, {"kind": "train", "step": 6}]
    run.truncate_metrics(4)  # a resume from step 4
    assert run.read_metrics() == good and run.metrics.read_text() == "".join(json.dumps(r) + "\n" for r in good)


# -- beyond the issue: a file where the report's plots folder goes -----------------------------------------
def test_a_file_in_place_of_the_plots_folder_is_named_as_such(tmp_path):
    from diffusion_lib.report.markdown import write_report

    (tmp_path / "plots").write_text("x")
    with pytest.raises(NotADirectoryError) as refused:
        write_report(tmp_path, [], title="t")
    assert refused.value.filename == str(tmp_path / "plots")


# -- beyond the issue: an evaluation whose settings are too long for a file name -------------------------
def test_an_evaluation_of_a_long_sweep_gets_a_file_name_the_file_system_takes(tmp_path):
    from diffusion_lib.harness.run_dir import RunDir

    config = build_config({"results_dir": str(tmp_path / "run")})
    run = RunDir(config.results_dir)
    run.prepare(config, overwrite=False)
    sweeps = [list(range(1000 - n, 1000)) for n in (100, 99)]
    names = [run.evaluation_file(build_config({"results_dir": config.results_dir, "eval.inference_steps_sweep": s}), 7)
             for s in sweeps]
    assert all(len(name.name.encode()) <= 255 and name.name.startswith("step-7__settings-") for name in names)
    assert names[0] != names[1]  # each setting keeps its own file
    short = build_config({"results_dir": config.results_dir, "eval.inference_steps_sweep": [0, 3]})
    assert run.evaluation_file(short, 7).name == "step-7__inference_steps_sweep=0-3.json"


@pytest.mark.parametrize("scales", [[100.0], [0.1, 16.5], [0.0]])
def test_a_ranking_sigma_out_of_range_is_refused_in_one_line(scales):
    """README: each sigma > 0 and <= 16 (issue 25: only the list's length was bounded)."""
    with pytest.raises(ConfigError, match=r"eval.ranking_scales.*floats in \(0, 16\]"):
        build_config({"eval.ranking_scales": scales})
    assert build_config({"eval.ranking_scales": [0.01, 16]}).eval.ranking_scales == [0.01, 16.0]


# -- issue 25, item 5: memory running out while scoring a trained run ------------------------------------
@pytest.fixture
def scoring_needs_small_batches(monkeypatch):
    """Final scoring runs out of memory above `largest` problems at once; training steps are named as they go."""
    import torch

    from diffusion_lib.harness.evaluate import Evaluator
    from diffusion_lib.harness.trainer import Trainer1D

    trained, original_scores, original_step = [], Evaluator.final_scores, Trainer1D.train_step

    def final_scores(self, *args, **kwargs):
        if self.eval.batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original_scores(self, *args, **kwargs)

    def train_step(self):
        trained.append(self.runs[0].dir.root.name)
        original_step(self)

    monkeypatch.setattr(Evaluator, "final_scores", final_scores)
    monkeypatch.setattr(Trainer1D, "train_step", train_step)
    return trained


def test_memory_running_out_while_scoring_names_a_resume_that_scores_the_trained_run(
        tiny_args, tmp_path, capsys, scoring_needs_small_batches):
    import shlex

    from diffusion_lib.harness.config import config_from_file

    assert train.main(tiny_args("eval.batch_size=16")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: out of memory while scoring step 30 at eval.batch_size = 16"), err
    command = shlex.split(err.split("; resume with: ", 1)[1])
    run = tmp_path / "run"
    assert command == ["python", "train.py", "--config", str(run / "config.yaml"), "--resume", "eval.batch_size=8"]
    assert not (run / "final.json").exists() and len(scoring_needs_small_batches) == 30
    assert train.main(command[2:]) == 0  # the advice, followed as printed
    assert len(scoring_needs_small_batches) == 30  # scored, not trained again
    assert json.loads((run / "final.json").read_text())["step"] == 30
    assert config_from_file(run / "config.yaml").eval.batch_size == 8  # what it was scored with


def test_a_finished_run_resumed_with_another_scoring_batch_keeps_the_config_it_was_scored_with(tiny_args, tmp_path):
    assert train.main(tiny_args("eval.batch_size=16")) == 0
    run = tmp_path / "run"
    before = [(run / name).read_bytes() for name in ("config.yaml", "final.json")]
    assert train.main(tiny_args("eval.batch_size=4", "--resume")) == 0
    assert [(run / name).read_bytes() for name in ("config.yaml", "final.json")] == before


def test_memory_running_out_while_scoring_one_problem_at_a_time_gives_the_general_advice(tiny_args, capsys,
                                                                                         monkeypatch):
    import torch

    from diffusion_lib.harness.evaluate import Evaluator

    def final_scores(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(Evaluator, "final_scores", final_scores)
    assert train.main(tiny_args("eval.batch_size=1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: out of memory (CUDA out of memory") and "lower model.hidden_dim" in err, err


def test_memory_running_out_while_a_study_scores_names_a_resume_that_keeps_its_runs(
        tmp_path, capsys, scoring_needs_small_batches):
    import shlex

    import yaml

    out = tmp_path / "out"
    assert compare("--config", study(tmp_path), "--output", out) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: out of memory while scoring step 4 at eval.batch_size = 16"), err
    command = shlex.split(err.split("; resume the study with: ", 1)[1])
    assert command[:2] == ["python", comparison.SCRIPT] and command[-2:] == ["eval.batch_size=8", "--resume"]
    assert scoring_needs_small_batches == ["none__seed0"] * 4
    assert compare(*command[2:]) == 0
    assert scoring_needs_small_batches == ["none__seed0"] * 4 + ["random__seed0"] * 4  # none was not trained again
    assert all((out / "runs" / run / "final.json").exists() for run in ("none__seed0", "random__seed0"))
    assert yaml.safe_load((out / "study.yaml").read_text())["overrides"] == {"eval.batch_size": 8}


# -- issue 25, item 7: a study over several tasks ---------------------------------------------------------
TWO_TASKS = """
name: two_tasks
seeds: [0]
strategies: {none: {strategy: none}}
sweep: {task.dataset: [inverse, DATASET]}
model: {hidden_dim: 16}
train: {steps: 2, batch_size: 8}
eval: {num_samples: 8, batch_size: 8}
device: cpu
"""


def test_a_study_over_tasks_that_measure_different_metrics_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    path = study(tmp_path, TWO_TASKS.replace("DATASET", "connectivity"))
    for dry_run in (["--dry-run"], []):
        assert compare("--config", path, "--output", out, *dry_run) == 2
        one_line_error(capsys, "its runs' tasks measure different metrics (inverse: mse; connectivity: graph_accuracy, "
                               "entry_accuracy)", "run one study per task")
        assert not out.exists()


def test_a_study_over_tasks_that_measure_the_same_metric_describes_every_task(tmp_path):
    from diffusion_lib.study.spec import expand

    two = load_study(study(tmp_path, TWO_TASKS.replace("DATASET", "addition")))
    expand(two, tmp_path / "out")
    header = comparison.describe(two)
    assert "Tasks: inverse (rank 20, " in header and "; addition (rank 20, ood False); model mlp" in header, header


# -- issue 25, also worth fixing: keys that depend on each other -----------------------------------------
@pytest.mark.parametrize("layer, fragment", [
    ({"task.dataset": "connectivity", "task.nodes": 12, "task.harder": [15, 12]},
     "task['harder'] = [15, 12] is invalid: each node count must be above task['nodes'] = 12"),
    ({"task.dataset": "connectivity", "task.nodes": 20, "task.harder": [15]},
     "task['harder'] = [15] is invalid: each node count must be above task['nodes'] = 20"),
    ({"task.dataset": "sudoku", "task.givens": [70, 81]}, "task['givens'] = [70, 81] is invalid: must be a list [low, "
                                                          "high] of ints, 0 <= low <= high <= 80 (a puzzle needs a blank"),
    ({"eval.ranking_levels": [0, 9]}, "'eval.ranking_levels' = [0, 9] needs eval.ranking_scales: without scales nothing"),
])
def test_keys_whose_range_depends_on_another_key_are_refused_in_one_line(layer, fragment):
    with pytest.raises(ConfigError) as refusal:
        build_config(layer)
    assert fragment in str(refusal.value) and "\n" not in str(refusal.value), str(refusal.value)


def test_their_neighbouring_values_pass():
    graph = build_config({"task.dataset": "connectivity", "task.nodes": 12, "task.harder": [13, 20]})
    assert graph.task["harder"] == [13, 20]
    assert build_config({"task.dataset": "sudoku", "task.givens": [70, 80]}).task["givens"] == [70, 80]
    assert build_config({"eval.ranking_levels": [0, 9], "eval.ranking_scales": [0.1]}).eval.ranking_levels == [0, 9]


# -- issue 25, also worth fixing: SIGTERM while puzzles are carved; too small an address space --------------
def test_sigterm_while_puzzles_are_carved_is_one_line_and_exit_143(tmp_path):
    import os
    import signal
    import subprocess
    import time

    log = tmp_path / "stderr.txt"
    command = [sys.executable, "train.py", "--dataset", "sudoku", "--device", "cpu", "--results-dir", str(tmp_path / "run"),
               "model.hidden_dim=8", "model.layers=1", "eval.num_samples=5000"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "IRED_CACHE": str(tmp_path / "cache")})
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / ".lock").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)  # the trainer locks the run folder, then carves the held-out sets (~30 s for these)
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    last = log.read_text().strip().splitlines()[-1].split("\r")[-1]
    assert code == 143 and last.startswith("interrupted: SIGTERM: stopped at once, without a checkpoint"), (code, last)


def test_an_address_space_too_small_for_torch_is_one_line_before_torch_loads(tmp_path):
    import resource
    import subprocess

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (550 * 2**20, resource.RLIM_INFINITY))

    out = str(tmp_path / "out")
    for command in (["train.py", "--results-dir", out, "--device", "cpu"], [comparison.SCRIPT, "--output", out]):
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              preexec_fn=limit)
        err = done.stderr.strip()
        assert done.returncode == 1 and len(err.splitlines()) == 1, (command, done.returncode, err)
        assert err == "error: this process may map only 550 MiB (ulimit -v), too little to load torch and train (at " \
                      "least 1024 MiB): raise the limit", err
        assert not (tmp_path / "out").exists()


STOP_DURING_TORCH_IMPORT = """
import sys
from diffusion_lib.harness.cli import Stopped
class StoppedWhileTorchLoads:  # torch's import turns a stop into an error of its own (measured: RuntimeError)
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            try:
                raise Stopped(15)
            except Stopped:
                raise RuntimeError("duplicate registrations for aten.linspace.Tensor_Tensor")
sys.meta_path.insert(0, StoppedWhileTorchLoads())
sys.argv[1:] = {argv!r}
import train
sys.exit(train.main())
"""


def test_sigterm_while_torch_loads_is_one_line_and_exit_143(tmp_path):
    import subprocess

    argv = ["--results-dir", str(tmp_path / "run"), "--device", "cpu", "train.steps=1"]
    done = subprocess.run([sys.executable, "-c", STOP_DURING_TORCH_IMPORT.format(argv=argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 143 and err == "interrupted: SIGTERM: stopped at once, without a checkpoint", err
