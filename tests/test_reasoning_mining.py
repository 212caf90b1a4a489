"""The discrete tasks through the registries, mining, sampling and a study: task defaults, held-out sets of
their own sizes, the carved-set cache, corruption negatives, given cells held everywhere, tiny studies."""
import json
import math
import re

import pytest
import torch

from diffusion_lib.tasks import sudoku as S
from diffusion_lib.tasks import sudoku_puzzles as P
from diffusion_lib.harness.config import ConfigError, build_config
from diffusion_lib.diffusion import GaussianDiffusion1D
from diffusion_lib.mining import resolve_mining_config
from diffusion_lib.models import build_model
from diffusion_lib.tasks.base import make_task

from diffusion_lib.study import cli as comparison


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Carved Sudoku sets cached under tmp_path/cache, none remembered in memory from another test."""
    monkeypatch.setenv("IRED_CACHE", str(tmp_path / "cache"))
    P._held_out_one.cache_clear(), P.hard_set.cache_clear()
    yield tmp_path / "cache"
    P._held_out_one.cache_clear(), P.hard_set.cache_clear()


# -- config ---------------------------------------------------------------------------------------------------
def test_the_discrete_tasks_bring_their_defaults_under_the_users_values():
    sudoku = build_config({"task.dataset": "sudoku"})
    assert sudoku.model["name"] == "sudoku_net" and sudoku.diffusion.inference_steps == 20
    assert sudoku.mining["loss_scale"] == 0.05 and sudoku.mining["start"] == "corrupt"
    assert sudoku.mining["corrupt_fraction"] == 0.05 and sudoku.task["unique"] is True
    graph = build_config({"task.dataset": "connectivity", "mining.loss_scale": 0.3, "model.hidden_dim": 8})
    assert graph.model == {"name": "graph", "dtype": "float32", "hidden_dim": 8, "layers": 3, "time_dim": 64,
                            "aggregation": "max"}
    assert graph.mining["loss_scale"] == 0.3 and graph.diffusion.inference_steps == 5
    assert graph.task == {"dataset": "connectivity", "nodes": 12, "density": 0.12, "harder": [15, 20], "keep_degree": False}
    assert build_config({}).mining["loss_scale"] == 0.5 and build_config({}).model["name"] == "mlp"


@pytest.mark.parametrize("layer, message", [
    ({"task.dataset": "connectivity", "task.harder": [15, 15]}, "task['harder'] = [15, 15] is invalid: must be a list of distinct"),
    ({"task.dataset": "sudoku", "task.givens": [40, 30]}, "task['givens'] = [40, 30] is invalid: must be a list [low, high]"),
    ({"task.dataset": "sudoku", "mining.start": "corrupted"}, "mining_config['start'] = 'corrupted' is invalid: must be one of corrupt, noise"),
    ({"mining.corrupt_fraction": 1.5}, "mining_config['corrupt_fraction'] = 1.5 is invalid: must be a float in [0, 1]"),
])
def test_bad_discrete_keys_are_one_line_errors(layer, message):
    with pytest.raises(ConfigError) as refusal:
        build_config(layer)
    assert message in str(refusal.value) and "\n" not in str(refusal.value)


# -- held-out sets --------------------------------------------------------------------------------------------
def test_connectivity_sets_bring_their_own_sizes_and_the_truth_scores_perfectly():
    task = make_task({"dataset": "connectivity", "nodes": 6, "harder": [8, 10]})
    sets, again = task.held_out(16), task.held_out(16)
    assert list(sets) == ["id", "ood8", "ood10"]
    for name, n in (("id", 6), ("ood8", 8), ("ood10", 10)):
        data = sets[name]
        assert data.x.shape == data.y.shape == data.noise.shape == (16, n * n) and data.mask is None
        assert torch.equal(data.noise, again[name].noise) and torch.equal(data.y, again[name].y)
        assert {k: v.tolist() for k, v in task.score(data.y, data).items()} == {"graph_accuracy": [1.0] * 16, "entry_accuracy": [1.0] * 16}
        marks = task.yardsticks(data)
        assert {"adjacent", "all_connected", "majority", "within_1_hops", "within_3_hops"} <= set(marks)
        assert all(set(m) == {"graph_accuracy", "entry_accuracy"} and all(0 <= v <= 1 for v in m.values()) for m in marks.values())
    assert not torch.equal(sets["ood8"].noise[:, :36], sets["id"].noise)


def test_carved_sudoku_sets_are_unique_cached_and_a_damaged_cache_is_made_again(cache):
    task = make_task({"dataset": "sudoku", "harder": [24, 28]})
    first = task.held_out(4)
    assert list(first) == ["id", "ood", "hard"]
    files = sorted(cache.glob("sudoku_unique*.pt"))
    assert len(files) == 2 and all(f.name.startswith("sudoku_unique_v1_n4_givens") for f in files)
    assert len(list(cache.glob("sudoku_hard_v1_n4_*.pt"))) == 1
    for data in first.values():
        problems = S._problems(data)
        assert all(P.solve(P.puzzle_grid(problems, b))[0] == 1 for b in range(4))
        assert task.score(data.y, data)["board_accuracy"].tolist() == [1.0] * 4
    P._held_out_one.cache_clear(), P.hard_set.cache_clear()
    files[0].write_bytes(b"not a tensor file")
    for again in (task.held_out(4), task.held_out(4)):  # remade from the seed, then read from the cache
        for name in first:
            for key in ("x", "y", "mask", "noise"):
                assert torch.equal(getattr(first[name], key), getattr(again[name], key)), (name, key)
        P._held_out_one.cache_clear(), P.hard_set.cache_clear()
    # each file says what it holds; one that holds something else is made again
    header = torch.load(files[0], weights_only=True)["header"]
    assert header["set"] == "unique" and header["size"] == 4 and header["version"] == P.DATA_VERSION
    assert header["givens"] in ([30, 45], [24, 28])
    assert P._read_cached(files[0], header) is not None
    for key, other in (("size", 5), ("seed", header["seed"] + 1), ("version", P.DATA_VERSION + 1), ("set", "train")):
        assert P._read_cached(files[0], {**header, key: other}) is None, key


# -- issue 25, item 8: carving at scale is shown, estimated by the dry run, and priced by the limit -------------
def test_carving_that_lasts_shows_a_progress_bar_on_stderr(capsys, monkeypatch):
    monkeypatch.setattr(P, "PROGRESS_AFTER_S", 0.0)  # the bar's delay, so that a short carving shows it
    P._carved("train", 6, (30, 45))
    P.hard_set(2)
    err = capsys.readouterr().err
    assert "carving 6 training puzzles" in err and "6/6" in err, err
    assert "carving 2 hard puzzles" in err and "2/2" in err, err


def test_the_dry_run_estimates_carving_instead_of_carving(tmp_path, capsys, monkeypatch, cache, one_thread):
    carved = []
    original = P.carve_unique

    def counted(*args):
        carved.append(1)
        assert len(carved) < 500, "the dry run carves a large set"  # a probe carves tens of puzzles
        return original(*args)

    monkeypatch.setattr(P, "carve_unique", counted)
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(name="big", task="{dataset: sudoku}", primary="board_accuracy_id")
                    .replace("num_samples: 8", "num_samples: 20000"))
    assert comparison.main(["--config", str(path), "--output", str(tmp_path / "big"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "data not cached yet" in line)
    hours, minutes = re.search(r"~(?:(\d+)h)?(\d+)m", line).groups()
    # 20 000 hard puzzles, each three carvings to a minimal puzzle: far more than ten minutes on any CPU
    assert int(hours or 0) * 60 + int(minutes) > 10, line
    assert not list(cache.glob("*n20000*")) and not list(cache.glob("*n2048_*"))  # neither set was carved
    assert P.carving_seconds([("hard", 2, (0, 0))]) == 0  # the probe's own set is cached now: nothing to carve


def test_the_held_out_size_limit_says_what_a_large_sudoku_set_costs():
    with pytest.raises(ConfigError, match=r"'eval.num_samples' = 2097152 is out of range: .*Sudoku.*--dry-run estimates"):
        build_config({"eval.num_samples": 2**21})


# -- mining -----------------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a model's energy_and_grad: every y it is asked about."""

    def __init__(self, model):
        self.inner, self.seen = model.energy_and_grad, []
        model.energy_and_grad = self

    def __call__(self, cond, y, need_grad=True):
        self.seen.append(y.detach().clone())
        return self.inner(cond, y, need_grad)


