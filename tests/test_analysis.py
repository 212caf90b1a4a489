"""diffusion_lib.report on synthetic runs: pairing, primary + Holm, disagreements, budgets, load, convergence,
EMA lag, a higher-is-better task and damaged folders. Expected values are worked out by hand in the comments.

Run folders are written here in the results contract's final.json format (metrics with directions, labels,
sets; scores <metric>_<set>[_raw]; yardsticks[set][name][metric]). The run builders are shared with
test_report.py.
"""
import json
import math

import pytest

from diffusion_lib.report.analysis import analyse
from diffusion_lib.report.comparisons import MIXED_PACKING, NOT_REACHED, UNEVEN_LOAD
from diffusion_lib.report.landscape import gain, room
from diffusion_lib.report.scores import Score
from diffusion_lib.report.tables import ema_horizon, summary_columns, summary_rows
from diffusion_lib.harness.run_dir import RunDir, RunRecord

STEPS = (100, 200, 300, 400, 500)
MSE_TASK = {"metrics": {"mse": "lower"}, "metric_labels": {"mse": "MSE"}, "sets": ["id", "ood"]}
ACCURACY_TASK = {"metrics": {"accuracy": "higher"}, "metric_labels": {"accuracy": "board accuracy"},
                 "sets": ["id", "harder"]}  # fmt: skip
YARDSTICKS = {"id": {"zeros": {"mse": 1.0}, "train_mean": {"mse": 0.9}, "linear": {"mse": 0.05},
                     "clamp_floor": {"mse": 5e-4}},
              "ood": {"zeros": {"mse": 4.0}, "train_mean": {"mse": 3.8}, "linear": {"mse": 0.001},
                      "clamp_floor": {"mse": 2e-4}}}  # fmt: skip
# an EMA that averages ~10 steps (decay 0.9 every step, no warm-up): 2 % of a 500-step run, no lag
SHORT_EMA = {"train.ema_decay": 0.9, "train.ema_every": 1, "train.ema_update_after_step": 0, "train.ema_power": 1.0}


def make_metrics(scale, seed, *, steps=STEPS, seconds_per_step=0.01, t0=0.0, flops_per_step=1e9, load=1.0,
                 raw=1.2, energy=True, mining=False):
    """Train and val lines whose val MSE decays as scale * exp(-step / 100) * (1 + 0.03 * seed)."""
    records = []
    for step in steps:
        clock = {"train_seconds": t0 + step * seconds_per_step * (1 + 0.01 * seed), "energy_grad_evals": float(step),
                 "flops": step * flops_per_step, "loadavg": load}  # fmt: skip
        train = {"kind": "train", "step": step, "loss": 1.0 / step, "loss_denoise": 0.5 / step,
                 "sec_per_step": seconds_per_step}  # fmt: skip
        if energy:
            gap = 2.0 + 0.001 * step
            train.update(loss_energy=0.5 / step, energy_pos=-1.0, energy_neg=gap - 1.0, energy_gap=gap)
        if mining:
            rate = step / 1000 + 0.01 * seed
            train.update(accept_rate=rate, accept_rate_steps=[rate, rate / 2], energy_decrease=0.2)
        mse = scale * math.exp(-step / 100) * (1 + 0.03 * seed)
        val = {"kind": "val", "step": step, "val_mse_id": mse, "val_mse_ood": 3 * mse, "val_mse_id_raw": raw * mse,
               "val_mse_ood_raw": raw * 3 * mse}  # fmt: skip
        records += [{**train, **clock}, {**val, **clock}]
    return records


def make_run(run_id, strategy, seed, scale, *, sweep=None, budget_flops=0.0, pack_size=1, ema=SHORT_EMA, **kwargs):
    """A finished MSE-task run whose final.json matches its last val line."""
    metrics = make_metrics(scale, seed, **kwargs)
    last = metrics[-1]
    final = {
        "status": "finished", "step": last["step"], **MSE_TASK, "mse_id": last["val_mse_id"],
        "mse_ood": last["val_mse_ood"], "mse_id_raw": last["val_mse_id_raw"], "mse_ood_raw": last["val_mse_ood_raw"],
        "yardsticks": YARDSTICKS, "loss": 0.01, "loss_denoise": 0.005,
        "inference_steps_sweep": {str(k): {"mse_id": last["val_mse_id"] / (k + 1), "mse_ood": last["val_mse_ood"] / (k + 1)}
                                  for k in (0, 1, 2, 5)},
        "num_processes": 1, "train_seconds": last["train_seconds"], "steps_per_second": last["step"] / last["train_seconds"],
        "energy_grad_evals": last["energy_grad_evals"], "train_flops": last["flops"],
        "flops_per_step": last["flops"] / last["step"], "budget_flops": budget_flops, "pack_size": pack_size,
        "git_commit": "0123abc", "git_dirty": False,
    }  # fmt: skip
    config = {"task.dataset": "inverse", "task.rank": 20, "train.steps": 500, "train.batch_size": 64, "train.lr": 1e-4,
              "model.hidden_dim": 64, "train.budget_flops": budget_flops, "mining.strategy": strategy, **ema}  # fmt: skip
    return RunRecord(run_id, strategy, sweep or {}, seed, final, metrics, config)


