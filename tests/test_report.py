"""diffusion_lib.report.markdown on synthetic studies: files written, section order (verdict first), the primary comparison
first, one number format, plots, summary columns, damaged runs, a higher-is-better task, EMA lag and degenerate
studies."""
import csv
import json
import math
import re

import numpy as np
import pytest
from scipy import stats as sps

from diffusion_lib.report.scores import Estimate
from diffusion_lib.report.markdown import fmt, pm, write_report
from diffusion_lib.report.stats import t_power
from diffusion_lib.harness.run_dir import RunRecord
from conftest import ROOT
from diffusion_lib.study.spec import expand, load_study, select
from diffusion_lib.study.cli import describe
from test_analysis import accuracy_study, lag_study, make_metrics, make_run

PLOTS = ("val_mse_vs_step.png", "val_mse_vs_flops.png", "val_mse_vs_seconds.png", "final_mse.png",
         "training_curves.png", "mse_vs_inference_steps.png")  # fmt: skip
SECTIONS = ("## Verdict", "## Yardsticks", "## Final results per group", "## Comparisons at the end of training",
            "## Equal-compute view", "## Mining diagnostics", "## Test-time compute", "## The energy landscape",
            "## Failed, missing and damaged runs", "## Plots")  # fmt: skip
PRIMARY = {"compare": ["adversarial", "random"], "metric": "mse_id"}
ACC_PRIMARY = {"compare": ["adversarial", "random"], "metric": "accuracy_id"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """none / random / adversarial x 3 seeds (adversarial: lower EMA error, higher raw error, 2.7x the FLOPs,
    its seeds' clocks far apart, trained under a higher load), one failed run, one missing and one damaged;
    the report is written once."""
    runs = []
    for s in range(3):
        runs.append(make_run(f"none__seed{s}", "none", s, 1.0, energy=False))
        runs.append(make_run(f"random__seed{s}", "random", s, 0.9, flops_per_step=1.9e9))
        runs.append(make_run(f"adversarial__seed{s}", "adversarial", s, 0.8, flops_per_step=2.7e9, mining=True,
                             seconds_per_step=0.03, t0=20.0 * s, raw=1.6, load=1.8))  # fmt: skip
    failed = {"status": "failed", "error": "non-finite loss or gradient at step 151 (loss=nan)", "step": 150}
    runs.append(RunRecord("random__seed3", "random", {}, 3, failed, make_metrics(1.0, 3, steps=(100,))))
    runs.append(RunRecord("none__seed3", "none", {}, 3, None, make_metrics(1.0, 3, steps=(100, 200))))
    runs.append(RunRecord("adversarial__seed3", "adversarial", {}, 3, [1, 2], []))  # type: ignore[arg-type]
    out = tmp_path_factory.mktemp("report")
    (out / "plots").mkdir()
    (out / "plots" / "mse_vs_inference_steps.png").write_bytes(b"stale")
    write_report(out, runs, title="Mining study", description="Task: inverse, rank 20.", primary=PRIMARY)
    return out, runs, (out / "report.md").read_text()


def section(report, heading):
    start = report.index(heading + "\n")
    following = [report.index(h + "\n") for h in SECTIONS if report.index(h + "\n") > start]
    return report[start:min(following, default=len(report))]


def test_number_format():
    assert fmt(0.020912) == "0.0209" and fmt(0.0015312) == "0.00153" and fmt(0.5) == "0.5"
    assert fmt(0.00015312) == "1.53e-4" and fmt(2e-5) == "2e-5" and fmt(-6.94e-4) == "-6.94e-4"
    assert fmt(1234.5) == "1230" and fmt(12.345) == "12.3" and fmt(9.9996) == "10"
    assert fmt(2.5e15) == "2.5e15" and fmt(0) == "0" and fmt(7.5, signed=True) == "+7.5"
    assert fmt(999_960) == "1e6" and fmt(0.00099996) == "0.001"  # the notation follows the rounded value
    assert fmt(math.nan) == "n/a" and fmt(None) == "n/a" and fmt(math.inf) == "n/a"
    assert pm(Estimate(0.0209, 0.00153, 3)) == "0.0209 ± 0.00153"
    assert pm(Estimate(0.3, math.nan, 1)) == "0.3 ± n/a" and pm(Estimate(math.nan, math.nan, 0)) == "n/a"


def test_files_and_sections_in_order(study):
    out, runs, report = study
    assert report.startswith("# Mining study\n\nTask: inverse, rank 20.\n\n**Runs:** 12 (9 finished, 1 failed, 1 missing, "
                             "1 damaged).\n\n## The answer\n")  # fmt: skip
    contents = report[report.index("**Contents:**"):].splitlines()[0]  # the answer, then the table of contents
    assert contents.startswith("**Contents:** [Verdict](#verdict) · [Yardsticks](#yardsticks)")
    assert report.index("## The answer") < report.index("**Contents:**") < report.index("## Verdict")
    positions = [report.index(h + "\n") for h in SECTIONS]
    assert positions == sorted(positions)

    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run_id"] for r in rows] == [r.run_id for r in runs]
    assert [r["status"] for r in rows][-3:] == ["failed", "missing", "damaged"]
    for column in ("task.rank", "train.steps", "train.batch_size", "train.lr", "model.hidden_dim",
                   "train.budget_flops", "train_flops", "flops_per_step", "pack_size", "mse_id_raw"):  # fmt: skip
        assert column in rows[0], column
    assert rows[0]["task.rank"] == "20" and rows[1]["train_flops"] == "950000000000.0"
    assert rows[-1]["error"] == "final.json holds a JSON list, not an object"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"finished": 9, "failed": 1, "missing": 1, "damaged": 1}
    assert [g["group"] for g in summary["groups"]] == ["none", "random", "adversarial"]
    assert summary["scoring"]["sets"] == ["id", "ood"] and summary["scoring"]["metrics"]["mse"]["higher_is_better"] is False
    assert summary["lead_basis"] == "ema" and not any(g["ema_lagging"] for g in summary["groups"])
    assert summary["comparisons"][0]["primary"] and summary["comparisons"][0]["a"] == "adversarial"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temp files left behind


