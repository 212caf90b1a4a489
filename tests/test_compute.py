"""Compute is measured, not counted: FLOPs per step against a count from the shapes, FLOP budgets, the EMA."""
import json
import math

import pytest
import torch

import train
from diffusion_lib.harness.trainer import make_ema, restore_ema_step

RANK, HIDDEN, BATCH, T, TIME = 3, 16, 8, 10, 128


def tiny_config(tmp_path, **overrides):
    return train.build_config({
        "task.rank": RANK, "model.hidden_dim": HIDDEN, "train.batch_size": BATCH, "train.steps": 12,
        "train.log_every": 4, "train.save_every": 100, "eval.every": 100, "eval.num_samples": 16,
        "device": "cpu", "results_dir": str(tmp_path / "run"), **overrides,
    })


def expected_flops(strategy: str, opt_steps: int = 2) -> int:
    """Matmul FLOPs of one training step, counted by hand from the spec's shapes (2 m n k per product).

    Forward: the time path on the T timesteps (two 128x128 layers, two 128 -> 2H FiLM maps), fc1 on x, the
    energy E (fc1 on y, fc2, fc3, fc4) and its explicit input gradient (the same four products, transposed).
    Backward: every product gives one more for each operand that needs a gradient (weights always; inputs
    unless they are data: the sinusoidal features, x, the noised y). The data: U U^T and L^-T L^-1 per problem.
    """
    d = din = RANK * RANK
    b, h = BATCH, HIDDEN
    energy = 2 * b * (d * h + 2 * h * h + h * d)  # one E forward over b answers
    time_path = 2 * T * TIME * TIME * 2 + 2 * T * TIME * 2 * h * 2
    forward = time_path + 2 * b * din * h + 2 * energy  # E and its gradient sweep
    backward = (
        2 * T * TIME * TIME * (1 + 2) + 2 * T * TIME * 2 * h * 2 * 2  # time_mlp.1 (weight only), .3, FiLM maps
        + 2 * b * din * h  # fc1 on x: weight only
        + 2 * b * d * h + 2 * 2 * (2 * b * h * h) + 2 * (2 * b * h * d)  # E: fc1 on y (weight only), fc2, fc3, fc4
        + 2 * energy  # the gradient sweep: both operands of all four products
    )
    flops = 2 * 2 * b * RANK**3 + forward + backward
    if strategy == "none":
        return flops
    pair = 2 * energy  # E+ and E- stacked: forward over 2b answers
    flops += pair + 2 * pair - 2 * (2 * b) * d * h  # backward: both operands, but fc1 on y (weight only)
    if strategy == "adversarial":  # mining, no graph: E and gradient per step, plus E at the last proposal
        flops += 2 * energy * opt_steps + energy
    return flops


@pytest.mark.parametrize("strategy, opt_steps", [("none", 2), ("random", 2), ("adversarial", 2), ("adversarial", 5)])
def test_flops_per_step_match_a_count_from_the_shapes(tmp_path, strategy, opt_steps):
    config = tiny_config(tmp_path, **{"mining.strategy": strategy, "mining.opt_steps": opt_steps})
    task = train.create_dataset(config)
    trainer = train.create_trainer(config, train.create_diffusion_model(config, task), task)
    trainer.measure_flops()
    assert trainer.flops_per_step == expected_flops(strategy, opt_steps)


def test_the_reference_setup_costs_what_its_shapes_say(tmp_path):
    """At rank 20, batch 2048, hidden 512 the measured FLOPs match the count, and fix the ratios
    none : random : adversarial at 1 : 1.89 : 2.69 (README)."""
    global RANK, HIDDEN, BATCH
    saved = RANK, HIDDEN, BATCH
    RANK, HIDDEN, BATCH = 20, 512, 2048
    try:
        measured = {}
        for strategy in ("none", "random", "adversarial"):
            config = tiny_config(tmp_path / strategy, **{"mining.strategy": strategy})
            task = train.create_dataset(config)
            trainer = train.create_trainer(config, train.create_diffusion_model(config, task), task)
            trainer.measure_flops()
            measured[strategy] = trainer.flops_per_step
            assert measured[strategy] == expected_flops(strategy)
    finally:
        RANK, HIDDEN, BATCH = saved
    assert measured["none"] == pytest.approx(23.87e9, rel=1e-3)
    assert measured["random"] / measured["none"] == pytest.approx(1.89, abs=0.005)
    assert measured["adversarial"] / measured["none"] == pytest.approx(2.69, abs=0.005)


def test_a_budget_run_trains_to_its_flop_budget(tmp_path):
    probe = tiny_config(tmp_path, **{"mining.strategy": "random"})
    per_step = expected_flops("random")
    budget = 7.5 * per_step  # between steps 7 and 8: the run takes the 8th
    config = tiny_config(tmp_path, **{"mining.strategy": "random", "train.budget_flops": budget, "train.steps": 1000})
    task = train.create_dataset(config)
    [final] = train.create_trainer(config, train.create_diffusion_model(config, task), task).train()
    assert final["step"] == math.ceil(budget / per_step) == 8
    assert final["budget_flops"] == budget and final["flops_per_step"] == per_step
    assert 0 <= final["train_flops"] - budget < per_step  # within one step of the budget
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["flops"] for r in records if r["kind"] == "train"] == [4 * per_step, 8 * per_step]
    assert probe.train.budget_flops == 0  # off by default