def finals_run(strategy, seed, id_ema, id_raw, ood_ema, ood_raw, **extra):
    """A finished MSE-task run with final errors only (no curves)."""
    final = {"status": "finished", "step": 500, **MSE_TASK, "mse_id": id_ema, "mse_id_raw": id_raw, "mse_ood": ood_ema,
             "mse_ood_raw": ood_raw, **extra}  # fmt: skip
    return RunRecord(f"{strategy}__seed{seed}", strategy, {}, seed, final, [])


def accuracy_run(strategy, seed, id_ema, harder_ema, raw_offset=0.0, config=None):
    """A finished run of a higher-is-better task (board accuracy on sets 'id' and 'harder'), with a
    yardstick below, one inside and one above what a good model scores."""
    sticks = {s: {"givens_only": {"accuracy": 0.1}, "coin": {"accuracy": 2.05}, "solver": {"accuracy": 10.0}}
              for s in ("id", "harder")}  # fmt: skip
    final = {"status": "finished", "step": 500, **ACCURACY_TASK, "accuracy_id": id_ema, "accuracy_harder": harder_ema,
             "accuracy_id_raw": id_ema + raw_offset, "accuracy_harder_raw": harder_ema + raw_offset,
             "yardsticks": sticks, "inference_steps_sweep": {"0": {"accuracy_id": id_ema, "accuracy_harder": harder_ema}}}
    return RunRecord(f"{strategy}__seed{seed}", strategy, {}, seed, final, [], config)


BASE = [1.0, 2.0, 3.0]  # per-seed errors of 'random': a large seed spread, shared with the other group by seed
# per-seed differences and their paired p-values; with 3 pairs (2 dof) p = 1 - t / sqrt(t² + 2):
D_P020 = [0.1, 0.15, 0.1]  # mean 0.11667, sd 0.028868, se 0.016667, t = 7:  p = 1 - 7 / sqrt(51) = 0.019804
D_P057 = [0.1, 0.2, 0.1]  # mean 0.13333, sd 0.057735, se 0.033333, t = 4:  p = 1 - 4 / sqrt(18) = 0.057191
D_P001 = [1.0, 1.1, 1.0]  # mean 1.03333, sd 0.057735, se 0.033333, t = 31: p = 1 - 31 / sqrt(963) = 0.001037
D_NOISE = [0.1, -0.1, 0.05]  # mean 0.01667, sd 0.10408: t = 0.277, p ~ 0.8
P020, P057, P001 = 1 - 7 / math.sqrt(51), 1 - 4 / math.sqrt(18), 1 - 31 / math.sqrt(963)


def pair_study(id_ema, id_raw, ood_ema, ood_raw, sign=-1.0):
    """'random' with errors BASE, then 'adversarial' = BASE + sign * differences, seeds 0..2."""
    runs = [finals_run("random", s, b, b, b, b) for s, b in enumerate(BASE)]
    for s, b in enumerate(BASE):
        runs.append(finals_run("adversarial", s, *(b + sign * d[s] for d in (id_ema, id_raw, ood_ema, ood_raw))))
    return runs


def find(comparisons, set_name, basis, metric="mse"):
    return next(c for c in comparisons if c.score == Score(metric, set_name, basis))


# -- pairing ---------------------------------------------------------------------------------------------
def test_shared_seeds_are_paired():
    a = analyse(pair_study(D_P057, D_P057, D_P057, D_P057))
    c = find(a.comparisons, "id", "ema")
    assert (c.a, c.b, c.factor, c.test, c.n_a, c.n_b, c.unpaired) == ("adversarial", "random", "strategy", "paired", 3, 3, [])
    assert c.diff == pytest.approx(-0.4 / 3) and c.p == pytest.approx(P057)
    # as % of B's mean (2.0): -0.13333 / 2 = -6.667 %
    assert c.effect_pct == pytest.approx(-100 * 0.4 / 3 / 2)
    assert c.mean_a == pytest.approx(2.0 - 0.4 / 3) and c.mean_b == pytest.approx(2.0)


