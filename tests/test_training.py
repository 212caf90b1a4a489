"""End-to-end training behaviour on CPU: learning, resume, reproducibility, divergence, checkpoints."""
import json
import math
import signal

import pytest
import torch

import train
from diffusion_lib.harness.run_dir import RunDir
from diffusion_lib.harness.trainer import Trainer1D


def metrics(path):
    return RunDir(path).read_metrics()


def comparable(records):
    """Metric records without wall-clock fields (timings may differ between runs, nothing else may)."""
    return [{k: v for k, v in r.items() if k not in ("sec_per_step", "train_seconds", "loadavg")} for r in records]


@pytest.mark.parametrize("strategy", ["none", "random", "adversarial"])
def test_short_run_learns_inverse_for_each_strategy(tmp_path, strategy):
    args = [
        "--dataset", "inverse", "--rank", "4", "--batch_size", "256", "--train-steps", "300", "--device", "cpu",
        "--mining-strategy", strategy, "--results-dir", str(tmp_path / strategy),
        "model.hidden_dim=128", "train.lr=1e-3", "train.log_every=50", "eval.every=150", "eval.num_samples=256",
    ]
    assert train.main(args) == 0
    final = json.loads((tmp_path / strategy / "final.json").read_text())
    assert final["status"] == "finished" and final["step"] == 300
    # clearly below the all-zeros predictor on the held-out in-distribution set
    assert final["mse_id"] < 0.3 * final["yardsticks"]["id"]["zeros"]["mse"], final
    assert final["mse_ood"] < final["yardsticks"]["ood"]["zeros"]["mse"], final
    records = metrics(tmp_path / strategy)
    assert [r["step"] for r in records if r["kind"] == "val"] == [150, 300]
    train_record = next(r for r in records if r["kind"] == "train")
    assert ("loss_energy" in train_record) == (strategy != "none")
    assert ("accept_rate" in train_record) == (strategy == "adversarial")
    assert (tmp_path / strategy / "config.yaml").exists()
    assert len(list((tmp_path / strategy / "checkpoints").glob("step-*.pt"))) >= 1