def test_ema_follows_the_reference_warm_up():
    """ema-pytorch's schedule with the config's defaults (beta 0.995, update_after_step 100, power 2/3, every
    10): a copy up to step 100, then decay 1 - (1 + (step - 100))^(-2/3), capped at beta; it reaches 0.995
    only at step 100 + 2828. ema-pytorch computes the decay in float32: hence the tolerances."""
    model = torch.nn.Linear(2, 2)
    ema = make_ema(model, train.build_config({}).train)

    def decay(step):  # the decay of the update made after `step` optimiser steps
        restore_ema_step(ema, step)
        ema.step += 1  # ema-pytorch reads its count after counting the update
        return ema.get_current_decay()

    assert decay(0) == decay(100) == 0.0
    assert decay(110) == pytest.approx(0.79782, abs=1e-5)  # 1 - exp(-2/3 ln 11) = 1 - exp(-1.59861)
    assert decay(2900) == pytest.approx(1 - 2801 ** (-2 / 3)) and decay(2900) < 0.995
    assert decay(2950) == pytest.approx(0.995, rel=1e-8)  # float32(0.995)
    with torch.no_grad():
        model.weight.fill_(1.0)
    restore_ema_step(ema, 105)
    ema.update()  # not a multiple of 10: nothing happens
    assert not torch.equal(ema.ema_model.weight, model.weight)
    restore_ema_step(ema, 100)
    ema.update()  # warm-up: a copy
    assert torch.equal(ema.ema_model.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    restore_ema_step(ema, 110)
    ema.update()  # 1 + (3 - 1) * (1 - decay)
    torch.testing.assert_close(ema.ema_model.weight, torch.full((2, 2), 1 + 2 * 11 ** (-2 / 3)))


def test_a_resumed_packs_ema_is_the_uninterrupted_ones_and_scoring_reads_it(tmp_path):
    """A pack of two runs shares one EMA count; resumed from a checkpoint mid-warm-up, the EMA weights and
    count are those of the run that never stopped. The held-out score called EMA is the averaged model's."""
    ema_keys = {"train.ema_update_after_step": 4, "train.ema_every": 2, "train.steps": 12, "train.save_every": 6}

    def pack(folder, **overrides):
        configs = [tiny_config(tmp_path / folder / f"seed{seed}", seed=seed, **{**ema_keys, **overrides}) for seed in (0, 1)]
        task = train.create_dataset(configs[0])
        return configs, task

    def trainer_for(folder, resume=False, **overrides):
        configs, task = pack(folder, **overrides)
        return train.create_trainer(configs, train.create_diffusion_model(configs, task), task, resume=resume)

    whole = trainer_for("whole")
    whole.train()
    trainer_for("split", **{"train.steps": 7}).train()  # its last checkpoint: step 7, between two EMA updates
    resumed = trainer_for("split", resume=True)
    resumed.train()
    assert int(whole.ema.step) == int(resumed.ema.step) == 12  # one count for the pack: one update per step
    for got, want in zip(resumed.ema.ema_model.parameters(), whole.ema.ema_model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    online = whole.accelerator.unwrap_model(whole.model)
    assert not all(torch.equal(a, b) for a, b in zip(whole.ema.ema_model.parameters(), online.parameters()))
    evaluate = whole.evaluator.evaluate
    assert evaluate() == evaluate(whole.ema.ema_model) != evaluate(online)


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path):
    """No .item() / .tolist() / bool() on a tensor during a step (on a GPU each one waits for the device);
    Adam's step counts, kept on the host by torch, and ema-pytorch's update count, kept on the host by
    ema-pytorch (the trainer never moves it), are the only host reads allowed."""
    config = tiny_config(tmp_path, **{"mining.strategy": "adversarial"})
    task = train.create_dataset(config)
    trainer = train.create_trainer(config, train.create_diffusion_model(config, task), task)
    trainer.train_step()  # Adam creates its state on the first step
    host_counters = {id(state["step"]) for state in trainer.optimizer.state.values()}
    assert trainer.ema.step.device.type == trainer.ema.initted.device.type == "cpu"
    host_counters |= {id(trainer.ema.step), id(trainer.ema.initted)}
    reads = []

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            if id(self) not in host_counters:
                reads.append(name)
            return original(self, *args)

        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, recording(name))
        for _ in range(3):
            trainer.train_step()
    assert reads == []


def test_a_budget_run_resumes_past_its_train_steps(tmp_path):
    """A FLOP budget sets the run's length: train.steps (here 1) must not make its resume look shrinking."""
    per_step = expected_flops("random")
    config = tiny_config(tmp_path, **{"mining.strategy": "random", "train.budget_flops": 3.5 * per_step,
                                      "train.steps": 1})
    task = train.create_dataset(config)
    [final] = train.create_trainer(config, train.create_diffusion_model(config, task), task).train()
    assert final["step"] == 4
    again = train.create_trainer(config, train.create_diffusion_model(config, task), task, resume=True)
    [resumed] = again.train()
    assert resumed == final