def test_a_missing_partner_is_left_out_of_the_paired_test():
    runs = pair_study(D_P057, D_P057, D_P057, D_P057)
    runs[2] = RunRecord("random__seed2", "random", {}, 2, {"status": "failed", "step": 7, "error": "boom"}, [])
    c = find(analyse(runs).comparisons, "id", "ema")
    # pairs left: seeds 0 and 1, differences -0.1 and -0.2 -> mean -0.15
    assert (c.test, c.n_a, c.n_b, c.unpaired) == ("paired", 2, 2, ["adversarial__seed2"])
    assert c.diff == pytest.approx(-0.15)


def test_fewer_than_two_shared_seeds_falls_back_to_welch_on_every_value():
    runs = pair_study(D_P057, D_P057, D_P057, D_P057)
    for run in runs[:3]:  # random now has seeds 2, 3, 4: only seed 2 is shared
        run.seed += 2
    c = find(analyse(runs).comparisons, "id", "ema")
    assert (c.test, c.n_a, c.n_b, c.unpaired) == ("Welch", 3, 3, [])
    assert c.p > 0.8  # unpaired, the seed spread hides the steady difference


# -- primary comparison and the Holm family --------------------------------------------------------------
def test_without_primary_every_test_is_in_one_holm_family():
    a = analyse(pair_study(D_P020, D_P020, D_P057, D_P057))
    assert a.family_size == 4 and not a.primary_comparisons
    # sorted p: 0.019804 * 4 = 0.079216, 0.019804 * 3 -> raised to 0.079216, 0.057191 * 2 = 0.114382 (twice)
    assert find(a.comparisons, "id", "ema").p_adjusted == pytest.approx(4 * P020)
    assert find(a.comparisons, "id", "raw").p_adjusted == pytest.approx(4 * P020)
    assert find(a.comparisons, "ood", "ema").p_adjusted == pytest.approx(2 * P057)
    assert {c.verdict for c in a.comparisons} == {"no detectable difference"}


def test_primary_comes_first_uncorrected_and_the_rest_are_holm_adjusted():
    primary = {"compare": ["adversarial", "random"], "metric": "mse_id"}
    a = analyse(pair_study(D_P020, D_P020, D_P057, D_P057), primary)
    first = a.comparisons[:2]
    assert [(c.a, c.b, c.score, c.primary) for c in first] == [
        ("adversarial", "random", Score("mse", "id", "ema"), True),
        ("adversarial", "random", Score("mse", "id", "raw"), True),
    ]
    # the primary is tested alone: p = 0.0198 < 0.05 stands, while in the family of four it was 0.079
    assert all(c.p == pytest.approx(P020) and math.isnan(c.p_adjusted) and c.verdict == "better" for c in first)
    # the family is the two ood tests: 0.057191 * 2 = 0.114382
    assert a.family_size == 2
    assert [c.p_adjusted for c in a.comparisons[2:]] == pytest.approx([2 * P057, 2 * P057])
    assert {c.verdict for c in a.comparisons[2:]} == {"no detectable difference"}


def test_primary_is_oriented_as_declared():
    a = analyse(pair_study(D_P020, D_P020, D_P057, D_P057), {"compare": ["random", "adversarial"], "metric": "mse_ood"})
    first = a.comparisons[0]
    assert (first.a, first.b, first.score, first.primary) == ("random", "adversarial", Score("mse", "ood", "ema"), True)
    assert first.diff == pytest.approx(0.4 / 3) and first.verdict == "no detectable difference"  # p = 0.057


def test_a_primary_naming_an_absent_strategy_leaves_every_test_in_the_family():
    a = analyse(pair_study(D_P020, D_P020, D_P057, D_P057), {"compare": ["adversarial", "none"], "metric": "mse_id"})
    assert a.primary.missing == ["none"] and not a.primary_comparisons and a.family_size == 4


def test_a_primary_naming_an_unknown_score_names_the_allowed_ones_and_leaves_every_test_in_the_family():
    a = analyse(pair_study(D_P020, D_P020, D_P057, D_P057), {"compare": ["adversarial", "random"], "metric": "mse_hard"})
    assert a.primary.unknown == ["mse_id", "mse_ood"] and not a.primary_comparisons and a.family_size == 4


def test_ema_and_raw_disagreement_is_found():
    a = analyse(pair_study(D_NOISE, D_P001, D_NOISE, D_NOISE, sign=1.0))
    raw = find(a.comparisons, "id", "raw")
    # family of four: raw in-dist p = 0.001037 is the smallest -> 4 * 0.001037 = 0.00415 < 0.05
    assert raw.p_adjusted == pytest.approx(4 * P001) and raw.verdict == "worse"
    assert find(a.comparisons, "id", "ema").verdict == "no detectable difference"
    assert [(d.a, d.b, d.metric, d.set, d.kind, d.first, d.second) for d in a.disagreements] == [
        ("adversarial", "random", "mse", "id", "model", "no detectable difference", "worse")
    ]


