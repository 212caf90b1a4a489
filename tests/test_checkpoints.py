"""Checkpoints (class 1 of the robustness issue): checksummed, verified on load, retention counts only
checkpoints that verify, and a full disk is reported by path without losing the older checkpoints."""
import errno
import json
import os

import pytest
import torch

import train
from diffusion_lib.harness.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint

WEIGHTS = torch.arange(4096, dtype=torch.float32)


def state(step):
    return {"weights": WEIGHTS + step}


def flip_bytes(path, count=64):
    """Invert `count` bytes in the middle of the checkpoint's tensor data (as a failing disk might)."""
    data = bytearray(path.read_bytes())
    start = data.find((WEIGHTS[1000:1010] + int(path.stem.split("-")[1])).numpy().tobytes())
    assert start > 0, "tensor data not found in the file"
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# class 1: a checkpoint with flipped bytes used to load silently and change results
def test_flipped_bytes_are_detected_and_the_previous_checkpoint_is_used(tmp_path, capsys):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    flip_bytes(tmp_path / "step-000000020.pt")
    loaded = load_latest_checkpoint(tmp_path, required=("weights",))
    assert loaded["step"] == 10 and torch.equal(loaded["weights"], WEIGHTS + 10)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-000000020.pt is unreadable" in err[0], err


# class 1: retention counted unreadable checkpoints as kept, so each new one was deleted right after writing
def test_retention_keeps_the_newest_checkpoints_that_verify(tmp_path):
    for step in (10, 20, 40, 50):
        save_checkpoint(tmp_path, step, state(step), keep=5)
    for step in (20, 40, 50):
        flip_bytes(tmp_path / f"step-{step:09d}.pt")
    # as after resuming from step 10: the damaged newer ones do not push the new checkpoint out
    save_checkpoint(tmp_path, 30, state(30), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000030.pt", "step-000000010.pt"]
    save_checkpoint(tmp_path, 35, state(35), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000035.pt", "step-000000030.pt"]
    assert load_latest_checkpoint(tmp_path)["step"] == 35


# class 1 / class 5: a full disk surfaced as a zip-writer error that never named the file
def test_a_full_disk_names_the_checkpoint_and_keeps_the_older_ones(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, state(10), keep=2)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as failure:
        save_checkpoint(tmp_path, 20, state(20), keep=1)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(tmp_path / "step-000000020.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000010.pt"]  # no temp file, old one kept
    assert load_latest_checkpoint(tmp_path)["step"] == 10


# class 1: an archive without our checksum (not written by save_checkpoint) is skipped, saying so in one line
def test_a_checkpoint_without_checksum_is_skipped(tmp_path, capsys):
    save_checkpoint(tmp_path, 6, state(6), keep=2)
    torch.save({"step": 7, **state(7)}, tmp_path / "step-000000007.pt")
    assert load_latest_checkpoint(tmp_path)["step"] == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-000000007.pt is unreadable (CheckpointDamaged: no checksum" in err[0]
    # and the checksummed format is still a plain torch.save archive
    save_checkpoint(tmp_path, 8, state(8), keep=2)
    assert torch.equal(torch.load(tmp_path / "step-000000008.pt", weights_only=True)["weights"], WEIGHTS + 8)


# class 1, end to end: a run whose newest checkpoint is damaged resumes from the previous one and finishes
# with checkpoints that verify
def test_a_run_resumes_past_a_damaged_checkpoint(tiny_args, tmp_path, capsys):
    assert train.main(tiny_args("--train-steps", "20")) == 0
    folder = tmp_path / "run" / "checkpoints"
    data = bytearray((folder / "step-000000020.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (folder / "step-000000020.pt").write_bytes(bytes(data))
    capsys.readouterr()
    assert train.main(tiny_args("--train-steps", "30", "--resume")) == 0
    assert "step-000000020.pt is unreadable" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "final.json").read_text())["step"] == 30
    assert [p.name for p in list_checkpoints(folder)] == ["step-000000030.pt", "step-000000020.pt"]
    assert load_latest_checkpoint(folder)["step"] == 30


def test_a_checkpoint_the_os_cannot_read_is_not_taken_for_damaged(tiny_args, tmp_path, capsys, monkeypatch):
    """A read error (permissions, EIO, a stale network mount) says nothing about the file: the resume stops
    in one line, exit 1, instead of starting over and deleting the good checkpoints at the next save."""
    assert train.main(tiny_args("--train-steps", "20")) == 0
    folder = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    real = type(folder).read_bytes

    def refuse_checkpoints(path):
        if path.suffix == ".pt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(type(folder), "read_bytes", refuse_checkpoints)
    capsys.readouterr()
    assert train.main(tiny_args("--train-steps", "30", "--resume")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot ") and "Permission denied" in err[-1], err
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
