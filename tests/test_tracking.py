"""Live dashboards: a tiny run's records read back from its TensorBoard event file."""
import importlib.util

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from diffusion_lib.harness.run_dir import RunDir


def test_tensorboard_gets_the_same_records_as_metrics_jsonl(tmp_path, tiny_args):
    assert train.main(tiny_args("train.log_with=tensorboard", "--train-steps", "10")) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_denoise", "train/accept_rate_step1", "train/accept_rate_step2",
            "train/flops", "val/val_mse_id", "val/val_mse_id_raw", "val/val_mse_ood_raw"} <= tags
    records = RunDir(tmp_path / "run").read_metrics()
    for kind, key in (("train", "loss_denoise"), ("val", "val_mse_ood")):
        logged = [(r["step"], r[key]) for r in records if r["kind"] == kind]
        read = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert [s for s, _ in read] == [s for s, _ in logged]
        assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(read, logged))


def test_a_missing_dashboard_package_is_one_line(tmp_path, tiny_args, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert train.main(tiny_args("train.log_with=wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: train.log_with = 'wandb' needs the wandb package: pip install wandb"
    assert not (tmp_path / "run").exists()


def test_a_dashboard_package_that_fails_to_import_is_one_line_and_leaves_no_folder(tmp_path, tiny_args, capsys,
                                                                                    monkeypatch):
    """Issue 25: an installed but broken package was a traceback after the run folder was written."""
    import sys

    from diffusion_lib.study import cli as study

    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libssl.so.3: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert train.main(tiny_args("train.log_with=wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: train.log_with = 'wandb': the wandb package is installed but fails to import (ImportError: "
                   "libssl.so.3: cannot open shared object file); reinstall it or set train.log_with=none"), err
    assert not (tmp_path / "run").exists()
    study_file = tmp_path / "study.yaml"
    study_file.write_text("seeds: [0]\nstrategies: {none: {strategy: none}}\ndevice: cpu\n")
    assert study.main(["--config", str(study_file), "--output", str(tmp_path / "out"), "train.log_with=wandb"]) == 2
    assert "fails to import" in capsys.readouterr().err and not (tmp_path / "out").exists()