# -- matched budgets -------------------------------------------------------------------------------------
def budget_study(late_start=False):
    """'cheap' at 1e9 FLOPs per step and 'costly' at 3e9, 3 seeds each, steps 100..500."""
    runs = [make_run(f"cheap{s}", "cheap", s, 1.0) for s in range(3)]
    runs += [make_run(f"costly{s}", "costly", s, 0.5, flops_per_step=3e9) for s in range(3)]
    if late_start:  # costly seed 2 logged its first val line at step 200 = 6e11 FLOPs, after the budget
        runs[-1] = make_run("costly2", "costly", 2, 0.5, flops_per_step=3e9, steps=(200, 300, 400, 500))
    return runs


def test_budget_read_off_at_the_smallest_final_flops():
    table = analyse(budget_study()).budgets[0]
    # the cheapest run ends at 500 steps * 1e9 = 5e11 FLOPs; costly reaches that at step 500 / 3 = 166.67,
    # between its val points at steps 100 and 200, where the log-linear read of an exponential is exact
    assert table.axis == "flops" and table.budget == pytest.approx(5e11)
    costly = table.rows[1]
    assert (costly.group, costly.reached, costly.finished) == ("costly", 3, 3)
    expected = [0.5 * math.exp(-5 / 3) * (1 + 0.03 * s) for s in range(3)]
    assert costly.values["mse_id"].mean == pytest.approx(sum(expected) / 3)
    assert costly.values["mse_id_raw"].mean == pytest.approx(1.2 * sum(expected) / 3)
    assert all(c.refused is None for c in table.comparisons)


def test_equal_steps_and_equal_flops_disagreement_is_found():
    a = analyse(budget_study())
    # at 500 steps costly has half of cheap's error (better); at cheap's 5e11 FLOPs it is at step 166.67:
    # 0.5 * exp(-1.667) = 0.094 against cheap's exp(-5) = 0.0067 (worse). Per-seed differences scale with
    # (1 + 0.03 * seed), so each paired t is about 59 (p ~ 3e-4, x 12 tests in the family: still < 0.05)
    found = {(d.a, d.b, d.set, d.kind, d.basis, d.first, d.second) for d in a.disagreements}
    assert found == {("costly", "cheap", s, "compute", b, "better", "worse") for s in ("id", "ood") for b in ("ema", "raw")}
    # the four are one pattern (equal steps better, equal FLOPs worse), all of one pair
    [pattern] = a.patterns
    assert (pattern.kind, pattern.first, pattern.second, len(pattern.cases)) == ("compute", "better", "worse", 4)
    assert list(pattern.pairs()) == [("costly", "cheap")]


def test_the_primary_does_not_disagree_with_itself_through_the_holm_correction():
    """Every run costs the same FLOPs, so the matched-FLOPs read-off tests the very numbers of the end of
    training (paired p = 0.044 in both views): the primary's uncorrected "better" must not be set against
    the Holm-adjusted verdict of the same test as if the views disagreed."""
    scales = [0.90, 0.97, 0.85, 0.99, 0.93]
    runs = [make_run(f"random{s}", "random", s, 1.0) for s in range(5)]
    runs += [make_run(f"adversarial{s}", "adversarial", s, scales[s]) for s in range(5)]
    a = analyse(runs, {"compare": ["adversarial", "random"], "metric": "mse_id"})
    primary = [c for c in a.comparisons if c.primary]
    assert [c.verdict for c in primary] == ["better", "better"] and all(c.p == pytest.approx(0.0444, abs=1e-3) for c in primary)
    assert a.budgets[0].comparisons[0].verdict == "no detectable difference"  # Holm-adjusted there
    assert not [d for d in a.disagreements if d.kind == "compute"], a.disagreements


def test_budget_refuses_a_verdict_unless_every_run_reached_it():
    a = analyse(budget_study(late_start=True))
    table = a.budgets[0]
    assert [(r.group, r.reached, r.finished) for r in table.rows] == [("cheap", 3, 3), ("costly", 2, 3)]
    assert table.comparisons and all(c.verdict == "n/a" for c in table.comparisons)
    assert {c.refused for c in table.comparisons} == {NOT_REACHED}
    # refused tests are not in the Holm family: 4 final tests + 4 wall-clock tests
    assert a.family_size == 8


def test_equal_flops_budget_is_recognised():
    runs = [make_run(f"{s}{i}", s, i, 1.0, budget_flops=5e11) for s in ("none", "random") for i in range(2)]
    a = analyse(runs)
    assert a.equal_flops == 5e11 and all(c.equal_flops == 5e11 for c in a.comparisons)
    runs[0].final["budget_flops"] = 0.0  # one run trained to its step count instead
    assert math.isnan(analyse(runs).equal_flops)


