"""Which code made a run: the project's git commit and whether its tracked files had uncommitted changes."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the project's folder: the checkout whose commit is recorded
GIT_TIMEOUT_S = 5  # a hung git (a network file system, a lock) must not hold up a run


def code_version(root: Path | None = None) -> dict[str, Any]:
    """{"git_commit": <sha>, "git_dirty": <tracked files differ from it>} of the project's checkout, or {}
    where there is none (a tarball, git not installed, a repository git refuses or that has no commit).

    One `git status` call. Only a checkout rooted at the project's folder counts: a project unpacked
    inside some other repository (a home folder under git) is not that repository's code. Untracked
    files do not make the tree dirty: runs write results/ there, which is not code."""
    root = ROOT if root is None else root
    if not (root / ".git").exists():  # a folder (a clone) or a file (a worktree)
        return {}
    try:
        done = subprocess.run(["git", "-C", str(root), "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
                              capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = done.stdout.splitlines()
    commit = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), None)
    if done.returncode != 0 or commit is None or commit == "(initial)":
        return {}
    return {"git_commit": commit, "git_dirty": any(not line.startswith("#") for line in lines)}


def code_comment(code: dict[str, Any]) -> str:
    """A YAML comment line naming the code (config.yaml's first line), or '' where there is no checkout."""
    if not code:
        return ""
    return f"# written by the code at git commit {code['git_commit']}{' with uncommitted changes' if code['git_dirty'] else ''}\n"
