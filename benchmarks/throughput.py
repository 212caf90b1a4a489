"""Training-step and sampling throughput: the library's fast path vs a straightforward implementation.

Run as `python benchmarks/throughput.py [--quick]` or `python -m benchmarks.throughput [--quick]`.

Implementations, both on the *same model weights* (the library's EBM as a pack of one run, P = 1):
- `plain`: tests/straightforward.py, the tests' oracle (autograd with create_graph=True, time MLP per sample, fc1 on
           cat([x, y]) at every evaluation, separate rejection forwards, per-sample numpy data in a
           DataLoader), reading run 0 of the packed layers;
- `fast`:  the library as it runs: packed tensors [P, B, ...], the condition (fc1 on x, FiLM) once per
           batch, the time MLP on the T distinct timesteps, an explicit gradient sweep that autograd
           differentiates in training, the accepted proposal's energy reused, batched torch data.

What is measured, for each strategy (none, random, adversarial with opt_steps 2) at (rank 20, batch
2048) and (rank 5, batch 256), hidden 512:
- seconds per full training step, data generation included (data + loss + backward + grad-norm clip
  1.0 + Adam step; the same clip and Adam code for both). The implementations run *interleaved step by
  step in one process*, so a burst of load from other work on a shared machine hits them alike; a
  speed-up is the median of the per-step ratios. The step is split into data / model (loss + backward)
  / optimiser (clip + Adam);
- peak RSS: each (configuration, implementation) runs again in its *own fresh subprocess* (a warm-up
  step and one more) and reports `ru_maxrss`, so the peaks are separable. The RSS just before its first
  step (imports, model, optimiser, data source) is shown too: the step's working set is the difference;
- model FLOPs per step, counted from the shapes of the matmuls the step actually runs (recorded with
  a dispatch mode during loss + backward), and the time those same matmuls take *alone* at the same
  shapes and layouts, timed in the same process: matmul-bound / measured = model FLOP/s / matmul FLOP/s.
  The same recording counts the step's other (non-matmul, non-view) passes over large tensors;
- sampling 256 rank-20 problems (10 timesteps x 5 inner steps), interleaved the same way, with the
  same accounting;
- levers: the fast path with and without each of its optimisations (a variant patched in with
  mock.patch), interleaved step by step; gain = median of the per-step ratios.

`--quick` runs every part at toy sizes (a smoke check of the script, under 2 minutes; its numbers
mean nothing) and writes no report unless --out is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch import Tensor
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/throughput.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the straightforward implementation is the tests' oracle

import straightforward as plain  # noqa: E402
from diffusion_lib import EBM, EnergyCondition, EnergyDenoiser, GaussianDiffusion1D, resolve_mining_config  # noqa: E402
from diffusion_lib import models  # noqa: E402
from diffusion_lib.diffusion import OptResult  # noqa: E402
from diffusion_lib.models import packed_linear  # noqa: E402
from diffusion_lib.tasks.base import make_task  # noqa: E402

STRATEGIES = ("none", "random", "adversarial")
TRAIN_OPT_STEPS = 2  # adversarial mining's inner steps in every training configuration here
IMPLS = ("fast", "plain")
STUDY_SECTION = "# Study throughput"  # sections appended by benchmarks/study_throughput.py; kept on rewrite
Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Sizes:
    """Every size the benchmark uses: the real ones, or toy ones for --quick."""

    shapes: tuple[tuple[int, int], ...]  # (rank, batch) of the training configurations; the first is the main one
    hidden: int
    sample_rank: int
    sample_problems: int
    sample_inner: int


FULL = Sizes(shapes=((20, 2048), (5, 256)), hidden=512, sample_rank=20, sample_problems=256, sample_inner=5)
QUICK = Sizes(shapes=((4, 128),), hidden=64, sample_rank=4, sample_problems=32, sample_inner=2)


# -- the two implementations on one model ------------------------------------------------------------
@dataclass
class Setup:
    diffusion: GaussianDiffusion1D
    optimizer: torch.optim.Optimizer
    torch_data: Callable[[], Batch]  # the library's batched generator
    numpy_data: Callable[[], Batch]  # the straightforward per-sample numpy DataLoader
    generator: torch.Generator


def make_setup(strategy: str, rank: int, batch: int, hidden: int, seed: int = 0) -> Setup:
    task = make_task({"dataset": "inverse", "rank": rank})
    ebm = EBM(task, hidden_dim=hidden)
    ebm.init_run(0, seed)
    mining = resolve_mining_config({"strategy": strategy, "opt_steps": TRAIN_OPT_STEPS})
    diffusion = GaussianDiffusion1D(EnergyDenoiser(ebm), mining_config=mining)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)
    loader: Iterator = iter(plain.numpy_loader(rank, batch, seed))
    return Setup(diffusion, optimizer, lambda: task.sample(batch, generator)[:2], lambda: next(loader), generator)


def data(setup: Setup, impl: str) -> Batch:
    return setup.numpy_data() if impl == "plain" else setup.torch_data()


def loss_and_backward(setup: Setup, impl: str, x: Tensor, y: Tensor) -> None:
    if impl == "plain":
        loss = plain.plain_loss(setup.diffusion, x, y, generator=setup.generator)
    else:
        loss, _ = setup.diffusion(x, y, generator=setup.generator)
    loss.backward()


def train_step(setup: Setup, impl: str) -> tuple[float, float, float]:
    """One full training step; returns (total, data, model) seconds."""
    start = time.perf_counter()
    x, y = data(setup, impl)
    data_done = time.perf_counter()
    loss_and_backward(setup, impl, x, y)
    model_done = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(setup.diffusion.parameters(), 1.0)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, data_done - start, model_done - data_done


def sample(setup: Setup, impl: str, x: Tensor, noise: Tensor, inner_steps: int) -> Tensor:
    """Answers [B, D] (the fast path's pack of one, unpacked)."""
    if impl == "plain":
        return plain.plain_sample(setup.diffusion, x, noise, inner_steps)
    return setup.diffusion.sample(x, noise=noise, inner_steps=inner_steps)[0]


# -- op accounting: matmuls by shape, and the other passes over large tensors ---------------------------
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}
Operand = tuple[tuple[int, ...], tuple[int, ...]]  # shape, strides