# -- machine load and packing ----------------------------------------------------------------------------
def load_study(load_b, pack_b=1):
    return [make_run(f"{g}{s}", g, s, 1.0, load=load, pack_size=pack)
            for g, load, pack in (("a", 1.0, 1), ("b", load_b, pack_b)) for s in range(2)]  # fmt: skip


def test_steady_load_gives_no_warning():
    a = analyse(load_study(1.3))  # spread 1.3 - 1.0 = 0.3 <= 0.5
    assert a.load.spread == pytest.approx(0.3) and not a.load.load_warning and not a.load.pack_warning
    assert [r.mean for r in a.load.rows] == pytest.approx([1.0, 1.3])
    seconds = a.budgets[1]
    assert seconds.axis == "train_seconds" and seconds.refused is None
    assert all(c.refused is None for c in seconds.comparisons)


def test_varying_load_or_packing_refuses_wall_clock_verdicts():
    a = analyse(load_study(1.8))  # spread 0.8 > 0.5
    assert a.load.load_warning and a.load.spread == pytest.approx(0.8)
    assert a.budgets[1].refused == UNEVEN_LOAD
    assert all(c.verdict == "n/a" and c.refused == UNEVEN_LOAD for c in a.budgets[1].comparisons)
    assert all(c.refused is None for c in a.budgets[0].comparisons)  # FLOPs do not depend on the load
    packed = analyse(load_study(1.0, pack_b=2))
    assert packed.load.pack_warning and not packed.load.load_warning
    assert all(c.refused == MIXED_PACKING for c in packed.budgets[1].comparisons)


# -- convergence -----------------------------------------------------------------------------------------
def curve_run(group, seed, at_400, at_500):
    metrics = [{"kind": "val", "step": step, "val_mse_id": value}
               for step, value in zip(STEPS, (1.0, 0.5, 0.3, at_400, at_500))]  # fmt: skip
    return RunRecord(f"{group}{seed}", group, {}, seed, {"status": "finished", "step": 500, **MSE_TASK, "mse_id": at_500},
                     metrics)


def test_convergence_flag():
    finals = [0.10, 0.11, 0.12]  # standard deviation across seeds: 0.01
    runs = [curve_run("late", s, f + 0.06, f) for s, f in enumerate(finals)]  # drop 0.06 > 0.01
    runs += [curve_run("flat", s, f + 0.001, f) for s, f in enumerate(finals)]  # drop 0.001 < 0.01
    runs.append(curve_run("solo", 0, 0.2, 0.1))  # one seed: no seed noise to compare with
    groups = {g.group: g.convergence for g in analyse(runs).groups}
    # the last fifth of 500 steps starts at step 400, a val point
    assert groups["late"].drop == pytest.approx(0.06) and groups["late"].seed_sd == pytest.approx(0.01)
    assert [groups[g].status for g in ("late", "flat", "solo")] == ["not converged", "converged", "n/a"]


# -- mining diagnostics ----------------------------------------------------------------------------------
def test_mining_diagnostics_average_the_last_fifth_then_the_seeds():
    runs = [make_run(f"adv{s}", "adversarial", s, 1.0, mining=True) for s in range(2)]
    runs += [make_run(f"none{s}", "none", s, 1.0, energy=False) for s in range(2)]
    adversarial, none = analyse(runs).diagnostics
    # last fifth of 500 steps: lines at 400 and 500 with rate step / 1000 + 0.01 * seed:
    # seed 0 -> (0.4 + 0.5) / 2 = 0.45, seed 1 -> 0.46; mean over seeds 0.455; second inner step half of it
    assert adversarial.values["accept_rate"] == pytest.approx(0.455)
    assert adversarial.accept_rate_steps == pytest.approx([0.455, 0.2275])
    assert adversarial.values["energy_decrease"] == pytest.approx(0.2) and adversarial.n == 2
    assert math.isnan(adversarial.values["move_rms"])  # not logged
    assert none.n == 0 and none.accept_rate_steps == [] and math.isnan(none.values["accept_rate"])


# -- a higher-is-better task ----------------------------------------------------------------------------
ACC = [0.50, 0.60, 0.70]  # per-seed board accuracy of 'random' on 'id'; on 'harder' a tenth of it


def accuracy_study():
    """'adversarial' has the higher accuracy on 'id' (+D_P020 per seed) and the lower on 'harder' (-D_P001 / 10)."""
    runs = [accuracy_run("random", s, b, b / 10) for s, b in enumerate(ACC)]
    runs += [accuracy_run("adversarial", s, b + D_P020[s], b / 10 - D_P001[s] / 10) for s, b in enumerate(ACC)]
    return runs


