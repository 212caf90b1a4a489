"""One-off: the training step of the library at 828f363 (the last commit with the hand-derived adjoint) vs now.

    python benchmarks/adjoint_then_and_now.py            # rank 20, batch 2048, none and adversarial, P = 1
    python benchmarks/adjoint_then_and_now.py --quick    # smoke check at toy sizes

The hand-derived adjoint (a custom autograd Function giving the energy's and grad_y E's parameter
gradients in one sweep) was removed when runs were packed, because it no longer paid for itself. This
script re-measures that. The old commit is checked out in its own git worktree (created on first use,
`git worktree add --detach`), and each measurement is a fresh subprocess importing `diffusion_lib`
from one tree or the other: a warm-up, then the median of N full training steps (data + loss +
backward + clip 1.0 + Adam, the same step code for both trees). Runs alternate A B A B ... (A = then,
B = now); the ratio is the median over the pairs (A_i, B_i) of then / now seconds, so > 1 means the
current library is faster. The old tree is a library of its own time: besides the adjoint it differs in
everything else that changed since (packing, the explicit gradient sweep's form, ...); both run one
unpacked model on [B, dim] batches through `diffusion(x, y, generator=g)`, which both versions accept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THEN = "828f363"
STRATEGIES = ("none", "adversarial")


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def old_tree(path: Path, commit: str) -> Path:
    """A clean checkout of `commit` at `path`, made as a detached worktree if it is not there yet."""
    if not path.exists():
        git("worktree", "add", "--detach", str(path), commit)
    expected, head = git("rev-parse", f"{commit}^{{commit}}"), git("rev-parse", "HEAD", cwd=path)
    if head != expected:
        raise SystemExit(f"{path} is at {head[:10]}, not {commit}: remove it (git worktree remove {path}) or pass --tree")
    if git("status", "--porcelain", "--untracked-files=no", cwd=path):
        raise SystemExit(f"{path} has local changes: it would not measure {commit}")
    return path


# -- one measurement, in a fresh process ------------------------------------------------------------
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Import diffusion_lib from spec['root'] and time its full training step."""
    sys.path.insert(0, spec["root"])
    import torch

    import diffusion_lib
    from diffusion_lib import EBM, EnergyDenoiser, GaussianDiffusion1D
    from diffusion_lib.tasks import make_task

    if not Path(diffusion_lib.__file__).resolve().is_relative_to(Path(spec["root"]).resolve()):
        raise RuntimeError(f"imported {diffusion_lib.__file__}, not the library in {spec['root']}")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rank, batch = spec["rank"], spec["batch"]
    ebm = EBM(make_task({"dataset": "inverse", "rank": rank}), hidden_dim=spec["hidden"])  # now a pack of one run, then unpacked
    mining = {"strategy": spec["strategy"], "opt_steps": 2}
    diffusion = GaussianDiffusion1D(EnergyDenoiser(ebm), mining_config=mining)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    task, generator = make_task({"dataset": "inverse", "rank": rank}), torch.Generator().manual_seed(0)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        x, y, _ = task.sample(batch, generator)
        model_start = time.perf_counter()
        loss, _ = diffusion(x, y, generator=generator)
        loss.backward()
        model_s = time.perf_counter() - model_start
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, model_s

    for _ in range(spec["warmup"]):
        step()
    steps = [step() for _ in range(spec["steps"])]
    return {"step_s": statistics.median(s for s, _ in steps), "model_s": statistics.median(m for _, m in steps)}


def measure(root: Path, **spec: Any) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"root": str(root), **spec})]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement in {root} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(f"/tmp/ired-{THEN}"),
                        help=f"worktree of {THEN} (created if missing; default /tmp/ired-{THEN})")
    parser.add_argument("--pairs", type=int, default=5, help="A B pairs of subprocess runs per strategy (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per subprocess (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads per subprocess (default 2; 1 with --quick, whose "
                                                    "toy ops only wait for a second thread on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and few steps: a smoke check")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    args.threads = args.threads or (1 if args.quick else 2)
    then_root = old_tree(args.tree, THEN)
    sizes = dict(rank=3, batch=64, hidden=32) if args.quick else dict(rank=20, batch=2048, hidden=512)
    pairs, steps, warmup = (2, 3, 1) if args.quick else (args.pairs, args.steps, args.warmup)
    trees = {"then": then_root, "now": ROOT}
    print(f"then = {THEN} ({then_root}), now = {git('rev-parse', '--short', 'HEAD')} ({ROOT}, uncommitted "
          f"changes included); {sizes}, {pairs} pairs x {steps} steps after {warmup} warm-up, "
          f"{args.threads} threads", flush=True)
    rows = []
    for strategy in STRATEGIES:
        runs: dict[str, list[dict[str, Any]]] = {"then": [], "now": []}
        for i in range(pairs):
            for name, root in trees.items():  # A B A B ...
                runs[name].append(measure(root, strategy=strategy, threads=args.threads, steps=steps,
                                          warmup=warmup, **sizes))
            print(f"{strategy} pair {i + 1}/{pairs}: then {runs['then'][-1]['step_s']:.3f} s, "
                  f"now {runs['now'][-1]['step_s']:.3f} s", flush=True)
        median = {name: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "model_s")}
                  for name, rs in runs.items()}
        ratio = {key: statistics.median(a[key] / b[key] for a, b in zip(runs["then"], runs["now"]))
                 for key in ("step_s", "model_s")}
        rows.append(f"| {strategy} | {median['then']['step_s']:.3f} | {median['now']['step_s']:.3f} "
                    f"| {ratio['step_s']:.2f}x | {median['then']['model_s']:.3f} | {median['now']['model_s']:.3f} "
                    f"| {ratio['model_s']:.2f}x |")
    print()
    print(f"Training step, rank {sizes['rank']}, batch {sizes['batch']}, hidden {sizes['hidden']}, P = 1, "
          f"{args.threads} threads: then = {THEN} (hand-derived adjoint), now = the working tree; medians over "
          f"{pairs} subprocess pairs of each one's median of {steps} steps; then / now > 1: now is faster.")
    print()
    print("| strategy | then s/step | now s/step | then / now | then loss+backward s | now loss+backward s "
          "| then / now |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n(command: " + " ".join(["python benchmarks/adjoint_then_and_now.py", *argv]) + ")")


if __name__ == "__main__":
    main()