def test_verdict_states_the_primary_first_then_disagreements(study):
    _, _, report = study
    verdict = section(report, "## Verdict")
    lines = [line for line in verdict.splitlines() if line]
    assert lines[1].startswith("**Primary comparison**") and "adversarial vs random, MSE in-distribution" in lines[1]
    assert "lower MSE is better, so A − B < 0 means adversarial is better" in lines[1]
    # adversarial: EMA error 0.8x random's but raw error 0.8 * 1.6 / (0.9 * 1.2) = 1.185x: the readings disagree
    assert lines[2].startswith("- **EMA and raw disagree**: EMA says better, raw says worse")
    assert lines[3].startswith("- EMA: **better**: A − B = -") and "of random), 95 % CI [" in lines[3]
    assert "paired t, 3 pairs" in lines[3] and "Holm" not in lines[3]  # the primary is not corrected
    assert lines[4].startswith("- raw: **worse**: A − B = +")
    assert lines[5].startswith("**EMA:** no group's EMA view describes lag")  # horizons of 10 steps, EMA not worse
    assert lines[6] == "**Readings disagree** (12 comparisons, 2 patterns; the same question gets different verdicts):"
    # grouped by pattern: the EMA vs raw ones first, each pair once with its sets
    assert lines[7] == ("- EMA better, raw worse — 4: adversarial vs random (MSE in-distribution, ood), adversarial vs "
                        "none (MSE in-distribution, ood).")
    assert lines[8].startswith("- equal steps better, equal FLOPs worse — 8: random vs none (MSE in-distribution, "
                               "ood; EMA and raw), ")
    assert "**Compute:** runs trained for a number of steps" in verdict
    assert "random 1.9×, adversarial 2.7×" in verdict
    assert "**Not converged**" in verdict and "last fifth of training" in verdict
    assert ("in-distribution: every group beats the zeros predictor, the training-mean predictor and the linear map; "
            "no group beats the clamp floor. ood: every group beats the zeros predictor and the training-mean "
            "predictor; no group beats the linear map and the clamp floor.") in verdict
    # the comparison table lists the primary comparison first
    table = section(report, "## Comparisons at the end of training")
    first_row = next(line for line in table.splitlines() if line.startswith("| adversarial"))
    assert first_row.startswith("| adversarial vs random (primary) | strategy | MSE in-distribution, EMA | paired t, 3 pairs |")


