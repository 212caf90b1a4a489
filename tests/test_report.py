"""diffusion_lib.report on synthetic runs: files written, sections present, verdicts, degenerate studies."""
import csv
import json
import math

import pytest

from diffusion_lib.report import (
    RunRecord,
    group_runs,
    matched_budget,
    pairwise_comparisons,
    summary_columns,
    summary_rows,
    value_at_budget,
    write_report,
)

PLOTS = ("val_mse_vs_step.png", "val_mse_vs_seconds.png", "final_mse.png", "training_curves.png")
STEPS = (100, 200, 300, 400)


def make_metrics(scale, seed, *, steps=STEPS, seconds_per_step=0.01, grads_per_step=1.0, energy=True):
    """Train and val records whose val MSE decays geometrically from `scale` (seeds jitter it by a few %)."""
    records = []
    for step in steps:
        clock = {"grad_evals": step * grads_per_step, "train_seconds": step * seconds_per_step * (1 + 0.01 * seed)}
        train = {"kind": "train", "step": step, "loss": 1.0 / step, "loss_denoise": 0.5 / step}
        train["sec_per_step"] = seconds_per_step
        if energy:
            gap = 2.0 + 0.001 * step
            train.update(loss_energy=0.5 / step, energy_pos=-1.0, energy_neg=gap - 1.0, energy_gap=gap)
        mse = scale * math.exp(-step / 100) * (1 + 0.03 * seed)
        val = {"kind": "val", "step": step, "val_mse_id": mse, "val_mse_ood": 3 * mse}
        records += [{**train, **clock}, {**val, **clock}]
    return records


def make_run(run_id, strategy, seed, scale, *, sweep=None, seconds_per_step=0.01, grads_per_step=1.0, energy=True):
    metrics = make_metrics(scale, seed, seconds_per_step=seconds_per_step, grads_per_step=grads_per_step, energy=energy)
    last = metrics[-1]
    final = {
        "status": "finished",
        "step": last["step"],
        "mse_id": last["val_mse_id"],
        "mse_ood": last["val_mse_ood"],
        "mse_id_raw": 1.2 * last["val_mse_id"],
        "mse_ood_raw": 1.2 * last["val_mse_ood"],
        "zeros_mse_id": 1.0,
        "zeros_mse_ood": 4.0,
        "loss": 0.01,
        "loss_denoise": 0.005,
        "inference_steps_sweep": {
            str(k): {"mse_id": last["val_mse_id"] / k, "mse_ood": last["val_mse_ood"] / k} for k in (1, 2, 5)
        },
        "grad_evals": last["grad_evals"],
        "num_processes": 1,
        "train_seconds": last["train_seconds"],
        "steps_per_second": last["step"] / last["train_seconds"],
    }
    return RunRecord(run_id, strategy, sweep or {}, seed, final, metrics)


def failed_run(run_id, strategy, seed, error):
    metrics = make_metrics(1.0, seed, steps=(100,))
    final = {"status": "failed", "error": error, "step": 150, "grad_evals": 450.0}
    final.update(train_seconds=1.5, steps_per_second=100.0)
    return RunRecord(run_id, strategy, {}, seed, final, metrics)


@pytest.fixture
def study():
    """random × 2 seeds, adversarial × 2 seeds (3x the gradient cost, 10x lower error), one failed, one missing."""
    return [
        make_run("random-s0", "random", 0, 1.0),
        make_run("random-s1", "random", 1, 1.0),
        make_run("adversarial-s0", "adversarial", 0, 0.1, seconds_per_step=0.02, grads_per_step=3.0),
        make_run("adversarial-s1", "adversarial", 1, 0.1, seconds_per_step=0.02, grads_per_step=3.0),
        failed_run("adversarial-s2", "adversarial", 2, "non-finite loss or gradient at step 151 (loss=nan)"),
        RunRecord("random-s2", "random", {}, 2, None, make_metrics(1.0, 2, steps=(100, 200))),
    ]