class OpRecorder(TorchDispatchMode):
    """Counts every matmul (op, operand shapes and strides, dtype, scalar arguments) that runs under it, and
    every other op that reads or writes at least `large` elements without being a view (an elementwise
    pass, a reduction, a gather, a copy: memory-bound work that a GEMM-only count misses)."""

    def __init__(self, large: int):
        super().__init__()
        self.large = large
        self.matmuls: Counter = Counter()
        self.passes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, Tensor)]
        if func in MATMULS:
            operands = tuple((tuple(a.shape), tuple(a.stride())) for a in tensors)
            self.matmuls[(func, operands, tensors[0].dtype, tuple(sorted(kwargs.items())))] += 1
            return out
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, Tensor)]
        if not is_view and max((t.numel() for t in tensors + outputs), default=0) >= self.large:
            self.passes[func.__name__] += 1
        return out


def matmul_flops(func, operands: tuple[Operand, ...]) -> int:
    """2 m k n per product (times the batch for bmm / baddbmm); the last two operands are the factors."""
    (m, k), n = operands[-2][0][-2:], operands[-1][0][-1]
    batch = operands[-2][0][0] if len(operands[-2][0]) == 3 else 1
    return 2 * batch * m * k * n


def strided_operand(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Random values laid out with the recorded strides (transposed or broadcast operands included)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    return torch.randn(size, dtype=dtype).as_strided(shape, stride)


def median_seconds(run: Callable[[], Any], min_run_time: float) -> float:
    """Median seconds of one call of `run` by torch.utils.benchmark (warm-up, then blocks of calls sized to
    the clock's resolution for at least `min_run_time` s), on this process's threads (Timer's default is 1).

    Used where one operation is timed alone. Training steps and sampling passes are not: they change the
    model (Adam) and are interleaved step by step with the other implementation, which Timer cannot do."""
    timer = benchmark.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_matmul(func, operands: tuple[Operand, ...], dtype: torch.dtype, kwargs: tuple, min_run_time: float) -> float:
    """Median seconds of one matmul alone, on fresh operands of the recorded shapes and strides."""
    args = [strided_operand(shape, stride, dtype) for shape, stride in operands]
    return median_seconds(lambda: func(*args, **dict(kwargs)), min_run_time)


def op_accounting(run: Callable[[], Any], large: int, min_run_time: float) -> dict[str, float]:
    """GFLOP of the matmuls `run` performs, the seconds they take alone at the same shapes, the count of
    those matmuls and of its other passes over >= `large` elements."""
    with OpRecorder(large) as recorder:
        run()
    flops = seconds = 0.0
    for (func, operands, dtype, kwargs), count in recorder.matmuls.items():
        flops += count * matmul_flops(func, operands)
        seconds += count * time_matmul(func, operands, dtype, kwargs, min_run_time)
    return {"gflop": flops / 1e9, "matmul_s": seconds, "matmuls": sum(recorder.matmuls.values()),
            "passes": sum(recorder.passes.values()), "top_passes": dict(recorder.passes.most_common(6))}


# -- lever ablations: the fast path with one lever reverted ------------------------------------------
# Each variant is patched in only for its own steps; timed interleaved with the unpatched fast path,
# the median ratio (variant / fast) is what that lever buys. All take and return packed tensors [P, B, ...].
_library_energy_and_grad = EBM.energy_and_grad  # captured before any patch: the variants call the original


def energy_and_grad_autograd(self: EBM, cond: EnergyCondition, y: Tensor, need_grad: bool = True):
    """No explicit sweep: torch.autograd.grad on the same split energy (the library's forward part), with
    create_graph=True when a graph is being recorded (training), as the straightforward path does."""
    if not need_grad:
        return _library_energy_and_grad(self, cond, y, need_grad=False)
    recording = torch.is_grad_enabled()
    with torch.enable_grad():
        y_in = y if y.requires_grad else y.detach().requires_grad_(True)
        energy, _ = _library_energy_and_grad(self, cond, y_in, need_grad=False)
        (grad,) = torch.autograd.grad(energy.sum(), y_in, create_graph=recording)
    if not recording:
        energy, grad = energy.detach(), grad.detach()
    return energy, grad


def _time_path(ebm: EBM, steps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gain2, shift2, gain3, shift3 for timesteps `steps` ([T] shared by the runs, or [P, B])."""
    emb = ebm.time_mlp[0](steps.reshape(-1)).to(ebm.fc1.weight.dtype)
    emb = emb.view(*steps.shape, -1) if steps.dim() == 2 else emb.expand(ebm.runs, -1, -1)
    emb = ebm.time_mlp[1:](emb)
    return (*ebm.t_map_fc2(emb).chunk(2, dim=-1), *ebm.t_map_fc3(emb).chunk(2, dim=-1))


def _fc1_x(ebm: EBM, x: Tensor) -> Tensor:
    return packed_linear(x, ebm.fc1.weight[:, :, : ebm.inp_dim], ebm.fc1.bias)


def condition_time_mlp_per_sample(self: EBM, x: Tensor, t: Tensor, num_timesteps: int) -> EnergyCondition:
    """The time MLP and FiLM maps run on the P x B samples' timesteps instead of the T distinct ones."""
    gain2, shift2, gain3, shift3 = _time_path(self, t)
    return EnergyCondition(_fc1_x(self, x), 1 + gain2, shift2, 1 + gain3, shift3)


def condition_indexing(self: EBM, x: Tensor, t: Tensor, num_timesteps: int) -> EnergyCondition:
    """As the library, but FiLM gathered by (run, t) indexing (backward: index_put with accumulate)
    instead of index_select on the flattened [P * T] rows."""
    gain2, shift2, gain3, shift3 = _time_path(self, torch.arange(num_timesteps, device=x.device))
    film = torch.cat([1 + gain2, shift2, 1 + gain3, shift3], dim=-1)  # [P, T, 4H]
    run = torch.arange(self.runs, device=t.device).unsqueeze(-1)
    return EnergyCondition(_fc1_x(self, x), *film[run, t].chunk(4, dim=-1))


@torch.no_grad()
def opt_step_separate_rejection(
    self: GaussianDiffusion1D, cond: EnergyCondition, y: Tensor, t: Tensor, steps: int, scale: float = 1.0,
    schedule: str = "constant", clamp_bound: str = "per_sample",
) -> OptResult:
    """The spec read literally: energy and gradient at y at every step, then a separate energy-only forward
    at the proposal for the rejection test (steps >= 1, as mining and sampling always ask)."""
    bound_t = t if clamp_bound == "per_sample" else t[..., :1]
    bound = self.data_bound * self.at("sqrt_alphas_cumprod", bound_t)
    eta = self.at("opt_step_size", t)
    accepted, energy_start = [], None
    for i in range(steps):
        energy, grad = self.model.energy_and_grad(cond, y)
        energy_start = energy if energy_start is None else energy_start
        step_scale = scale if i == 0 or schedule == "constant" else 2.0
        proposal = torch.clamp(y - eta * step_scale * grad, -bound, bound)
        new_energy, _ = self.model.energy_and_grad(cond, proposal, need_grad=False)
        keep = new_energy <= energy
        y = torch.where(keep, proposal, y)
        energy = torch.where(keep, new_energy, energy)
        accepted.append(keep.flatten(1).float().mean(dim=1))
    return OptResult(y, torch.stack(accepted, dim=-1), energy_start, energy)


def swish_slope_times_formula(v: Tensor, z: Tensor) -> Tensor:
    """v * swish'(z) spelled out (sigmoid, then four elementwise products and sums) even without a graph."""
    s = torch.sigmoid(z)
    return v * s * (1 + z * (1 - s))


@dataclass(frozen=True)
class Lever:
    what: str  # "the fast path's way vs the variant"
    owner: Any  # the class or module patched
    attribute: str
    variant: Callable
    runs_on: tuple[str, ...]  # the configurations it can change ("sample": sampling)


LEVERS: dict[str, Lever] = {
    "explicit_grad": Lever(
        "explicit gradient sweep (differentiated by autograd in training) vs torch.autograd.grad"
        "(create_graph=True) on the same split energy", EBM, "energy_and_grad", energy_and_grad_autograd,
        ("none", "adversarial", "sample")),
    "time_mlp_once": Lever(
        "time MLP + FiLM maps on the T distinct timesteps vs on every sample", EBM, "condition",
        condition_time_mlp_per_sample, ("none", "sample")),
    "index_select": Lever(
        "FiLM gather by index_select vs (run, t) indexing (index_put backward)", EBM, "condition",
        condition_indexing, ("none",)),
    "energy_reuse": Lever(
        "accepted proposal's energy and gradient reused as the next start vs a separate rejection forward",
        GaussianDiffusion1D, "opt_step", opt_step_separate_rejection, ("adversarial", "sample")),
    "silu_backward": Lever(
        "v * swish'(z) by silu_backward's fused kernel when no graph is recorded vs the spelled-out formula",
        models, "swish_slope_times", swish_slope_times_formula, ("adversarial", "sample")),
}


def worker_lever(lever: str, config: str, rank: int, batch: int, hidden: int, inner_steps: int, steps: int) -> dict:
    """The fast path with and without one lever, interleaved; for config 'sample', sampling."""
    spec = LEVERS[lever]
    setup = make_setup("adversarial" if config == "sample" else config, rank, batch, hidden)
    x, _ = setup.torch_data()
    noise = torch.randn(x.shape[0], setup.diffusion.model.out_dim, generator=setup.generator)

    def run() -> float:
        if config == "sample":
            start = time.perf_counter()
            sample(setup, "fast", x, noise, inner_steps)
            return time.perf_counter() - start
        return train_step(setup, "fast")[0]

    def run_without_lever() -> float:
        with mock.patch.object(spec.owner, spec.attribute, spec.variant):
            return run()

    times: dict[str, list[float]] = {"with": [], "without": []}
    for i in range(steps + 1):  # the first round warms up
        pair = [("with", run), ("without", run_without_lever)]
        for name, fn in pair if i % 2 else pair[::-1]:
            seconds = fn()
            if i:
                times[name].append(seconds)
    return {
        "with_s": statistics.median(times["with"]),
        "without_s": statistics.median(times["without"]),
        "gain": statistics.median(b / a for a, b in zip(times["with"], times["without"])),
    }


def worker_condition_cost(rank: int, batch: int, hidden: int, min_run_time: float) -> dict:
    """Seconds of one condition() without autograd: what each further energy call would add if the
    condition were recomputed per call instead of once per batch / timestep."""
    setup = make_setup("adversarial", rank, batch, hidden)
    x, _ = setup.torch_data()
    t = torch.randint(0, setup.diffusion.num_timesteps, (1, batch), generator=setup.generator)
    with torch.no_grad():
        return {"condition_s": median_seconds(lambda: setup.diffusion.condition(x[None], t), min_run_time)}


# -- workers (each runs in its own subprocess) -------------------------------------------------------
def rss_now_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def speedup_vs_plain(times: dict[str, list[float]]) -> float:
    """Median over interleaved steps of plain seconds / fast seconds."""
    return statistics.median(p / f for p, f in zip(times["plain"], times["fast"]))


def worker_time_train(strategy: str, rank: int, batch: int, hidden: int, steps: int, warmup: int,
                      matmul_time: float) -> dict:
    """Both implementations interleaved step by step on one model, then the op accounting."""
    setup = make_setup(strategy, rank, batch, hidden)
    for impl in IMPLS:
        for _ in range(warmup):
            train_step(setup, impl)
    steps_taken: dict[str, list[tuple[float, float, float]]] = {impl: [] for impl in IMPLS}
    for i in range(steps):
        for impl in IMPLS[i % len(IMPLS) :] + IMPLS[: i % len(IMPLS)]:  # alternate who goes first
            steps_taken[impl].append(train_step(setup, impl))
    result: dict[str, Any] = {}
    for impl in IMPLS:
        total, data_s, model_s = (statistics.median(col) for col in zip(*steps_taken[impl]))
        result[impl] = {"step_s": total, "data_s": data_s, "model_s": model_s}
        x, y = data(setup, impl)
        accounting = op_accounting(lambda: loss_and_backward(setup, impl, x, y), batch * hidden // 2, matmul_time)
        result[impl].update(accounting)
        setup.optimizer.zero_grad(set_to_none=True)
    result["speedup"] = speedup_vs_plain({impl: [s[0] for s in steps_taken[impl]] for impl in IMPLS})
    return result


def worker_memory_train(impl: str, strategy: str, rank: int, batch: int, hidden: int, steps: int) -> dict:
    setup = make_setup(strategy, rank, batch, hidden)
    data(setup, impl)  # the data source's buffers exist before the baseline
    before = rss_now_mib()
    for _ in range(steps):
        train_step(setup, impl)
    return {"rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}


def worker_sample(rank: int, problems: int, hidden: int, inner_steps: int, repeats: int, matmul_time: float) -> dict:
    setup = make_setup("adversarial", rank, problems, hidden)
    x, _ = setup.torch_data()
    noise = torch.randn(x.shape[0], setup.diffusion.model.out_dim, generator=setup.generator)
    answers = {impl: sample(setup, impl, x, noise, inner_steps) for impl in IMPLS}  # doubles as warm-up
    # both answer the same problems alike (float32 rounding apart): the timings compare equal work
    torch.testing.assert_close(answers["fast"], answers["plain"], rtol=1e-3, atol=1e-4)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(repeats):
        for impl in IMPLS[i % len(IMPLS) :] + IMPLS[: i % len(IMPLS)]:
            start = time.perf_counter()
            sample(setup, impl, x, noise, inner_steps)
            times[impl].append(time.perf_counter() - start)
    result: dict[str, Any] = {}
    for impl in IMPLS:
        result[impl] = {"sample_s": statistics.median(times[impl])}
        result[impl].update(op_accounting(lambda: sample(setup, impl, x, noise, inner_steps), problems * hidden // 2,
                                          matmul_time))
    result["speedup"] = speedup_vs_plain(times)
    return result


WORKERS: dict[str, Callable[..., dict]] = {
    "time_train": worker_time_train,
    "memory_train": worker_memory_train,
    "sample": worker_sample,
    "lever": worker_lever,
    "condition_cost": worker_condition_cost,
}


def run_worker(kind: str, threads: int, **kwargs) -> dict:
    """Runs one worker in a fresh Python process and returns its JSON result."""
    spec = json.dumps({"kind": kind, **kwargs})
    command = [sys.executable, "-m", "benchmarks.throughput", "--threads", str(threads), "--worker", spec]
    env = dict(os.environ)
    if kind == "memory_train":
        # a fixed mmap threshold: every large block is mapped on malloc and unmapped on free, so RSS
        # tracks live memory and the peak does not depend on what glibc happened to keep cached
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} {kwargs} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the machine and its load ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine(threads: int) -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(threads),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle or iowait) since boot."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# -- report ------------------------------------------------------------------------------------------
def _by_shape(results: list[dict], strategy: str, shape: tuple[int, int]) -> dict:
    return next(r for r in results if (r["strategy"], r["rank"], r["batch"]) == (strategy, *shape))


def train_rows(results: list[dict]) -> list[str]:
    header = (
        "| strategy | rank | batch | impl | s/step | steps/s | data s | model s | speed-up vs plain "
        "| peak RSS MiB (before) | GFLOP/step | matmul-bound s | model/matmul FLOP/s: step (model part) "
        "| matmuls, large passes |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        for impl in IMPLS:
            t, m = r["time"][impl], r["memory"][impl]
            speedup = f"{r['time']['speedup']:.2f}x" if impl == "fast" else ""
            rows.append(
                f"| {r['strategy']} | {r['rank']} | {r['batch']} | {impl} | {t['step_s']:.3f} | {1 / t['step_s']:.2f} "
                f"| {t['data_s']:.3f} | {t['model_s']:.3f} | {speedup} "
                f"| {m['peak_rss_mib']:.0f} ({m['rss_before_mib']:.0f}) | {t['gflop']:.3g} "
                f"| {t['matmul_s']:.3f} | {t['matmul_s'] / t['step_s']:.2f} ({t['matmul_s'] / t['model_s']:.2f}) "
                f"| {t['matmuls']}, {t['passes']} |"
            )
    return rows


def sample_rows(result: dict) -> list[str]:
    rows = [
        "| impl | s per batch | speed-up vs plain | GFLOP | matmul-bound s | model/matmul FLOP/s | matmuls, large passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in IMPLS:
        r = result[impl]
        speedup = f"{result['speedup']:.2f}x" if impl == "fast" else ""
        rows.append(
            f"| {impl} | {r['sample_s']:.3f} | {speedup} | {r['gflop']:.3g} | {r['matmul_s']:.3f} "
            f"| {r['matmul_s'] / r['sample_s']:.2f} | {r['matmuls']}, {r['passes']} |"
        )
    return rows


def target_rows(results: list[dict], sampling: dict, sizes: Sizes) -> list[str]:
    main = sizes.shapes[0]
    none, adv = _by_shape(results, "none", main)["time"], _by_shape(results, "adversarial", main)["time"]
    where = f"rank {main[0]}, batch {main[1]}"
    rows = ["| target | goal | fast |", "|---|---|---|"]

    def row(name: str, goal: float, value: float, unit: str = "x", at_most: bool = False) -> None:
        met = value <= goal if at_most else value >= goal
        rows.append(f"| {name} | {'<=' if at_most else '>='} {goal}{unit} | {value:.2f}{unit} "
                    f"{'(met)' if met else '(short)'} |")

    row(f"adversarial step speed-up, {where}, incl. data", 1.6, adv["speedup"])
    row(f"none step speed-up, {where}, incl. data", 1.3, none["speedup"])
    row(f"sampling speed-up, {sizes.sample_problems} rank-{sizes.sample_rank} problems, "
        f"10 x {sizes.sample_inner}", 2.5, sampling["speedup"])
    row(f"model FLOP/s / matmul FLOP/s, none, batch {main[1]}, full step", 0.8,
        none["fast"]["matmul_s"] / none["fast"]["step_s"], "")

    def working_set(memory: dict) -> float:
        return memory["peak_rss_mib"] - memory["rss_before_mib"]

    for label, measure in (("peak RSS", lambda m: m["peak_rss_mib"]), ("step working set (peak - before)", working_set)):
        worst = max(measure(r["memory"]["fast"]) - measure(r["memory"]["plain"]) for r in results)
        row(f"{label}, fast - plain, worst configuration", 0, worst, " MiB", at_most=True)
    return rows


def limits(results: list[dict], sampling: dict, sizes: Sizes) -> list[str]:
    """Bounds computed from this run's numbers: what the fast path could reach at matmul speed."""
    (rank, batch), hidden = sizes.shapes[0], sizes.hidden
    none = _by_shape(results, "none", (rank, batch))["time"]["fast"]
    other = none["step_s"] - none["model_s"]  # data + clip + Adam
    rest_ms = (none["model_s"] - none["matmul_s"]) * 1e3
    top = ", ".join(f"{name} {count}" for name, count in none["top_passes"].items())
    fast, slow = sampling["fast"], sampling["plain"]
    evaluations = 10 * (sizes.sample_inner + 2)  # per timestep: denoise + opt_step start + inner proposals
    return [
        f"- model/matmul FLOP/s of the none step: its data ({none['data_s'] * 1e3:.0f} ms) and clip + Adam "
        f"({(other - none['data_s']) * 1e3:.0f} ms) alone hold it to at most "
        f"{none['matmul_s'] / (none['matmul_s'] + other):.2f} even if loss + backward ran at the matmuls' "
        f"isolated speed; loss + backward itself reaches {none['matmul_s'] / none['model_s']:.2f}. Its "
        f"{none['matmuls']} GEMMs take {none['matmul_s'] * 1e3:.0f} ms alone; the other {rest_ms:.0f} ms are "
        f"its {none['passes']} non-matmul passes over tensors of >= {batch} x {hidden} / 2 elements (counted; "
        f"most frequent: {top}), memory-bound on a CPU, plus whatever the GEMMs lose inside the step (operands "
        "from memory, not cache). Autograd differentiates the explicit gradient sweep op by op (there is no "
        "hand-derived adjoint), so each elementwise op of the sweep adds one or more passes to the backward.",
        f"- sampling: the spec's sampler needs {fast['gflop']:.1f} GFLOP on the fast path vs {slow['gflop']:.1f} "
        f"on the plain one ({slow['gflop'] / fast['gflop']:.2f}x fewer): per timestep "
        f"{sizes.sample_inner + 1} energy+gradient evaluations and 1 energy-only evaluation are irreducible "
        "(the proposal's energy and gradient are reused as the next start). Even at the isolated matmul speed "
        f"the fast path would take {fast['matmul_s']:.3f} s, a {slow['sample_s'] / fast['matmul_s']:.2f}x ceiling "
        f"against plain; it runs at {fast['matmul_s'] / fast['sample_s']:.2f} of that speed because its "
        f"{evaluations} evaluations also make {fast['passes']} non-matmul passes over [{sizes.sample_problems}, "
        f"{hidden}]-sized tensors (~{fast['passes'] / evaluations:.0f} each).",
    ]


def measure_levers(sizes: Sizes, steps: int, threads: int) -> dict:
    main = sizes.shapes[0]
    runs = []
    for lever, spec in LEVERS.items():
        for config in spec.runs_on:
            shape = (sizes.sample_rank, sizes.sample_problems) if config == "sample" else main
            print(f"lever {lever}: {config} ...", flush=True)
            runs.append({"lever": lever, "config": config, **run_worker(
                "lever", threads, lever=lever, config=config, rank=shape[0], batch=shape[1], hidden=sizes.hidden,
                inner_steps=sizes.sample_inner, steps=steps)})
    costs = {batch: run_worker("condition_cost", threads, rank=rank, batch=batch, hidden=sizes.hidden,
                               min_run_time=0.2)["condition_s"]
             for rank, batch in (main, (sizes.sample_rank, sizes.sample_problems))}
    return {"runs": runs, "condition_s": costs}


def lever_rows(levers: dict, results: list[dict], sampling: dict, sizes: Sizes) -> list[str]:
    (rank, batch), problems = sizes.shapes[0], sizes.sample_problems
    sampling_label = f"sampling {problems} x rank {sizes.sample_rank}"
    rows = ["| lever (fast path with vs without it) | measured on | with s | without s | gain |", "|---|---|---|---|---|"]
    for run in levers["runs"]:
        where = sampling_label if run["config"] == "sample" else f"{run['config']} step, rank {rank}, batch {batch}"
        rows.append(f"| {LEVERS[run['lever']].what} | {where} | {run['with_s']:.3f} | {run['without_s']:.3f} "
                    f"| {run['gain']:.2f}x |")
    adv = _by_shape(results, "adversarial", (rank, batch))["time"]["fast"]["step_s"]
    big, small = levers["condition_s"][batch], levers["condition_s"][problems]
    # energy calls per adversarial step: score, mining start, opt_steps proposals, stacked E+/E- = 3 + opt_steps;
    # per sampling timestep: denoise, opt_step start, inner proposals; all but one would recompute the condition
    train_calls, sample_calls = 2 + TRAIN_OPT_STEPS, 10 * (sizes.sample_inner + 1)
    rows.append(f"| condition (fc1 on x, FiLM) once per batch / timestep vs once per energy call: estimated from "
                f"condition() = {big * 1e3:.1f} ms at batch {batch}, {small * 1e3:.1f} ms at {problems} "
                f"| adversarial step ({train_calls} more calls) | {adv:.3f} | {adv + train_calls * big:.3f} "
                f"| {(adv + train_calls * big) / adv:.2f}x |")
    fast_sample = sampling["fast"]["sample_s"]
    rows.append(f"| (same) | sampling ({sample_calls} more calls) | {fast_sample:.3f} "
                f"| {fast_sample + sample_calls * small:.3f} | {(fast_sample + sample_calls * small) / fast_sample:.2f}x |")
    none = _by_shape(results, "none", (rank, batch))["time"]
    rows.append(f"| batched torch data vs per-sample numpy in a DataLoader | data per batch of {batch} "
                f"| {none['fast']['data_s']:.3f} | {none['plain']['data_s']:.3f} "
                f"| {none['plain']['data_s'] / none['fast']['data_s']:.2f}x |")
    return rows


def report(results: list[dict], sampling: dict, info: dict[str, str], sizes: Sizes, command: str, seconds: float,
           other_load: float, levers: dict | None) -> str:
    lines = [
        "# Throughput: fast library path vs straightforward implementation",
        "",
        f"Generated by `{command}` in {seconds:.0f} s.",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, {info['threads']} threads; "
        f"Python {info['python']}; {info['date']}",
        f"- other processes used {other_load:.0%} of one core on average during the run (on a shared machine, "
        "above a few percent timings are noisy and the OpenMP threads wait on each other).",
        "- impls: `plain` = tests/straightforward.py; `fast` = the library (a pack of one run, P = 1). Both "
        f"use the same weights; hidden {sizes.hidden}, adversarial mining with opt_steps {TRAIN_OPT_STEPS}.",
        "- s/step: median seconds per full training step (data + loss + backward + clip 1.0 + Adam), the two "
        "impls interleaved step by step on the same weights; speed-up = median of the per-step ratios; data s "
        "and model s (loss + backward) are the step's parts.",
        "- peak RSS: `ru_maxrss` of a fresh subprocess per row (imports, model, Adam, data, two steps); in "
        "brackets the RSS just before its first step.",
        "- GFLOP/step: the matmuls of loss + backward, recorded from the ops' shapes; matmul-bound s: the same "
        "matmuls timed alone at those shapes and layouts, in the same process; model/matmul FLOP/s = "
        "matmul-bound s / s per step (in brackets: / model s); matmuls, large passes: how many matmuls, and how "
        "many other non-view ops touching >= batch x hidden / 2 elements, loss + backward runs.",
        "",
        "## Training step",
        "",
        *train_rows(results),
        "",
        f"## Sampling ({sizes.sample_problems} rank-{sizes.sample_rank} problems, 10 timesteps x "
        f"{sizes.sample_inner} inner steps)",
        "",
        *sample_rows(sampling),
        "",
        "## Targets",
        "",
        *target_rows(results, sampling, sizes),
        "",
        "## What limits the targets that fall short",
        "",
        *limits(results, sampling, sizes),
        "",
    ]
    if levers:
        lines += [
            "## Levers",
            "",
            "Each lever timed as the fast path with it and, interleaved, with it reverted (a variant patched in from "
            "benchmarks/throughput.py); gain = median of the per-step ratios without / with.",
            "",
            *lever_rows(levers, results, sampling, sizes),
            "",
        ]
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    """Replace the throughput report in `path`, keeping the study-throughput sections appended after it."""
    kept = ""
    if path.exists():
        old = path.read_text()
        start = old.find(f"\n{STUDY_SECTION}")
        kept = old[start:] if start >= 0 else ""
    path.write_text(text.rstrip("\n") + "\n" + kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, few repeats: a smoke check of the script")
    parser.add_argument("--out", help="markdown report (default: benchmarks/results.md; none for --quick); "
                                      "study-throughput sections already in it are kept")
    parser.add_argument("--levers", action="store_true", help="with --quick: time the lever ablations too")
    parser.add_argument("--threads", type=int,
                        help="torch threads of every worker (default 2; 1 with --quick, whose toy ops gain nothing "
                             "from a second thread and wait for it on a busy machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](**spec)))
        return

    quick, started = args.quick, time.perf_counter()
    sizes = QUICK if quick else FULL
    busy_before, own_before = busy_cpu_seconds(), own_cpu_seconds()
    results = []
    for rank, batch in sizes.shapes:
        for strategy in STRATEGIES:
            big = batch >= 1024
            steps = 2 if quick else (15 if big else 40)
            shape = dict(strategy=strategy, rank=rank, batch=batch, hidden=sizes.hidden)
            print(f"timing {strategy}, rank {rank}, batch {batch} ...", flush=True)
            timing = run_worker("time_train", args.threads, **shape, steps=steps, warmup=1 if quick else 2,
                                matmul_time=0.01 if quick else 0.1)
            memory = {impl: run_worker("memory_train", args.threads, impl=impl, **shape, steps=2) for impl in IMPLS}
            results.append({**shape, "time": timing, "memory": memory})
    print("timing sampling ...", flush=True)
    sampling = run_worker("sample", args.threads, rank=sizes.sample_rank, problems=sizes.sample_problems,
                          hidden=sizes.hidden, inner_steps=sizes.sample_inner, repeats=2 if quick else 9,
                          matmul_time=0.01 if quick else 0.1)
    levers = measure_levers(sizes, 2 if quick else 8, args.threads) if args.levers or not quick else None
    seconds = time.perf_counter() - started
    other_load = max(0.0, (busy_cpu_seconds() - busy_before) - (own_cpu_seconds() - own_before)) / seconds
    command = "python benchmarks/throughput.py" + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    text = report(results, sampling, machine(args.threads), sizes, command.strip(), seconds, other_load, levers)
    print(text)
    out = args.out or (None if quick else str(ROOT / "benchmarks" / "results.md"))
    if out:
        write_report(Path(out), text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
