"""One writer per run folder (class 2 of the robustness issue): a lock, refused in one line naming the
holder, taken over when its holder died."""
import gc
import os
import socket
import subprocess
import sys

import pytest

import train
from conftest import ROOT
from diffusion_lib.harness.config import ConfigError
from diffusion_lib.harness.run_dir import RunDir, RunLocked
from test_study import TINY_STUDY, main as study_main


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# class 2: two writers on one run folder both trained it and wrote every metrics line twice
def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(tiny_args, tmp_path, capsys):
    run = tmp_path / "run"
    with RunDir(run).lock():
        assert train.main(tiny_args("--train-steps", "5")) == 75  # EX_TEMPFAIL (README), not bad input's 2
        err = one_line(capsys)
        assert f"run folder '{run}' is in use by process {os.getpid()}" in err
        assert not RunDir(run).metrics.exists() and not RunDir(run).config.exists()
    assert not run.exists()  # the lock made the folder, and took it away again
    assert train.main(tiny_args("--train-steps", "5")) == 0
    assert not (run / ".lock").exists()  # released when the run ended
    capsys.readouterr()
    with RunDir(run).lock():
        assert train.main(tiny_args("--train-steps", "5", "--evaluate")) == 75
        assert "is in use by process" in one_line(capsys)


# class 2: a lock left by a killed process (SIGKILL: no cleanup at all) is taken over
def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diffusion_lib.harness.run_dir import RunDir; "
         "lock = RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(120)", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"in use by process {holder.pid} on ") as refusal:
            RunDir(run).lock()
        assert not isinstance(refusal.value, ConfigError)  # not "bad input": the same command works later
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # the killed holder could not remove it
    lock = RunDir(run).lock()
    assert (run / ".lock").read_text().split()[0] == str(os.getpid())
    lock.release()


# class 2: a study must not train a run another process is training (a second study, or the orphan of a
# killed one), with either launcher, nor delete it with --overwrite
@pytest.mark.parametrize("extra", [["--resume"], ["--resume", "--launcher", "accelerate"], ["--overwrite"]])
def test_a_study_refuses_a_run_that_another_process_holds(tmp_path, capsys, extra):
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(TINY_STUDY.replace("steps: 24", "steps: 4"))
    out = tmp_path / "study"
    assert study_main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none") == 0
    run = RunDir(out / "runs" / "none__seed0")
    run.final.unlink()  # unfinished, so --resume would train it
    metrics = run.metrics.read_text()
    capsys.readouterr()
    with run.lock():
        assert study_main("--config", study_file, "--output", out, "--seeds", "0", "--strategies", "none", *extra) == 75
        assert f"run folder '{run.root}' is in use by process {os.getpid()}" in one_line(capsys)
    assert run.metrics.read_text() == metrics


# the holder's PID/host line survives a refused contender (filelock opens without truncating), and a lock
# dropped without release() (a trainer built only to time a few steps) is freed with its object
def test_a_refused_contender_leaves_the_holders_line_and_an_abandoned_lock_is_freed(tmp_path):
    run = tmp_path / "run"
    holder = RunDir(run).lock()
    line = (run / ".lock").read_text()
    assert line.split() == [str(os.getpid()), socket.gethostname()]
    for _ in range(2):
        with pytest.raises(RunLocked, match=f"in use by process {os.getpid()} on {socket.gethostname()},"):
            RunDir(run).lock()
        assert (run / ".lock").read_text() == line
    del holder
    gc.collect()
    RunDir(run).lock().release()  # would be refused if the dropped lock still held the folder
    assert not (run / ".lock").exists()


# issue 25: --report-only during a live study called the run being trained "missing"
def test_a_report_calls_a_run_another_process_holds_in_progress_not_missing(tmp_path):
    from diffusion_lib.harness.run_dir import RunRecord
    from diffusion_lib.report.markdown import write_report

    trained, left = RunDir(tmp_path / "runs" / "random__seed0"), RunDir(tmp_path / "runs" / "random__seed1")
    left.root.mkdir(parents=True)
    with trained.lock():
        records = [RunRecord.from_run_dir(d, d.root.name, "random", {}, s) for s, d in enumerate((trained, left))]
        write_report(tmp_path, records, title="live")
    assert [r.status for r in records] == ["in progress", "missing"]
    report = (tmp_path / "report.md").read_text()
    assert "**Runs:** 2 (0 finished, 0 failed, 1 missing, 0 damaged, 1 in progress)." in report
    assert (f"- in progress: `random__seed0` (random, seed 0): no final.json yet: process {os.getpid()} on "
            f"{socket.gethostname()} is training it") in report
    assert RunRecord.from_run_dir(trained, "random__seed0", "random", {}, 0).status == "missing"  # released: no holder