def _setup(dataset, strategy, batch, **mining):
    task = make_task({"dataset": dataset, "nodes": 6} if dataset == "connectivity" else {"dataset": dataset})
    model_name = "graph" if dataset == "connectivity" else "sudoku_net"
    model = build_model({"name": model_name, "hidden_dim": 8, "layers": 1, "time_dim": 8}, task).double()
    diffusion = GaussianDiffusion1D(model, mining_config=resolve_mining_config({"strategy": strategy, **mining}), data_bound=task.answer_bound,
                                    corrupt=task.corrupt).double()
    x, y, mask = task.sample(batch, torch.Generator().manual_seed(4))
    draws = diffusion.draw(batch, [torch.Generator().manual_seed(5)], "cpu")
    draws.noise, draws.noise_pos = draws.noise.double(), None if draws.noise_pos is None else draws.noise_pos.double()
    return diffusion, x.double()[None], y.double()[None], None if mask is None else mask[None], draws


def _negative(diffusion, x, y, mask, draws):
    """(the positive, the negative) the energy loss compares, [P, B, D] each."""
    recorder = Recorder(diffusion.model)
    diffusion(x, y, draws=draws, mask=mask)
    return recorder.seen[-1].unbind(1), recorder.seen


def _clean(diffusion, noisy, draws):
    """The clean answer under a noisy one at each sample's level, the positive's noise taken out."""
    a, s = (getattr(diffusion, k).double()[draws.t].unsqueeze(-1) for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
    return (noisy - s * draws.noise_pos) / a


def test_sudoku_random_negatives_redraw_the_stated_fraction_of_blank_cells():
    diffusion, x, y, mask, draws = _setup("sudoku", "random", 256, corrupt_fraction=0.2)
    (positive, negative), _ = _negative(diffusion, x, y, mask, draws)
    clean = _clean(diffusion, negative, draws).view(256, 81, 9)
    blank = ~mask.view(256, 81, 9)[..., 0]
    assert torch.allclose(clean[blank].abs(), torch.ones(()).double(), atol=1e-9)  # one-hot in +-1, noised with eps'
    assert ((clean[blank] > 0).sum(-1) == 1).all()
    assert torch.equal(negative[mask], positive[mask])  # the givens held, exactly (no noise there)
    changed = (clean.sign() != y.view(256, 81, 9)).any(-1)
    assert abs(changed[blank].double().mean().item() - 0.2 * 8 / 9) < 0.02  # a re-draw keeps the digit 1 time in 9


def test_connectivity_random_negatives_set_the_stated_fraction_to_minus_one():
    diffusion, x, y, mask, draws = _setup("connectivity", "random", 512, corrupt_fraction=0.3)
    (_, negative), _ = _negative(diffusion, x, y, mask, draws)
    clean = _clean(diffusion, negative, draws)
    torch.testing.assert_close(clean.abs(), torch.ones_like(clean))
    assert torch.equal(clean[y < 0].sign(), y[y < 0])  # one-way: never made reachable
    assert abs((clean.sign() != y)[y > 0].double().mean().item() - 0.3) < 0.02


def test_adversarial_descends_from_the_random_negative_and_noise_start_draws_no_uniforms():
    diffusion, x, y, mask, draws = _setup("sudoku", "random", 16)
    (_, random_negative), _ = _negative(diffusion, x, y, mask, draws)
    adversarial, *_ = _setup("sudoku", "adversarial", 16)
    adversarial.load_state_dict(diffusion.state_dict())
    _, seen = _negative(adversarial, x, y, mask, draws)
    # the descent starts (after the score loss's input) from the random negative before the loss renoises
    # it: sqrt(abar_t) * the corrupted answer, the givens held
    s = diffusion.sqrt_one_minus_alphas_cumprod.double()[draws.t].unsqueeze(-1)
    expected = torch.where(mask, random_negative, random_negative - s * draws.noise_pos)
    torch.testing.assert_close(seen[1], expected, rtol=0, atol=1e-6)  # the schedule constants are float32-made
    assert (seen[-1][:, 1] - random_negative).abs().max() > 1e-3
    noise_start, *_, noise_draws = _setup("sudoku", "adversarial", 16, start="noise")
    assert noise_draws.uniform is None and draws.uniform.shape == (1, 16, 729)
    inverse = GaussianDiffusion1D(build_model({"hidden_dim": 8}, make_task({"dataset": "inverse", "rank": 2})))
    assert inverse.draw(4, [torch.Generator().manual_seed(0)], "cpu").uniform is None  # continuous tasks: unchanged draws


def _held(y, mask, values, scale):
    """Whether y's given entries equal sqrt(abar_t) * value exactly (scale [P, B])."""
    expected = scale.unsqueeze(-1) * values
    if y.dim() == 4:
        expected, mask = expected.unsqueeze(1).expand_as(y), mask.unsqueeze(1).expand_as(y)
    return torch.equal(y[mask.expand_as(y)], expected.expand_as(y)[mask.expand_as(y)])


@pytest.mark.parametrize("strategy", ["random", "adversarial"])
def test_sudoku_given_cells_stay_fixed_through_noising_and_mining(strategy):
    diffusion, x, y, mask, draws = _setup("sudoku", strategy, 12, opt_steps=3)
    _, seen = _negative(diffusion, x, y, mask, draws)
    levels = diffusion.sqrt_alphas_cumprod.double()[draws.t]
    assert len(seen) >= (2 if strategy == "random" else 5)
    assert all(_held(s, mask, y, levels) for s in seen)


def test_sudoku_given_cells_stay_fixed_through_sampling():
    diffusion, *_ = _setup("sudoku", "none", 4)
    data = make_task({"dataset": "sudoku", "unique": False}).held_out(6)["ood"]
    recorder = Recorder(diffusion.model)
    y, mask = data.y.double()[None], data.mask[None]
    answer = diffusion.sample(data.x.double(), noise=data.noise.double(), inner_steps=2, given=(mask, y))
    assert torch.equal(answer[mask], y[mask])
    per_level = 1 + 3
    assert len(recorder.seen) == diffusion.num_timesteps * per_level
    for i, seen in enumerate(recorder.seen):
        level = diffusion.num_timesteps - 1 - i // per_level
        assert _held(seen, mask, y, diffusion.sqrt_alphas_cumprod.double()[level].expand(1, 6)), i


# -- tiny studies ------------------------------------------------------------------------------------------------
STUDY = """
name: {name}
seeds: [0, 1]
strategies:
  random: {{strategy: random}}
  adversarial: {{strategy: adversarial, opt_steps: 2}}
primary: {{compare: [adversarial, random], metric: {primary}}}
task: {task}
model: {{hidden_dim: 8, layers: 1, time_dim: 8}}
diffusion: {{inference_steps: 2}}
train: {{steps: 6, batch_size: 8, log_every: 3, save_every: 6}}
eval: {{every: 3, num_samples: 8, batch_size: 8, inference_steps_sweep: [0, 2]}}
device: cpu
"""


@pytest.fixture
def one_thread():
    """Tiny tensors on one thread: two threads spin-waiting on each other took 7x as long on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task, primary, sets, metrics", [
    ("{dataset: connectivity, nodes: 4, harder: [5]}", "graph_accuracy_id", ["id", "ood5"], 2),
    ("{dataset: sudoku, unique: false}", "board_accuracy_id", ["id", "ood"], 4),
])
def test_a_tiny_study_of_each_discrete_task_runs_end_to_end_with_report_and_plots(tmp_path, capsys, one_thread, task, primary, sets, metrics):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(name="tiny", task=task, primary=primary))
    out = tmp_path / "tiny"
    assert comparison.main(["--config", str(path), "--output", str(out)]) == 0, capsys.readouterr().err
    finals = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/final.json"))}
    assert len(finals) == 4 and all(f["status"] == "finished" for f in finals.values())
    metric = primary.rsplit("_", 1)[0]
    for final in finals.values():
        assert final["sets"] == sets and list(final["metrics"].values()) == ["higher"] * metrics
        assert next(iter(final["metrics"])) == metric
        # a Sudoku set's propagation groups may be empty at 8 puzzles: NaN there, never anything out of [0, 1]
        assert all(0 <= final[f"{m}_{s}{k}"] <= 1 or (m.startswith("board_acc_") and math.isnan(final[f"{m}_{s}{k}"]))
                   for m in final["metrics"] for s in sets for k in ("", "_raw"))
        assert set(final["yardsticks"]) == set(sets) and all(final["yardsticks"][s] for s in sets)
        assert set(final["inference_steps_sweep"]) == {"0", "2"}
    report = (out / "report.md").read_text()
    label = finals["random__seed0"]["metric_labels"][metric]
    title = "graph connectivity" if "connectivity" in task else "Sudoku"
    assert report.startswith(f"# Negative mining on {title}: study 'tiny'")
    assert f"higher {label} is better" in report
    verdict = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in verdict.splitlines() if line.startswith("- EMA:"))
    by_hand = sum(finals[f"adversarial__seed{s}"][primary] - finals[f"random__seed{s}"][primary] for s in (0, 1)) / 2
    shown = float(re.search(r"A − B = ([-+0-9.e]+)", line).group(1))
    assert math.isclose(shown, by_hand, rel_tol=5e-3, abs_tol=1e-9), (line, by_hand)
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert f"final_{metric}.png" in plots and f"val_{metric}_vs_step.png" in plots, plots
