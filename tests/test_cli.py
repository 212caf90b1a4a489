"""Bad input is refused before anything is written: one line on stderr, exit code 2, no traceback; the OS
refusing (a file in the way, a read-only folder, a full disk) is one line too, exit code 1."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

import train
from conftest import ROOT
from diffusion_lib.harness.config import ConfigError, build_config
from diffusion_lib.harness.evaluate import Evaluator
from diffusion_lib.harness.trainer import Trainer1D


def refused(args, capsys, tmp_path):
    code = train.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists(), "a refused run must write nothing"
    return err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["train.stpes=5"], "unknown config key 'train.stpes' in override 'train.stpes=5' (did you mean 'train.steps'?)"),
        (["train.steps=five"], "config key 'train.steps' = 'five' has the wrong type: expected int"),
        (["train.steps=0"], "'train.steps' = 0 is out of range: must be an int in [1, 1000000000]"),
        (["--batch_size", "0"], "'train.batch_size' = 0 is out of range"),
        (["--rank", "0"], "task['rank'] = 0 is invalid: must be an int in [1, 100]"),
        (["--mining-opt-steps", "0"], "mining_config['opt_steps'] = 0 is invalid: must be an int >= 1"),
        (["--mining-scale-factor", "0"], "mining_config['scale_factor'] = 0.0 is invalid: must be a float > 0"),
        (["train.lr=0"], "'train.lr' = 0.0 is out of range: must be a float > 0"),
        (["--mining-strategy", "greedy"], "mining_config['strategy'] = 'greedy' is unknown"),
        (["--dataset", "maze"], "task['dataset'] = 'maze' is unknown; allowed: inverse, addition, lowrank, connectivity, sudoku"),
        (["train.steps"], "override 'train.steps' must look like key=value"),
        (["--supervise-energy-landscape", "False", "--mining-strategy", "adversarial"], "contradicts mining.strategy"),
        (["--resume", "--overwrite"], "exclude each other"),
        (["mining.every=3"], "unknown key 'every' for strategy 'adversarial'"),
    ],
)
def test_bad_values_and_flags(tiny_args, capsys, tmp_path, extra, fragment):
    err = refused(tiny_args(*extra), capsys, tmp_path)
    assert fragment in err


def test_bad_config_files(tiny_args, capsys, tmp_path):
    missing = tmp_path / "missing.yaml"
    assert f"config file '{missing}' not found" in refused(tiny_args("--config", str(missing)), capsys, tmp_path)
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("train:\n  steps: 5\n  batch_size: [1, 2\n")
    assert f"malformed YAML in {malformed}:" in refused(tiny_args("--config", str(malformed)), capsys, tmp_path)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  batchsize: 5\n")
    err = refused(tiny_args("--config", str(unknown)), capsys, tmp_path)
    assert f"unknown config key 'train.batchsize' in {unknown} (did you mean 'train.batch_size'?)" in err
    not_a_map = tmp_path / "list.yaml"
    not_a_map.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in refused(tiny_args("--config", str(not_a_map)), capsys, tmp_path)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "is unreadable" in refused(tiny_args("--config", str(folder)), capsys, tmp_path)


def test_unknown_flag_is_one_line(tiny_args, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args("--bach-size", "3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bach-size" in err


def test_yaml_flags_and_overrides_resolve_in_order(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("task: {rank: 7}\ntrain: {steps: 11, batch_size: 32}\nmining: {strategy: random}\n")
    args = train.build_parser().parse_intermixed_args(["--config", str(config_file), "--rank", "8", "train.batch_size=16"])
    config = train.resolve_config(args)
    assert (config.task["rank"], config.train.steps, config.train.batch_size) == (8, 11, 16)
    assert config.mining["strategy"] == "random" and config.mining["noise_scale"] == 3.0
    reference = train.build_parser().parse_intermixed_args(["--supervise-energy-landscape", "False", "--use-innerloop-opt", "False"])
    config = train.resolve_config(reference)
    assert config.mining["strategy"] == "none" and config.diffusion.inference_steps == 0


def test_existing_run_is_not_overwritten_by_surprise(tiny_args, capsys, tmp_path):
    assert train.main(tiny_args("--train-steps", "5")) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert train.main(tiny_args("--train-steps", "5")) == 2
    assert "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert train.main(tiny_args("--train-steps", "5", "--seed", "3", "--resume")) == 2
    assert "its config differs in seed" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert train.main(tiny_args("--train-steps", "5", "--seed", "3", "--overwrite")) == 0
    assert "seed: 3" in (tmp_path / "run" / "config.yaml").read_text()


def test_process_exit_code_and_single_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--device", "cpu", "--results-dir", str(tmp_path / "run"), "train.steps=-1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config key 'train.steps' = -1 is out of range: must be an int in [1, 1000000000]"
    assert not (tmp_path / "run").exists()


def test_yaml_floats_without_a_dot_and_empty_sections(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  lr: 1e-3\neval:\n")
    config = train.resolve_config(train.build_parser().parse_args(["--config", str(config_file)]))
    assert config.train.lr == 1e-3


def test_a_path_with_an_equals_sign_is_not_an_override(tmp_path, tiny_args):
    folder = tmp_path / "runs" / "adversarial__mining.opt_steps=3__seed0"
    assert train.main([*tiny_args(), "--results-dir", str(folder), "--train-steps", "5", "mining.opt_steps=3"]) == 0
    # the command a run prints to resume it works for such folders
    assert train.main(["--config", str(folder / "config.yaml"), "--resume", "--train-steps", "10"]) == 0
    assert '"step": 10' in (folder / "final.json").read_text()


def test_evaluate_may_change_sampling_and_does_not_touch_metrics(tmp_path, tiny_args):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert train.main(tiny_args("--train-steps", "10", "--evaluate", "diffusion.inference_steps=0",
                                "eval.inference_steps_sweep=[0, 3]")) == 0
    assert train.main(tiny_args("--train-steps", "10", "--evaluate")) == 0
    evaluations = tmp_path / "run" / "evaluations"
    # one file per setting, each recording the settings it sampled with: the first is not overwritten
    assert sorted(p.name for p in evaluations.iterdir()) == [
        "step-10__as_trained.json", "step-10__inference_steps=0__inference_steps_sweep=0-3.json"]
    result = json.loads((evaluations / "step-10__inference_steps=0__inference_steps_sweep=0-3.json").read_text())
    assert result["settings"]["diffusion.inference_steps"] == 0
    assert result["settings"]["eval.inference_steps_sweep"] == [0, 3]
    assert set(result["inference_steps_sweep"]) == {"0", "3"}
    assert result["mse_id"] == result["inference_steps_sweep"]["0"]["mse_id"]  # sampled with 0 inner steps
    as_trained = json.loads((evaluations / "step-10__as_trained.json").read_text())
    assert as_trained["settings"]["diffusion.inference_steps"] == 5 and as_trained["mse_id"] != result["mse_id"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_overwrite_clears_what_the_old_run_left_besides_its_checkpoints(tmp_path, tiny_args):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    assert train.main(tiny_args("--train-steps", "10", "--evaluate")) == 0
    assert (tmp_path / "run" / "evaluations").is_dir()
    assert train.main(tiny_args("--train-steps", "5", "--overwrite")) == 0
    assert not (tmp_path / "run" / "evaluations").exists()  # scores of a model that no longer exists


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_evaluate_refuses_training_keys_even_with_overwrite(tmp_path, tiny_args, capsys, extra):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train.main(tiny_args("--train-steps", "10", "--evaluate", "train.lr=0.1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("train.lr" in err or "--overwrite" in err), err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_help_loads_neither_torch_nor_the_plotting_stack():
    """--help answers in a fraction of a second: the scripts import their heavy modules only when used."""
    probe = ("import runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'accelerate', 'matplotlib', 'scipy') if m in sys.modules), file=sys.stderr)")
    for script in ("train.py", "experiments/matrix_inversion_mining_comparison.py"):
        done = subprocess.run([sys.executable, "-c", probe, str(ROOT / script)], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
        assert done.stderr.strip().splitlines()[-1] == "[]", (script, done.stderr)


# -- config values (class 4 of the robustness issue) ------------------------------------------------------
# class 4: inf/nan passed the range checks; absurd sizes ended in allocator tracebacks
@pytest.mark.parametrize(
    "layer, fragment",
    [  # inf and nan passed every `v > 0` style range check
        ({"train.lr": float("inf")}, "config key 'train.lr' = inf is not a finite number"),
        ({"train.grad_clip": float("inf")}, "config key 'train.grad_clip' = inf is not a finite number"),
        ({"diffusion.inference_step_scale": float("nan")}, "'diffusion.inference_step_scale' = nan is not a finite"),
        ({"train.lr": 10**400}, "config key 'train.lr' = inf is not a finite number"),  # an int beyond any float
        ({"train.adam_betas": [0.9, float("nan")]}, "config key 'train.adam_betas' = nan is not a finite number"),
        ({"mining.noise_scale": float("inf")}, "mining_config['noise_scale'] = inf is invalid: must be a finite"),
        ({"mining.loss_scale": float("inf")}, "mining_config['loss_scale'] = inf is invalid: must be a finite"),
        ({"mining.scale_factor": float("nan")}, "mining_config['scale_factor'] = nan is invalid: must be a finite"),
        ({"mining.noise_scale": 10**400}, "mining_config['noise_scale'] = inf is invalid"),
        # absurd sizes ended in allocator tracebacks or minutes of silence
        ({"model.hidden_dim": 10**9}, "model['hidden_dim'] = 1000000000 is invalid: must be an int in [1, 16384]"),
        ({"task.rank": 5000}, "task['rank'] = 5000 is invalid: must be an int in [1, 100]"),
        ({"train.batch_size": 2**20 + 1}, "'train.batch_size' = 1048577 is out of range: must be an int in [1, 1048576]"),
        ({"train.steps": 10**10}, "must be an int in [1, 1000000000]"),
        ({"eval.num_samples": 10**7}, "'eval.num_samples' = 10000000 is out of range"),
        ({"eval.batch_size": 10**7}, "'eval.batch_size' = 10000000 is out of range"),
        ({"diffusion.timesteps": 1001}, "'diffusion.timesteps' = 1001 is out of range: must be an int in [1, 1000]"),
        ({"diffusion.inference_steps": 1001}, "must be an int in [0, 1000]"),
        ({"eval.inference_steps_sweep": [0, 5000]}, "must be a list of at most 100 ints in [0, 1000]"),
        ({"eval.inference_steps_sweep": list(range(101))}, "must be a list of at most 100 ints"),
        ({"mining.opt_steps": 1001}, "mining_config['opt_steps'] = 1001 is invalid: must be an int >= 1, at most 1000"),
    ],
)
def test_non_finite_floats_and_absurd_sizes_are_refused(layer, fragment):
    with pytest.raises(ConfigError) as refusal:
        build_config(layer)
    assert fragment in str(refusal.value) and "\n" not in str(refusal.value)


# class 4: the same, end to end: refused in one line before anything is written
@pytest.mark.parametrize("extra", [["train.lr=inf"], ["mining.noise_scale=.inf"], ["--mining-scale-factor", "nan"],
                                   ["--rank", "5000"], ["model.hidden_dim=1000000000"], ["train.steps=" + "9" * 5000]])
def test_non_finite_and_absurd_values_are_refused_on_the_command_line(tiny_args, capsys, tmp_path, extra):
    refused(tiny_args(*extra), capsys, tmp_path)


# class 4: a key given twice was accepted, the last one winning silently
def test_a_key_given_twice_in_a_yaml_file_is_refused(tiny_args, capsys, tmp_path):
    config_file = tmp_path / "twice.yaml"
    config_file.write_text("train:\n  steps: 5\n  lr: 1.0e-3\n  steps: 50\n")
    err = refused(tiny_args("--config", str(config_file)), capsys, tmp_path)
    assert f"duplicate key in {config_file}:4: key 'steps' first set at line 2" in err
    config_file.write_text("train: {steps: 5}\nmodel: {hidden_dim: 8}\ntrain: {lr: 0.1}\n")
    assert f"duplicate key in {config_file}:3: key 'train' first set at line 1" in refused(
        tiny_args("--config", str(config_file)), capsys, tmp_path)


# class 4: --config '' was ignored, a named pipe hung, a huge file was read whole
def test_config_files_that_are_empty_paths_pipes_devices_or_huge_are_refused(tiny_args, capsys, tmp_path):
    assert "config file '' is an empty path" in refused(tiny_args("--config", ""), capsys, tmp_path)
    pipe = tmp_path / "pipe.yaml"
    os.mkfifo(pipe)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a named pipe as a config hung"))
    signal.alarm(30)
    try:
        err = refused(tiny_args("--config", str(pipe)), capsys, tmp_path)
    finally:
        signal.alarm(0)
    assert f"config file '{pipe}' is unreadable: it is a named pipe, not a regular file" in err
    huge = tmp_path / "huge.yaml"
    huge.write_text(("# " + "x" * 1000 + "\n") * 1100)  # valid YAML (comments), but 1.1 MB
    assert f"config file '{huge}' is larger than 1 MiB" in refused(tiny_args("--config", str(huge)), capsys, tmp_path)
    bigint = tmp_path / "bigint.yaml"
    bigint.write_text("train: {steps: " + "9" * 5000 + "}\n")  # more digits than Python converts
    assert f"malformed YAML in {bigint}: Exceeds the limit" in refused(tiny_args("--config", str(bigint)), capsys, tmp_path)
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: {steps: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert f"malformed YAML in {deep}: nested too deeply" in refused(tiny_args("--config", str(deep)), capsys, tmp_path)


# class 4: /dev/zero as a config was read until memory ran out
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_as_config_is_refused_without_reading_it(tiny_args, capsys, tmp_path):
    err = refused(tiny_args("--config", "/dev/zero"), capsys, tmp_path)
    assert "config file '/dev/zero' is unreadable: it is a device, not a regular file" in err


# -- when the OS says no (class 5) -------------------------------------------------------------------------
@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): creating or writing any file or folder under `folder` fails with EROFS."""
    real_open, real_mkdir = os.open, os.mkdir

    def make(folder):
        def refuse(path):
            if os.path.abspath(os.fspath(path)).startswith(str(folder)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

        def fake_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            refuse(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)

    return make


def failed_with_os_error(code, capsys):
    """Exit code 1 and one error line (after any progress bar) naming the path and the OS's reason."""
    assert code == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert "Traceback" not in captured.err, captured.err
    return captured.out, last


# class 5: a results dir that is a file ended in a traceback
def test_a_results_dir_that_is_a_file_is_one_line(tiny_args, capsys, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    _, err = failed_with_os_error(train.main(tiny_args()), capsys)
    assert err == f"error: cannot write '{blocker}': Not a directory"
    assert blocker.read_text() == "not a folder"


# class 5: a read-only results dir ended in a traceback
def test_a_read_only_results_dir_is_one_line(tiny_args, capsys, tmp_path, read_only):
    read_only(tmp_path / "run")
    _, err = failed_with_os_error(train.main(tiny_args()), capsys)
    assert err.startswith(f"error: cannot write '{tmp_path / 'run'}") and err.endswith(": Read-only file system")


# class 5: a full disk ended in a zip-writer traceback that never named the file
def test_a_full_disk_mid_run_is_one_line_and_loses_nothing_saved(tiny_args, capsys, tmp_path, monkeypatch):
    real_fsync = os.fsync

    def disk_full_for_step_20(fd):
        if ".step-000000020.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_for_step_20)
    run = tmp_path / "run"
    _, err = failed_with_os_error(train.main(tiny_args()), capsys)
    assert err == f"error: cannot write '{run / 'checkpoints' / 'step-000000020.pt'}': No space left on device"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000010.pt"]
    assert not [p for p in run.rglob("*.tmp")] and not (run / ".lock").exists()
    monkeypatch.undo()
    assert train.main(tiny_args("--resume")) == 0
    assert json.loads((run / "final.json").read_text())["step"] == 30


# class 5: a full disk mid-append left a torn line that the next append glued onto
def test_a_failed_metrics_append_leaves_no_torn_line(tmp_path, monkeypatch):
    from diffusion_lib.harness.run_dir import RunDir

    run = RunDir(tmp_path)
    run.append_metrics({"kind": "train", "step": 1})
    real_write = os.write

    def half_then_disk_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_disk_full)
    with pytest.raises(OSError, match="No space left on device") as failure:
        run.append_metrics({"kind": "train", "step": 2})
    assert failure.value.filename == str(run.metrics)
    monkeypatch.undo()
    run.append_metrics({"kind": "train", "step": 3})
    assert [r["step"] for r in run.read_metrics()] == [1, 3]


# class 5: --evaluate on a read-only run computed its result, then lost it
def test_evaluate_on_a_read_only_run_prints_its_result_before_failing_to_save_it(tiny_args, capsys, tmp_path, read_only):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    capsys.readouterr()
    read_only(tmp_path / "run")
    out, err = failed_with_os_error(train.main(tiny_args("--train-steps", "10", "--evaluate")), capsys)
    assert err.startswith(f"error: cannot write '{tmp_path / 'run' / 'evaluations'}") and err.endswith("Read-only file system")
    result = json.loads(out[out.index("{"):])
    assert result["step"] == 10 and result["mse_id"] > 0


# -- smaller things (class 7) ----------------------------------------------------------------------------
# class 7: the printed resume command broke on paths with spaces or quotes
def test_the_printed_resume_command_is_shell_quoted(tmp_path, tiny_args, capsys, monkeypatch):
    folder = tmp_path / "my runs" / "it's here"
    original = Trainer1D.train_step

    def stop_at_step_12(self):
        original(self)
        if self.step == 12:
            self.stop.on_signal(signal.SIGINT, None)

    monkeypatch.setattr(Trainer1D, "train_step", stop_at_step_12)
    assert train.main([*tiny_args(), "--results-dir", str(folder)]) == 130
    monkeypatch.undo()
    command = capsys.readouterr().err.strip().splitlines()[-1].split("resume with: ", 1)[1]
    words = shlex.split(command)
    assert words[:3] == ["python", "train.py", "--config"] and words[4:] == ["--resume"]
    assert train.main(words[2:]) == 0
    assert json.loads((folder / "final.json").read_text())["step"] == 30


# class 7: a second Ctrl-C, or one while scoring, ended in a traceback and exit code 1
@pytest.mark.parametrize("where", ["second Ctrl-C", "Ctrl-C while scoring"])
def test_an_interrupt_that_stops_at_once_is_one_line_and_exit_130(tmp_path, tiny_args, capsys, monkeypatch, where):
    if where == "second Ctrl-C":
        original = Trainer1D.train_step

        def two_signals(self):
            original(self)
            if self.step == 12:
                self.stop.on_signal(signal.SIGINT, None)
                self.stop.on_signal(signal.SIGINT, None)

        monkeypatch.setattr(Trainer1D, "train_step", two_signals)
    else:
        def interrupted(self, *args, **kwargs):  # the final scoring (validation passes call `scores`)
            raise KeyboardInterrupt

        monkeypatch.setattr(Evaluator, "final_scores", interrupted)
    try:
        code = train.main(tiny_args())
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train.main")
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped at once, without a checkpoint; resume with: python train.py")


# class 7: --resume with fewer steps said "finished" and rewrote config.yaml
def test_resume_with_fewer_steps_than_the_run_reached_is_refused(tmp_path, tiny_args, capsys):
    assert train.main(tiny_args("--train-steps", "20")) == 0
    run = tmp_path / "run"
    before = {name: (run / name).read_text() for name in ("config.yaml", "final.json", "metrics.jsonl")}
    capsys.readouterr()
    assert train.main(tiny_args("--train-steps", "15", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot resume '{run}' with train.steps = 15: the run already reached step 20; "
                   "pass train.steps >= 20, or --overwrite to start over")
    assert {name: (run / name).read_text() for name in before} == before


# class 7: temp files of atomic writes killed midway were left for good
def test_temp_files_of_killed_writes_are_removed_by_the_next_owner(tiny_args, tmp_path):
    assert train.main(tiny_args("--train-steps", "10")) == 0
    run = tmp_path / "run"
    stale = [run / ".final.json.ab3_x9yz.tmp", run / "checkpoints" / ".step-000000010.pt.q1w2e3r4.tmp"]
    kept = [run / "notes.tmp", run / ".hidden.tmp", run / "checkpoints" / "step-000000010.pt.bak"]
    for path in stale + kept:
        path.write_text("x")
    assert train.main(tiny_args("--train-steps", "10", "--resume")) == 0
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
