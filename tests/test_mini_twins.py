"""Every paper config has a `mini` twin with the same training choices, and it learns.

The fast tests check the twin keeps the paper variant's choices field by field and that
its config passes the checks on 8 devices. The slow ones train each twin as a user runs
it (`experiments/pretrain.py --config=...:mini`, 8 fake CPU devices) next to the same
shape trained with the quickstart's recipe (`:mini_reference`), and ask that the twin
learns (eval loss >= 1.5 nats under the initial one; a Pseudo-to-Real run ends Real)
and is no more than 0.08 nat behind the reference. At the twins' 60 steps the optimizer
bug of issue 25 (weight decay after the learning rate: the `decay_after_lr` mutation)
puts m6_10t:mini 0.150 nat behind its reference with a 1.58-nat drop; the clean twins
are within 0.02 of theirs (BENCHMARKS.md, "Mini twins").
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

from m6jax.config_checks import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ["m6_10b", "m6_100b", "m6_t_1t", "m6_10t"]
# What a mini twin must keep from its paper variant (the training choices).
KEPT = {
    "optimizer": ["name", "b1", "b2", "weight_decay", "grad_clip_norm", "end_lr_fraction",
                  "decay_rate", "min_dim_size_to_factor", "grad_accum_steps"],
    "model": ["dtype", "param_dtype", "remat_policy", "share_layers", "mlp_activation",
              "dropout_rate", "tie_embeddings", "image_encoder"],
    "offload": ["param_layers", "optimizer_layers"],
    "pseudo_to_real": ["optimizer", "lr_schedule", "switch_warmup_steps"],
}
MOE_KEPT = ["router", "k", "every", "capacity_factor", "eval_capacity_factor", "dispatch",
            "priority", "aux_loss_weight", "z_loss_weight", "jitter"]


def _configs(name):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config("paper"), module.get_config("mini")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_mini_twin_keeps_the_paper_training_choices(name):
    paper, mini = _configs(name)
    for section, fields in KEPT.items():
        for f in fields:
            assert mini[section].get(f) == paper[section].get(f), f"{section}.{f}"
    for axis in ("data", "fsdp", "tensor", "expert", "stage"):  # the same axes split
        assert (mini.mesh[axis] > 1) == (paper.mesh[axis] > 1), axis
    if paper.model.get("moe"):
        for f in MOE_KEPT:
            assert mini.model.moe[f] == paper.model.moe[f], f"model.moe.{f}"
        per_device = paper.model.moe.num_experts // paper.mesh.expert
        assert mini.model.moe.num_experts == per_device * mini.mesh.expert
        seq = lambda c: (c.data.image_size // c.data.patch_size) ** 2 + c.data.text_len
        assert mini.model.moe.group_size // seq(mini) == paper.model.moe.group_size // seq(paper)
    frac = lambda c, n: n / c.total_steps
    assert frac(mini, mini.optimizer.warmup_steps) == pytest.approx(
        frac(paper, paper.optimizer.warmup_steps), abs=0.01)
    assert frac(mini, mini.pseudo_to_real.switch_step) == pytest.approx(
        frac(paper, paper.pseudo_to_real.switch_step), abs=0.01)
    validate_config(mini, 8)


def _train(name, variant, workdir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "experiments/pretrain.py",
                        f"--config=experiments/configs/{name}.py:{variant}",
                        f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_mini_twin_learns_close_to_the_quickstart_recipe(name, tmp_path):
    twin = _train(name, "mini", tmp_path / "mini")
    ref = _train(name, "mini_reference", tmp_path / "reference")
    assert twin["stage"] == "real"
    assert twin["eval_loss"] <= twin["initial_eval_loss"] - 1.5, twin
    assert twin["eval_loss"] <= ref["eval_loss"] + 0.08, (twin["eval_loss"], ref["eval_loss"])
