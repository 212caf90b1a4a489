import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# a run small enough for seconds on a 2-core CPU: rank 3, hidden 64, batch 64
TINY = [
    "--dataset", "inverse", "--rank", "3", "--batch_size", "64", "--train-steps", "30", "--device", "cpu",
    "model.hidden_dim=64", "train.log_every=5", "train.save_every=10", "eval.every=10",
    "eval.num_samples=64", "eval.batch_size=64",
]


@pytest.fixture
def tiny_args(tmp_path):
    """Arguments for a tiny train.py run writing under tmp_path/run."""
    return lambda *extra: [*TINY, "--results-dir", str(tmp_path / "run"), *extra]


@pytest.fixture
def poison_batch(monkeypatch):
    """poison_batch(n): the n-th training batch drawn from now on (counted over runs) has NaN conditions."""
    from diffusion_lib.tasks.matrix import InverseTask

    def poison(at_call: int) -> None:
        original, calls = InverseTask.sample, {"n": 0}

        def poisoned(self, batch_size, generator):
            calls["n"] += 1
            batch = original(self, batch_size, generator)
            return batch._replace(x=batch.x * float("nan")) if calls["n"] == at_call else batch

        monkeypatch.setattr(InverseTask, "sample", poisoned)

    return poison
