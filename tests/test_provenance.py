"""Which code made a row: a run records the project's git commit and whether its tracked files were
changed, in config.yaml (a comment), final.json and summary.csv; outside a git checkout, nothing; where git is
missing, that; and the report says when its runs came from different code."""
import csv
import json
import subprocess

import pytest

import train
from diffusion_lib.harness.config import config_from_file
from diffusion_lib.harness.run_dir import RunDir, RunRecord, code_version
from diffusion_lib.report.markdown import write_report


def git(repo, *args):
    done = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git checkout with one commit of one tracked file."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    (root / "code.py").write_text("x = 1\n")
    git(root, "add", "code.py")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_the_commit_and_whether_tracked_files_changed(repo, tmp_path, monkeypatch):
    head = git(repo, "rev-parse", "HEAD")
    assert code_version(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "results.txt").write_text("a run's output\n")  # untracked: not a change to the code
    assert code_version(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "code.py").write_text("x = 2\n")
    assert code_version(repo) == {"git_commit": head, "git_dirty": True}
    git(repo, "commit", "-q", "-am", "second")
    assert code_version(repo) == {"git_commit": git(repo, "rev-parse", "HEAD"), "git_dirty": False} != head

    inside = repo / "unpacked"  # a project unpacked inside another repository is not that repository's code
    inside.mkdir()
    assert code_version(inside) == {}
    empty = tmp_path / "empty"  # a repository without a commit
    empty.mkdir()
    git(empty, "init", "-q")
    assert code_version(empty) == {}
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # git not installed: said so, not "no checkout"
    assert code_version(repo) == {"git_error": "git is not on PATH"}


def _summary_row(run_dir, tmp_path):
    record = RunRecord.from_run_dir(RunDir(run_dir), "run", "none", {}, 0)
    write_report(tmp_path / "study", [record], title="provenance")
    with open(tmp_path / "study" / "summary.csv") as handle:
        return next(csv.DictReader(handle))


def test_a_run_records_its_code_in_config_final_and_summary(repo, tmp_path, tiny_args, monkeypatch):
    (repo / "code.py").write_text("x = 3\n")
    monkeypatch.setattr("diffusion_lib.harness.run_dir.ROOT", repo)
    assert train.main(tiny_args("--train-steps", "5", "train.save_every=5", "eval.every=5")) == 0
    run = RunDir(tmp_path / "run")
    head = git(repo, "rev-parse", "HEAD")
    final = json.loads(run.final.read_text())
    assert (final["git_commit"], final["git_dirty"]) == (head, True)
    first_line = run.config.read_text().splitlines()[0]
    assert first_line == f"# written by the code at git commit {head} with uncommitted changes"
    assert config_from_file(run.config).seed == 0  # a comment: the file still reads as a config
    row = _summary_row(run.root, tmp_path)
    assert (row["git_commit"], row["git_dirty"]) == (head, "True")


def test_outside_a_checkout_nothing_is_recorded(tmp_path, tiny_args, monkeypatch):
    monkeypatch.setattr("diffusion_lib.harness.run_dir.ROOT", tmp_path / "tarball")
    assert train.main(tiny_args("--train-steps", "5", "train.save_every=5", "eval.every=5")) == 0
    run = RunDir(tmp_path / "run")
    final = json.loads(run.final.read_text())
    assert "git_commit" not in final and "git_dirty" not in final
    assert not run.config.read_text().startswith("#")
    row = _summary_row(run.root, tmp_path)
    assert row["git_commit"] == "" and row["git_dirty"] == ""


def test_the_report_says_when_its_runs_came_from_different_code(tmp_path):
    from test_analysis import make_run

    runs = [make_run(f"none__seed{s}", "none", s, 1.0) for s in range(3)]
    write_report(tmp_path / "one", runs, title="one commit")
    assert "**Code:**" not in (tmp_path / "one" / "report.md").read_text()
    runs[1].final.update(git_commit="4567def", git_dirty=True)
    runs[2].final.update(git_commit=None, git_error="git is not on PATH")
    write_report(tmp_path / "three", runs, title="three codes")
    report = (tmp_path / "three" / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("**Code:**"))
    assert "1 by 0123abc; 1 by 4567def with uncommitted changes; 1 by an unknown commit (git is not on PATH)" in line


def test_a_run_made_where_git_is_missing_says_so(repo, tmp_path, tiny_args, monkeypatch):
    monkeypatch.setattr("diffusion_lib.harness.run_dir.ROOT", repo)
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert train.main(tiny_args("--train-steps", "2", "train.save_every=2", "eval.every=2")) == 0
    run = RunDir(tmp_path / "run")
    assert json.loads(run.final.read_text())["git_error"] == "git is not on PATH"
    assert run.config.read_text().splitlines()[0] == "# the code's git commit is unknown: git is not on PATH"