def test_on_a_higher_is_better_metric_the_higher_group_is_better():
    a = analyse(accuracy_study(), {"compare": ["adversarial", "random"], "metric": "accuracy_id"})
    assert list(a.scoring.metrics) == ["accuracy"] and a.scoring.sets == ("id", "harder")
    ema = find(a.comparisons, "id", "ema", "accuracy")
    # A - B = +0.11667 > 0 with p = 0.0198 (the primary: uncorrected): the higher accuracy is the better one
    assert ema.primary and ema.diff == pytest.approx(0.35 / 3) and ema.p == pytest.approx(P020)
    assert ema.verdict == "better" and ema.effect_pct > 0
    harder = find(a.comparisons, "harder", "ema", "accuracy")
    # lower accuracy, p = 0.001037; Holm over the two 'harder' tests: 2 * 0.001037 < 0.05
    assert harder.diff == pytest.approx(-3.1 / 30) and harder.p_adjusted == pytest.approx(2 * P001)
    assert harder.verdict == "worse"


def test_yardstick_standing_follows_the_direction():
    a = analyse(accuracy_study())
    random, adversarial = a.groups
    # random's id accuracy 0.6 ± 0.248 (3 seeds, sd 0.1, t 4.303): above 0.1, below 10; 'coin' at 2.05 is above
    assert random.vs_yardstick["ema"]["id"] == {"givens_only": "beats", "coin": "behind", "solver": "behind"}
    level = accuracy_study()
    for run in level:  # a yardstick inside the group's CI is level with it
        run.final["yardsticks"]["id"]["coin"]["accuracy"] = 0.62
    assert analyse(level).groups[0].vs_yardstick["ema"]["id"]["coin"] == "level with"
    beats = {(st.set, st.name): st.beaten_by for st in a.standing}
    assert beats[("id", "givens_only")] == ["random", "adversarial"] and beats[("id", "solver")] == []


def test_convergence_follows_the_direction():
    """An accuracy still rising over the last fifth is not converged; one that fell there is."""
    rising = [RunRecord(f"up{s}", "up", {}, s, {"status": "finished", "step": 500, **ACCURACY_TASK}, [
        {"kind": "val", "step": step, "val_accuracy_id": value} for step, value in zip(STEPS, (0.1, 0.2, 0.3, 0.4 + 0.01 * s, 0.5 + 0.01 * s))
    ]) for s in range(3)]  # fmt: skip
    conv = analyse(rising).groups[0].convergence
    # improvement from step 400 to 500: +0.1 per seed; finals 0.50, 0.51, 0.52: sd 0.01
    assert conv.drop == pytest.approx(0.1) and conv.seed_sd == pytest.approx(0.01) and conv.status == "not converged"


# -- EMA lag ---------------------------------------------------------------------------------------------
QUICK_EMA = {"train.ema_decay": 0.995, "train.ema_every": 10, "train.ema_update_after_step": 100,
             "train.ema_power": 2 / 3}  # the reference EMA the quick study used to have  # fmt: skip


def lag_study(steps, ema_factor):
    """random / adversarial x 3 seeds, trained `steps` steps with the reference EMA; each EMA error is
    `ema_factor` x its raw error (raw errors 0.010, 0.011, 0.012 and 0.9 x that)."""
    runs = []
    for strategy, scale in (("random", 1.0), ("adversarial", 0.9)):
        for seed in range(3):
            raw = scale * (0.010 + 0.001 * seed)
            run = finals_run(strategy, seed, ema_factor * raw, raw, 3 * ema_factor * raw, 3 * raw)
            run.final["step"], run.config = steps, {"train.steps": steps, **QUICK_EMA}
            runs.append(run)
    return runs


def test_the_ema_horizon_follows_the_warm_up():
    run = lag_study(1000, 1.0)[0]
    # 900 steps after the warm-up start: decay 1 - 901^(-2/3) = 0.98928, every 10 steps -> 10 / 0.01072 = 933 steps
    assert ema_horizon(run) == pytest.approx(10 / 901 ** (-2 / 3))
    run.final["step"] = 100_000  # the decay has long reached 0.995: 10 / 0.005 = 2 000 steps
    assert ema_horizon(run) == pytest.approx(2000)