def test_write_report_writes_every_file(tmp_path, study):
    write_report(tmp_path, study, title="Mining study", description="Task: inverse, rank 20.")

    with open(tmp_path / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run_id"] for r in rows] == [r.run_id for r in study]
    assert [r["status"] for r in rows] == ["finished"] * 4 + ["failed", "missing"]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == {"finished": 4, "failed": 1, "missing": 1}
    assert [r["run_id"] for r in summary["rows"]] == [r.run_id for r in study]
    assert [g["group"] for g in summary["groups"]] == ["random", "adversarial"]

    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Mining study")
    assert "Task: inverse, rank 20." in report
    assert "6 (4 finished, 1 failed, 1 missing)" in report
    assert "predicting all zeros gives in-dist MSE 1" in report
    for heading in ("## Final results per group", "## Pairwise comparisons", "## Equal-compute view",
                    "## Test-time compute", "## Failed and missing runs", "## Plots"):  # fmt: skip
        assert heading in report
    assert "| random |" in report and "| adversarial |" in report
    assert "**adversarial vs random** (differ in strategy): in-dist better" in report
    assert "adversarial-s2" in report and "non-finite loss or gradient at step 151" in report
    assert "`random-s2`" in report and "last logged step 200" in report
    assert "Matched wall-clock" in report and "Matched energy-gradient evaluations" in report
    assert "5 inner steps" in report

    for name in (*PLOTS, "mse_vs_inference_steps.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG"), name
        assert f"(plots/{name})" in report
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temp files left behind


def test_summary_rows_have_sweep_columns_and_statuses(study):
    runs = [make_run("a", "adversarial", 0, 0.1, sweep={"mining.opt_steps": 5}), *study[:1], study[-1]]
    rows = summary_rows(runs)
    assert rows[0]["group"] == "adversarial · mining.opt_steps=5"
    assert rows[0]["mining.opt_steps"] == 5 and rows[1]["mining.opt_steps"] is None
    assert rows[2]["status"] == "missing" and rows[2]["mse_id"] is None and rows[2]["steps"] is None
    assert rows[1]["steps"] == 400 and rows[1]["error"] is None
    assert list(rows[0]) == list(rows[2]) == summary_columns(runs)  # the same columns on every row


def test_clearly_better_group_gets_better_verdict(study):
    comparisons = pairwise_comparisons(study)
    assert [(c.a, c.b, c.factor, c.metric) for c in comparisons] == [
        ("adversarial", "random", "strategy", "mse_id"),
        ("adversarial", "random", "strategy", "mse_ood"),
    ]
    assert all(c.verdict == "better" and c.result.diff < 0 for c in comparisons)
    reversed_study = [*study[2:4], *study[:2]]  # now random comes later: random vs adversarial is worse
    assert {c.verdict for c in pairwise_comparisons(reversed_study)} == {"worse"}


def test_only_one_factor_pairs_are_compared():
    runs = [
        make_run("none", "none", 0, 1.0, sweep={"mining.opt_steps": 2}),
        make_run("random", "random", 0, 1.0, sweep={"mining.opt_steps": 2}),
        make_run("adv2", "adversarial", 0, 1.0, sweep={"mining.opt_steps": 2}),
        make_run("adv5", "adversarial", 0, 1.0, sweep={"mining.opt_steps": 5}),
    ]
    pairs = list(dict.fromkeys((c.a, c.b, c.factor) for c in pairwise_comparisons(runs)))
    o2, o5 = " · mining.opt_steps=2", " · mining.opt_steps=5"
    # later group vs earlier group, in group order; none/random vs opt_steps=5 differ in two factors
    assert pairs == [
        ("random" + o2, "none" + o2, "strategy"),
        ("adversarial" + o2, "none" + o2, "strategy"),
        ("adversarial" + o2, "random" + o2, "strategy"),
        ("adversarial" + o5, "adversarial" + o2, "mining.opt_steps"),
    ]


def test_matched_budgets(study):
    groups = group_runs(study)
    # random seeds end at 400 steps * 0.01 s * (1, 1.01) = 4.00 s and 4.04 s; adversarial twice that:
    # the budget is the earliest finish, so every finished run reaches it
    assert matched_budget(groups, "train_seconds") == pytest.approx(4.00)
    assert matched_budget(groups, "grad_evals") == pytest.approx(400.0)
    # adversarial at 400 gradient evaluations = step 400/3, between the val points at steps 100 and 200:
    # log-linear read of 0.1 * exp(-step / 100) is exact for this exponential curve
    adversarial = study[2]
    assert value_at_budget(adversarial, "grad_evals", "mse_id", 400.0) == pytest.approx(0.1 * math.exp(-4 / 3))
    assert all(value_at_budget(run, "train_seconds", "mse_id", 4.00) > 0 for run in study if run.finished)
    # no extrapolation: a budget beyond the end of a curve is not reached
    assert math.isnan(value_at_budget(study[0], "train_seconds", "mse_id", 4.02))


def test_degenerate_studies_do_not_crash(tmp_path):
    runs = [
        make_run("solo", "adversarial", 0, 0.1, energy=False),  # one seed: CI n/a
        failed_run("f0", "random", 0, "boom | with a pipe"),  # a group with every run failed
        failed_run("f1", "random", 1, "boom again"),
        RunRecord("ghost", "none", {}, 0, None, []),  # missing, no metrics
    ]
    runs[0].final["inference_steps_sweep"] = {}
    write_report(tmp_path, runs, title="Edge cases")
    report = (tmp_path / "report.md").read_text()
    assert "± n/a" in report
    assert "needs ≥ 2 finished runs per group" in report
    assert "No run has an inference-steps sweep" in report
    assert "boom \\| with a pipe" in report and "`ghost`" in report and "no metrics logged" in report
    for name in PLOTS:
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "plots" / "mse_vs_inference_steps.png").exists()
    json.loads((tmp_path / "summary.json").read_text())

    write_report(tmp_path / "empty", [], title="Nothing yet")
    assert "0 (0 finished, 0 failed, 0 missing)" in (tmp_path / "empty" / "report.md").read_text()