def test_the_answer_comes_first_on_one_screen(tmp_path):
    """The answer block: per view the verdict, the interval and what it rules out in % of B, the minimum
    detectable effect, equivalence within a declared margin and the seeds needed, each recomputed here."""
    runs = accuracy_study()
    write_report(tmp_path, runs, title="Boards", primary={**ACC_PRIMARY, "margin": "2%"})
    report = (tmp_path / "report.md").read_text()
    answer = section(report, "## The answer")
    assert len(answer.strip().splitlines()) <= 12
    ema = next(line for line in answer.splitlines() if line.startswith("- EMA:"))
    a = np.array([r.final["accuracy_id"] for r in runs if r.strategy == "adversarial"])
    b = np.array([r.final["accuracy_id"] for r in runs if r.strategy == "random"])
    d = a - b
    se = d.std(ddof=1) / np.sqrt(len(d))
    low, high = d.mean() + np.array([-1, 1]) * sps.t.ppf(0.975, len(d) - 1) * se
    # higher accuracy is better: the largest gain is the interval's top, the largest loss minus its bottom
    if low > 0:
        assert f"rules out any loss of adversarial (its gain lies within {100 * low / b.mean():.3g} %" in ema
    else:
        assert f"rules out a gain of adversarial above {100 * high / b.mean():.3g} %" in ema
    margin = 0.02 * b.mean()
    p_tost = max(sps.t.sf((d.mean() + margin) / se, len(d) - 1), sps.t.cdf((d.mean() - margin) / se, len(d) - 1))
    assert f"within ±2% ({margin:.3g}; two one-sided tests, p = {p_tost:.3g})" in ema
    assert ("not shown equivalent" in ema) == (p_tost >= 0.05)
    n = next(n for n in range(2, 10_000) if t_power(margin, d.std(ddof=1) / np.sqrt(n), n - 1) >= 0.8)
    assert f"seeds needed to detect a difference of 2% at 80 % power: {n} (this study: {len(d)})" in ema


def test_one_number_format_everywhere(study):
    _, _, report = study
    assert not re.search(r"\de[-+]0\d", report)  # never Python's 1.53e-03
    decimals = re.findall(r"\d+\.\d+", report)
    assert decimals and all(len(d.replace(".", "").lstrip("0")) <= 3 for d in decimals), decimals  # 3 significant digits
    assert re.search(r"\| 0\.0\d{3} ± \d", section(report, "## Final results per group"))


def test_budget_tables_count_runs_and_warn(study):
    _, _, report = study
    compute = section(report, "## Equal-compute view")
    # adversarial's seeds started 0, 20 and 40 s apart: at the wall-clock budget only seed 0 had a curve
    assert "Not every run reached the budget (adversarial: 1/3)" in compute
    assert "no verdict: only 1/3 runs of adversarial reached the budget" in compute
    assert "### (a) Matched FLOPs: budget 5e11 training FLOPs" in compute
    assert "an EMA model read mid-training lags its raw model" in compute
    assert "Every finished run reached the budget." in compute  # the FLOP budget
    # the load was 1.0 for none and random, 1.8 for adversarial: 0.8 > 0.5, so no wall-clock verdicts at all
    assert "**No verdicts on this axis:** the machine load varied by 0.8 (> 0.5)" in compute
    assert "| random vs none | strategy | MSE in-distribution, EMA | paired t, 3 pairs |" in compute
    assert "no verdict: the machine load varied by 0.8 (> 0.5) |" in compute
    assert "**Warning:** the load varied by 0.8 (> 0.5) during training" in compute
    assert "| adversarial | 1.8 | 1.8 to 1.8 | 15 | 1 |" in compute


def test_problems_and_plots(study):
    out, _, report = study
    problems = section(report, "## Failed, missing and damaged runs")
    assert "- failed: `random__seed3` (random, seed 3) at step 150: non-finite loss" in problems
    assert "- missing: `none__seed3` (none, seed 3): no final.json (last logged step 200)" in problems
    assert "- damaged: `adversarial__seed3` (adversarial, seed 3): final.json holds a JSON list" in problems
    for name in PLOTS:
        assert (out / "plots" / name).read_bytes().startswith(b"\x89PNG"), name  # the stale file was redrawn
        assert f"(plots/{name})" in report