def test_the_ema_lag_flag_fires_on_a_short_run_and_not_on_a_long_one():
    short = analyse(lag_study(1000, 2.2), {"compare": ["adversarial", "random"], "metric": "mse_id"})
    lag = short.groups[0].lag
    # horizon 933 steps = 93 % of 1 000 > 20 %; EMA - raw = 1.2 x raw = 0.0132 on average > seed sd 0.0022
    assert lag.long_horizon and lag.fraction == pytest.approx(10 / 901 ** (-2 / 3) / 1000)
    assert lag.far_sets == ["id", "ood"] and lag.ratio["id"] == pytest.approx(2.2)
    assert [g.group for g in short.lagging] == ["random", "adversarial"] and short.lead_basis == "raw"
    long = analyse(lag_study(100_000, 1.02))
    lag = long.groups[0].lag
    # horizon 2 000 steps = 2 %; EMA - raw = 0.02 x raw = 0.00022 < the EMA's seed sd 0.00102
    assert not lag.long_horizon and lag.far_sets == [] and not long.lagging and long.lead_basis == "ema"
    assert lag.gap["id"] == pytest.approx(0.02 * 0.011)
    # an EMA far *better* than its raw model is no lag
    assert not analyse(lag_study(100_000, 0.3)).lagging


# -- damaged and summary ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, reason", [
    ("[1, 2]", "final.json holds a JSON list, not an object"),
    ('{"status": "finished", "step": "ten"}', "final.json 'step' is 'ten', not an int"),
    ('{"status": "finished", "step": 10, "metrics": {"mse": "lower"}, "sets": ["id"], "mse_id": "0.1"}',
     "final.json 'mse_id' is '0.1', not a number"),
    ('{"status": "finished", "step": 10, "metrics": {"acc": "higher"}, "sets": ["hard"], "acc_hard_raw": [1]}',
     "final.json 'acc_hard_raw' is [1], not a number"),
    ('{"status": "finished", "step": 10, "mse_id": 0.1}', "final.json lacks 'metrics' (a finished run declares"),
    ('{"status": "finished", "step": 10, "metrics": {"mse": "lower"}}', "final.json lacks 'sets'"),
    ('{"status": "finished", "step": 10, "metrics": {"mse": "down"}, "sets": ["id"]}',
     "final.json 'metrics' is {'mse': 'down'}, not a mapping of metric names to 'lower' or 'higher'"),
    ('{"status": "finished", "step": 10, "metrics": {"mse": "lower"}, "sets": "id"}',
     "final.json 'sets' is 'id', not a list of held-out set names"),
    ('{"status": "failed", "step": 10, "train_flops": null}', "final.json 'train_flops' is None, not a number"),
    ('{"status": 1, "step": 10}', "final.json 'status' is 1, not a string"),
    ('{"status": "finished", "step": 1', "final.json is not valid JSON"),
])  # fmt: skip
def test_a_damaged_final_json_is_reported_and_the_rest_analysed(tmp_path, content, reason):
    folder = RunDir(tmp_path / "damaged")
    folder.root.mkdir()
    folder.final.write_text(content)
    folder.config.write_text("train: {steps: [unclosed\n")  # damaged too: config None, no crash
    folder.metrics.write_text(json.dumps({"kind": "train", "step": 40}) + "\n[1]\n")  # a list line is skipped
    damaged = RunRecord.from_run_dir(folder, "random__seed2", "random", {}, 2)
    assert damaged.status == "damaged" and damaged.damage.startswith(reason) and damaged.config is None
    assert folder.read_final() is None  # read as "not finished", so --resume recomputes the run

    runs = [*pair_study(D_P057, D_P057, D_P057, D_P057), damaged]
    a = analyse(runs)
    assert a.tally == {"finished": 6, "failed": 0, "missing": 0, "damaged": 1}
    [problem] = a.problems
    assert (problem.run_id, problem.status, problem.step) == ("random__seed2", "damaged", 40)
    assert problem.reason.startswith(reason)
    assert find(a.comparisons, "id", "ema").test == "paired"  # the finished runs are analysed as before


def test_run_record_reads_a_run_folder(tmp_path):
    folder = RunDir(tmp_path / "run")
    folder.root.mkdir()
    folder.final.write_text(json.dumps({"status": "finished", "step": 24, **MSE_TASK, "mse_id": 0.5,
                                        "energy_grad_evals": 72.0}))  # fmt: skip
    folder.config.write_text("task: {rank: 3}\ntrain: {steps: 24, budget_flops: 0}\nmining: {strategy: random}\n")
    record = RunRecord.from_run_dir(folder, "r", "random", {}, 0)
    assert record.status == "finished" and record.metrics == []
    assert record.config == {"task.rank": 3, "train.steps": 24, "train.budget_flops": 0, "mining.strategy": "random"}
    assert record.final_number("energy_grad_evals") == 72.0 and math.isnan(record.final_number("grad_evals"))
    assert RunRecord.from_run_dir(RunDir(tmp_path / "nothing"), "m", "random", {}, 1).status == "missing"