# 13: mid-interval, the checkpoint lands between log lines; 30: the last step, before the final scoring
@pytest.mark.parametrize("stop_at", [13, 30])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, tiny_args, monkeypatch, stop_at):
    full = tmp_path / "full"
    assert train.main([*tiny_args(), "--results-dir", str(full)]) == 0
    split = tmp_path / "split"
    original = Trainer1D.train_step

    def stop_during_a_step(self):
        original(self)
        if self.step == stop_at:  # as if SIGINT arrived during this step
            self.stop.on_signal(signal.SIGINT, None)

    monkeypatch.setattr(Trainer1D, "train_step", stop_during_a_step)
    assert train.main([*tiny_args(), "--results-dir", str(split)]) == 128 + signal.SIGINT
    assert (split / "checkpoints" / f"step-{stop_at:09d}.pt").exists() and not (split / "final.json").exists()
    monkeypatch.undo()
    assert train.main([*tiny_args(), "--results-dir", str(split), "--resume"]) == 0
    assert comparable(metrics(split)) == comparable(metrics(full))
    a, b = (json.loads((d / "final.json").read_text()) for d in (full, split))
    for key in ("mse_id", "mse_ood", "mse_id_raw", "loss", "energy_grad_evals", "train_flops"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path, tiny_args):
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert train.main([*tiny_args(), "--results-dir", str(tmp_path / name), "--seed", seed]) == 0
        runs[name] = comparable(metrics(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_checkpoints_keep_the_last_two_and_skip_a_corrupt_newest(tmp_path, tiny_args, capsys):
    assert train.main([*tiny_args(), "--train-steps", "25"]) == 0
    folder = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in folder.glob("step-*.pt"))
    assert names == ["step-000000020.pt", "step-000000025.pt"]
    (folder / "step-000000025.pt").write_bytes(b"truncated")
    capsys.readouterr()
    assert train.main([*tiny_args(), "--train-steps", "25", "--evaluate"]) == 0
    captured = capsys.readouterr()
    assert "step-000000025.pt is unreadable" in captured.err
    assert json.loads((tmp_path / "run" / "evaluations" / "step-20__as_trained.json").read_text())["step"] == 20


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_args, poison_batch, capsys):
    poison_batch(16)  # the 16th batch drawn is step 15's: the FLOP count at the start draws step 0's once more
    assert train.main(tiny_args()) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the progress bar shares stderr
    assert err.startswith("error: ") and "Traceback" not in err
    assert "non-finite loss or gradient at step 15" in err and "loss_denoise=nan" in err
    run = tmp_path / "run"
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "failed" and "step 15" in final["error"]
    assert final["error"].endswith("; last good checkpoint (step 10) kept")
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert checkpoints == ["step-000000010.pt"]
    state = torch.load(run / "checkpoints" / checkpoints[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_divergence_before_the_first_checkpoint_does_not_claim_one_was_kept(tmp_path, tiny_args, poison_batch, capsys):
    poison_batch(5)  # step 4's batch (the FLOP count draws step 0's first); the first checkpoint is step 10's
    assert train.main(tiny_args()) == 1
    err = capsys.readouterr().err
    assert "checkpoint kept" not in err
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["status"] == "failed" and final["error"].startswith("non-finite loss or gradient at step 4 ")
    assert final["error"].endswith("; no checkpoint was saved before it")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_in_process_divergence_returns_a_failed_result(tmp_path):
    config = train.build_config({"results_dir": str(tmp_path / "r"), "train.steps": 3, "train.lr": 1e30,
                                 "model.hidden_dim": 16, "task.rank": 2, "train.batch_size": 8, "device": "cpu"})
    task = train.create_dataset(config)
    trainer = train.create_trainer(config, train.create_diffusion_model(config, task), task)
    [final] = trainer.train()
    assert final["status"] == "failed" and "non-finite" in final["error"]


def test_mining_statistics_average_over_the_steps_that_mined(tmp_path, tiny_args):
    # periodic mining every 4 steps, a log line every 4 steps: one mining step per line. Early in training
    # nearly every descent step lowers the energy, so a rate diluted over all 4 steps (<= 0.25) is wrong.
    assert train.main(tiny_args("--train-steps", "8", "--mining-strategy", "periodic", "mining.every=4",
                                "train.log_every=4")) == 0
    rates = [r["accept_rate"] for r in metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(rates) == 2 and all(rate > 0.5 for rate in rates), rates


@pytest.mark.parametrize("dtype, stored", [("float64", torch.float64), ("bfloat16", torch.float32)])
def test_other_dtypes_train(tmp_path, tiny_args, dtype, stored):
    """float64 computes everything in double; bfloat16 is mixed precision (float32 weights, bf16 autocast)."""
    assert train.main(tiny_args(f"model.dtype={dtype}", "--train-steps", "10")) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["status"] == "finished" and all(math.isfinite(final[k]) for k in ("mse_id", "mse_ood_raw"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000000010.pt", weights_only=True)
    assert {v.dtype for v in state["model"].values()} == {stored}


def test_a_signal_before_the_first_step_leaves_a_checkpoint_that_resumes(tmp_path, tiny_args, monkeypatch):
    """The checkpoint of step 0 holds no Adam moments (Adam makes them on its first step)."""
    original = Trainer1D.measure_flops  # the last thing before the first step

    def signal_first(self):
        original(self)
        self.stop.on_signal(signal.SIGINT, None)

    monkeypatch.setattr(Trainer1D, "measure_flops", signal_first)
    assert train.main(tiny_args()) == 128 + signal.SIGINT
    assert (tmp_path / "run" / "checkpoints" / "step-000000000.pt").exists()
    monkeypatch.undo()
    assert train.main(tiny_args("--resume")) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["step"] == 30


def test_cosine_decay_steps_follow_the_closed_form_and_constant_keeps_lr(tmp_path, tiny_args, monkeypatch):
    seen, original = [], torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    assert train.main([*tiny_args(), "--train-steps", "20", "train.lr=0.002", "train.lr_decay=cosine"]) == 0
    assert seen == pytest.approx([0.001 * (1 + math.cos(math.pi * s / 20)) for s in range(20)])
    seen.clear()
    assert train.main([*tiny_args(), "--train-steps", "20", "train.lr=0.002", "--overwrite"]) == 0
    assert seen == [0.002] * 20