def test_a_higher_is_better_task_reports_the_higher_group_better(tmp_path):
    """A fake accuracy task (sets 'id' and 'harder'): the words, the plots and the columns follow its final.json;
    nothing says MSE."""
    write_report(tmp_path, accuracy_study(), title="Boards", primary={"compare": ["adversarial", "random"],
                                                                      "metric": "accuracy_id"})  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    verdict = section(report, "## Verdict")
    assert ("adversarial vs random, board accuracy in-distribution at the end of training; higher board accuracy is "
            "better, so A − B > 0 means adversarial is better.") in verdict
    assert "- EMA: **better**: A − B = +0.117 (+19.4 % of random)" in verdict  # 0.11667 / 0.6
    assert "| adversarial vs random | strategy | board accuracy harder, EMA | paired t, 3 pairs |" in report
    assert "| worse |" in section(report, "## Comparisons at the end of training")
    # 'givens_only' 0.1 is below every group: beaten; 'solver' (the exact solver) 10 is above: behind
    assert "in-distribution: every group beats the givens_only; no group beats the coin and the exact solver." in verdict
    assert "mse" not in report.lower()
    for name in ("val_accuracy_vs_step.png", "val_accuracy_vs_flops.png", "val_accuracy_vs_seconds.png",
                 "final_accuracy.png", "accuracy_vs_inference_steps.png"):  # fmt: skip
        assert (tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG") and f"(plots/{name})" in report
    assert not list((tmp_path / "plots").glob("*mse*"))
    with open(tmp_path / "summary.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert "accuracy_harder_raw" in header and not [c for c in header if "mse" in c]


def test_a_lagging_ema_is_said_and_the_raw_view_leads(tmp_path):
    primary = {"compare": ["adversarial", "random"], "metric": "mse_id"}
    write_report(tmp_path, lag_study(1000, 2.2), title="Short", primary=primary)
    verdict = section((tmp_path / "report.md").read_text(), "## Verdict")
    lines = [line for line in verdict.splitlines() if line]
    assert lines[2].startswith("- **The EMA view describes lag, not a model** (random: EMA horizon ~933 steps = 93.3 % "
                               "of training; EMA 2.2× raw on in-distribution, 2.2× raw on ood, worse beyond the seed "
                               "spread; adversarial: ")
    assert lines[3].startswith("- raw: ") and lines[4].startswith("- EMA: ")  # the trustworthy view first
    assert lines[5].startswith("**EMA lag** (rule: ") and "the raw view leads this report" in lines[5]
    assert "The raw view is listed first." in section((tmp_path / "report.md").read_text(), "## Comparisons at the end of training")
    write_report(tmp_path / "long", lag_study(100_000, 1.02), title="Long", primary=primary)
    verdict = section((tmp_path / "long" / "report.md").read_text(), "## Verdict")
    lines = [line for line in verdict.splitlines() if line]
    assert "describes lag, not a model" not in verdict and lines[2].startswith("- EMA: ")
    assert lines[4].startswith("**EMA:** no group's EMA view describes lag")


def test_degenerate_studies_do_not_crash(tmp_path):
    runs = [
        make_run("solo", "adversarial", 0, 0.1, energy=False),  # one seed: CI n/a
        RunRecord("f0", "random", {}, 0, {"status": "failed", "error": "boom | with a pipe", "step": 3}, []),
        make_run("r1", "random", 1, 0.2),  # no seed shared with 'solo'; one value each
        RunRecord("ghost", "none", {}, 0, None, []),  # missing, no metrics
    ]
    for run in runs[::2]:
        run.final["inference_steps_sweep"] = {}
    write_report(tmp_path, runs, title="Edge cases", primary={"compare": ["adversarial", "random"], "metric": "mse_id"})
    report = (tmp_path / "report.md").read_text()
    assert "± n/a" in report and "No run has an inference-steps sweep" in report
    assert "no verdict (needs ≥ 2 seeds shared by both groups or ≥ 2 values per group)" in report
    assert "boom \\| with a pipe" in report and "`ghost`" in report and "no metrics logged" in report
    assert not (tmp_path / "plots" / "mse_vs_inference_steps.png").exists()
    json.loads((tmp_path / "summary.json").read_text())

    write_report(tmp_path / "empty", [], title="Nothing yet")
    assert "0 (0 finished, 0 failed, 0 missing, 0 damaged)" in (tmp_path / "empty" / "report.md").read_text()


def test_description_lists_the_strategies_actually_run(tmp_path):
    study = select(load_study(ROOT / "configs" / "studies" / "matrix_inversion_mining.yaml"), ["random", "adversarial"], [0, 1])
    expand(study, tmp_path)
    text = describe(study)
    # the file's own description names 'none', which this study no longer runs
    assert "no energy supervision (none)" not in text and "it names none, which this study does not run" in text
    assert "Strategies (2): `random: {strategy: random}`; `adversarial: {strategy: adversarial, opt_steps: 2, " \
           "scale_factor: 1.0}`." in text
    assert "Task: inverse (rank 20, ood False, conditioning 0.5, ood_conditioning 0.1); model mlp (dtype float32, " \
           "hidden_dim 512, grad sweep); 100000 steps of batch 2048, lr 0.0001" in text and "seeds 0, 1." in text
    whole = load_study(ROOT / "configs" / "studies" / "matrix_inversion_mining.yaml")
    expand(whole, tmp_path)
    assert describe(whole).startswith("Matrix inversion (rank 20) with energy diffusion, comparing no energy")


def test_groups_level_with_a_yardstick_are_named(tmp_path):
    runs = accuracy_study()
    for run in runs:  # 0.62 lies inside both groups' id CIs (0.6 ± 0.25 and 0.717 ± 0.27)
        run.final["yardsticks"]["id"]["coin"]["accuracy"] = 0.62
    write_report(tmp_path, runs, title="Level")
    verdict = section((tmp_path / "report.md").read_text(), "## Verdict")
    assert "no group beats the coin (random, adversarial level with it)" in verdict


def test_a_yardstick_sentence_names_the_groups_behind_when_some_are_level():
    from diffusion_lib.report.tables import YardstickStanding
    from diffusion_lib.report.markdown import _standing_text

    mixed = YardstickStanding("id", "linear", "raw", ["a", "b", "c", "d"], ["a", "b"], ["c"])
    assert _standing_text(mixed, "the linear map", 4) == "2 of 4 groups (a, b) beat the linear map, c level with, d behind"
    # with none level, "2 of 4 beat" already says the other two are behind
    assert _standing_text(YardstickStanding("id", "linear", "raw", ["a", "b", "c", "d"], ["a", "b"], []),
                          "the linear map", 4) == "2 of 4 groups (a, b) beat the linear map"


def landscape_run(strategy, seed, ranking, energy, random_pick):
    """A finished run with the landscape keys: ranking accuracy `ranking` at sigma_0.1 and level 0 (0.6 at
    level 9, 0.5 at samples), and best-of-4's energy and random picks (MSE), the same on both sets and models."""
    run = make_run(f"{strategy}__seed{seed}", strategy, seed, 1.0)
    table = {"sigma_0.1": {"9": 0.6, "0": ranking}, "samples": {"0": 0.5, "9": 0.5}}
    best = {"1": {"mse": {"energy": random_pick, "random": random_pick, "oracle": random_pick}, "flops_per_answer": 1e6},
            "4": {"mse": {"energy": energy, "random": random_pick, "oracle": energy / 2}, "flops_per_answer": 4.2e6}}
    for name in ("id", "ood"):
        for suffix in ("", "_raw"):
            run.final[f"ranking_{name}{suffix}"] = table
            run.final[f"best_of_{name}{suffix}"] = best
    run.final["sampler_flops_per_answer"] = 1e6
    run.final["inference_steps_sweep_flops"] = {"0": 2e5, "1": 4e5, "2": 6e5, "5": 1e6}
    return run


def test_the_landscape_section_says_per_arm_what_its_energy_does(tmp_path):
    """adversarial ranks true answers at sigma 0.1 clearly above chance and its energy pick beats its random pick
    on every seed; none is a blind verifier and picks no better than at random."""
    runs = []
    for seed, (jitter, gap) in enumerate(((0.0, 0.10), (0.01, 0.11), (0.02, 0.10))):
        runs.append(landscape_run("none", seed, 0.5, 1.0 + jitter, 1.0 + jitter))
        runs.append(landscape_run("adversarial", seed, 0.9 + jitter, 1.0 - gap, 1.0))
    write_report(tmp_path, runs, title="Landscape")
    report = (tmp_path / "report.md").read_text()
    land = report[report.index("## The energy landscape\n"):report.index("## Failed, missing and damaged runs\n")]
    # 2 sets x 2 bases x (2 groups x (2 distances + best-of-4) + 1 pair x 2 distances)
    assert "Holm-adjusted within a family of its own (32 tests)" in land
    # one row per level, in level order; mean of 0.90, 0.91, 0.92 with t(2)'s half width; the tests read level 0
    assert "| adversarial | 0 | 0.91 ± 0.0248 | 0.5 ± 0 |\n| adversarial | 9 | 0.6 ± 0 | 0.5 ± 0 |" in land
    assert "at each diffusion level ranked (0: where the last inner steps descend; the tests read level 0)" in land
    assert "- adversarial, ranking accuracy against chance (0.5): EMA: better at sigma_0.1 (in-distribution, ood); " \
           "no detectable difference elsewhere; raw: better at sigma_0.1" in land
    assert "- none, ranking accuracy against chance (0.5): EMA: no detectable difference; raw: no detectable difference." in land
    # per seed differences 0.40, 0.41, 0.42 from none: t = 0.41 / (0.01 / sqrt 3) = 71, p(2 dof) = 2e-4, x 32 < 0.05
    assert "- adversarial vs none, ranking accuracy (A better: A ranks true answers better): EMA: better at " \
           "sigma_0.1 (in-distribution, ood); no detectable difference elsewhere; raw: better at sigma_0.1" in land
    # gain: the energy pick 0.90, 0.89, 0.90 against the random pick 1.0: 10 %, 11 %, 10 %, mean 10.33 %;
    # room: the oracle (energy / 2) against it: 55 %, 55.5 %, 55 %, mean 55.17 %
    assert "| adversarial | 4 | 0.897 ± 0.0143 | 1 ± 0 | 0.448 ± 0.00717 | +10.3 % | 55.2 % | 4.2e6 |" in land
    assert "- adversarial, energy pick against a random pick: EMA: better at N = 4 (in-distribution, ood)" in land
    assert "- none, energy pick against a random pick: EMA: no detectable difference" in land
    assert (tmp_path / "plots" / "error_vs_answer_flops.png").read_bytes().startswith(b"\x89PNG")
    assert "(plots/error_vs_answer_flops.png)" in report
    with open(tmp_path / "summary.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["ranking_id_sigma_0.1_t0"] == "0.5" and row["ranking_id_sigma_0.1_t9_raw"] == "0.6"
    assert row["best_of_4_mse_id_energy_raw"] == "1.0"
    assert row["best_of_4_flops_per_answer"] == "4200000.0" and row["sampler_flops_per_answer"] == "1000000.0"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["landscape"]["tests"]) == 32


def test_the_landscape_section_names_the_problems_it_was_measured_on(tmp_path):
    runs = [landscape_run(strategy, seed, 0.7, 0.9, 1.0) for strategy in ("none", "adversarial") for seed in range(3)]
    write_report(tmp_path, runs, title="Landscape")
    assert "eval.landscape_samples" not in (tmp_path / "report.md").read_text()  # every problem: nothing to say
    for run in runs:
        run.config.update({"eval.landscape_samples": 128, "eval.num_samples": 512})
    write_report(tmp_path, runs, title="Landscape")
    report = (tmp_path / "report.md").read_text()
    land = report[report.index("## The energy landscape\n"):report.index("## Failed, missing and damaged runs\n")]
    assert "Measured on the first 128 of the 512 problems of each held-out set (eval.landscape_samples); the " \
           "other sections score every problem." in land


def test_a_study_without_landscape_keys_says_so(study):
    _, _, report = study
    assert "No run measured its energy landscape (eval.ranking_scales and eval.best_of were empty)." in report


def test_a_non_finite_score_is_named_and_counted_not_dropped(tmp_path):
    """Issue 25: a NaN in one seed's final.json was dropped silently (the group read 3/3 over a 2-seed mean)."""
    runs = accuracy_study()
    victim = next(r for r in runs if r.strategy == "random" and r.seed == 1)
    victim.final["accuracy_id"] = float("nan")
    write_report(tmp_path, runs, title="Boards", primary=ACC_PRIMARY)
    report = (tmp_path / "report.md").read_text()
    assert "1 non-finite score(s) of finished runs are left out of their groups' means" in report
    problems = section(report, "## Failed, missing and damaged runs")
    assert (f"- non-finite score: `{victim.run_id}` (random, seed 1) finished with accuracy_id = nan; random's mean "
            "of accuracy_id (and every test on it) is over one seed fewer") in problems
    lost = json.loads((tmp_path / "summary.json").read_text())["lost_values"]
    assert [(v["run_id"], v["key"]) for v in lost] == [(victim.run_id, "accuracy_id")]