def test_summary_rows_have_config_columns_once():
    runs = [make_run("a", "adversarial", 0, 0.1, sweep={"task.rank": 10}), make_run("b", "random", 0, 0.1)]
    columns = summary_columns(runs)
    assert columns[:6] == ["run_id", "group", "strategy", "task.rank", "seed", "status"]  # swept: not repeated
    assert columns.count("task.rank") == 1
    for key in ("train.steps", "train.batch_size", "train.lr", "model.hidden_dim", "train.budget_flops",
                "train_flops", "flops_per_step", "pack_size", "mse_id_raw", "git_commit", "git_dirty", "steps", "error"):  # fmt: skip
        assert key in columns
    assert columns.index("mse_id") < columns.index("mse_id_raw") < columns.index("mse_ood") < columns.index("train_seconds")
    rows = summary_rows(runs)
    assert [list(r) for r in rows] == [columns, columns]
    assert rows[0]["task.rank"] == 10 and rows[1]["task.rank"] is None  # the sweep value, not the base config
    assert rows[0]["train.steps"] == 500 and rows[0]["train_flops"] == 5e11 and rows[0]["pack_size"] == 1
    assert rows[0]["git_commit"] == "0123abc" and rows[0]["git_dirty"] is False
    # the columns are the scores the runs declare: an accuracy task has no mse column
    columns = summary_columns(accuracy_study())
    assert "accuracy_harder_raw" in columns and not [c for c in columns if "mse" in c]


@pytest.mark.parametrize("name", ["quick", "cpu_small"])
def test_the_quick_configs_have_an_ema_that_fits_their_length(name):
    from conftest import ROOT
    from diffusion_lib.harness.config import build_config, flatten
    from diffusion_lib.study.spec import STUDY_KEYS, read_study_file

    data = read_study_file(ROOT / "configs" / ("runs" if name == "cpu_small" else "studies") / f"{name}.yaml")
    config = flatten(build_config(flatten({k: v for k, v in data.items() if k not in STUDY_KEYS})).to_dict())
    run = RunRecord("r", "none", {}, 0, {"status": "finished", "step": config["train.steps"], **MSE_TASK}, [], config)
    assert ema_horizon(run) == pytest.approx(50)  # 5 steps / (1 - 0.9)
    assert not analyse([run]).lagging
    run.config.update({"train.ema_decay": 0.995, "train.ema_every": 10})  # the reference EMA would lag
    assert analyse([run]).lagging


def test_a_task_sweep_gets_one_yardstick_table_per_swept_value():
    # two conditionings whose linear maps score 0.05 / 0.07 and 3.0 / 3.4 (two seeds each): one table over
    # all four runs would read 1.63; per value they read 0.06 and 3.2
    runs = []
    for conditioning, linear in ((0.5, (0.05, 0.07)), (0.05, (3.0, 3.4))):
        for seed, value in enumerate(linear):
            sweep = {"task.conditioning": conditioning}
            run = make_run(f"none__c{conditioning}__seed{seed}", "none", seed, 1.0, sweep=sweep)
            run.final["yardsticks"] = {"id": {"linear": {"mse": value}}, "ood": {"linear": {"mse": 1.0}}}
            runs.append(run)
    a = analyse(runs)
    assert list(a.yardstick_points) == ["task.conditioning=0.5", "task.conditioning=0.05"]
    mean = {point: table["id"][0].mean for point, table in a.yardstick_points.items()}
    assert mean == {"task.conditioning=0.5": pytest.approx(0.06), "task.conditioning=0.05": pytest.approx(3.2)}
    assert a.yardsticks["id"][0].mean == pytest.approx(1.63) and a.yardsticks["id"][0].varies
    # a sweep of a mining key leaves the problems alone: no per-value tables
    mining = [make_run(f"a{s}", "adversarial", s, 1.0, sweep={"mining.opt_steps": s + 1}) for s in range(2)]
    assert analyse(mining).yardstick_points == {}


def test_best_of_gain_and_room_follow_the_metric_direction():
    # an accuracy pick of 0.6 against a random pick of 0.5 gains 20 %; an MSE pick of 0.4 against 0.5 too,
    # and an MSE pick of 0.6 loses 20 %
    assert gain([0.6], [0.5], higher=True) == [pytest.approx(20.0)]
    assert gain([0.4, 0.6], [0.5, 0.5], higher=False) == [pytest.approx(20.0), pytest.approx(-20.0)]
    assert math.isnan(gain([0.1], [0.0], higher=False)[0])  # no scale to be a share of
    assert room([0.4], [0.5]) == [pytest.approx(20.0)] and room([0.6], [0.5]) == [pytest.approx(20.0)]
