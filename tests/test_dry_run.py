"""The dry run's plan agrees with a real materialised model, and the paper configs hit
the published totals on the paper's device counts."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import tiny_config
from m6jax import aot, flops, plan, sharding
from m6jax.train.state import create_train_state

PAPER = {"m6_10b": (10e9, 8), "m6_100b": (100e9, 128), "m6_t_1t": (1e12, 480),
         "m6_10t": (10e12, 512)}
MESH = (1, 2, 2, 2)  # data, fsdp, tensor, expert: every sharding rule does something


def _small(moe: bool):
    c = tiny_config(**dict(zip(sharding.MESH_AXES, MESH)))
    c.data.update(image_size=8, patch_size=2, image_channels=1)
    if moe:
        from configs import m6_moe
        c.model.moe = m6_moe.moe_section(num_experts=4, router="prototype", k=2, every=2)
    return c


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def materialised(request, devices):
    c = _small(request.param)
    mesh = sharding.make_mesh(c.mesh, devices[:8])
    model, tx, example = plan.build(c)
    state, _ = create_train_state(model, tx, example, mesh, seed=0)
    return c, state, plan.plan(c, MESH)


def test_param_count_equals_the_materialised_model(materialised):
    c, state, p = materialised
    assert p["total_params"] == flops.count_params(state.params)
    if c.model.get("moe") is None:
        assert p["activated_params"] == p["total_params"]
    else:  # prototype k=2 of 4 experts: half the expert weights per token
        assert p["activated_params"] == p["total_params"] - p["expert_params"] // 2


def test_per_device_bytes_equal_the_actual_shards(materialised):
    _, state, p = materialised
    assert p["num_devices"] == 8
    assert p["per_device_bytes"]["params"] == sharding.per_device_bytes(state.params)
    assert p["per_device_bytes"]["optimizer"] == sharding.per_device_bytes(state.opt_state)
    # fsdp x tensor shards the big matrices 4 ways: far below the replicated size.
    assert p["per_device_bytes"]["params"] < 0.5 * 4 * p["total_params"]


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config_matches_published_total_and_device_count(name):
    target, devices = PAPER[name]
    p = plan.plan(importlib.import_module(f"configs.{name}").get_config())
    assert abs(p["total_params"] - target) <= 0.02 * target, p["total_params"]
    assert p["num_devices"] == devices
    assert p["activated_params"] <= p["total_params"]


@pytest.mark.parametrize("name", list(PAPER))
def test_tiny_variant_keeps_the_paper_structure(name):
    mod = importlib.import_module(f"configs.{name}")
    paper, tiny = mod.get_config("paper").model, mod.get_config("tiny").model
    assert tiny.remat_policy == paper.remat_policy
    if paper.get("moe") is None:
        assert tiny.get("moe") is None
    else:
        for f in ("router", "k", "every", "dispatch"):
            assert tiny.moe[f] == paper.moe[f], f
    assert plan.plan(mod.get_config("tiny"))["fits"]


@pytest.mark.parametrize("remat", ["full", pytest.param("none", marks=pytest.mark.slow)])
def test_planned_device_peak_is_within_25_percent_of_xla(remat):
    """The dense model's planned in-step peak against XLA's compiled step (arguments +
    temporaries + outputs not aliased to the donated state). MoE configs plan 25-28%
    low: see BENCHMARKS.md (XLA keeps update temporaries of the expert leaves)."""
    c = _small(moe=False)
    c.model.remat_policy = remat
    c.hardware = dict(num_devices=8, device_kind="cpu", device_memory_gb=1.0)
    small = aot.reduced_depth(c, 2)
    planned = plan.plan(small)["per_device_bytes"]
    x = aot.compile_memory(small)
    batch_bytes = x["xla_arguments"] - planned["params"] - planned["optimizer"]
    assert 0 <= batch_bytes < 0.05 * x["xla_arguments"], x  # the state is what the plan says
    xla_peak = x["xla_arguments"] + x["xla_temp"] + x["xla_outputs"] - x["xla_alias"]
    assert 0.75 <= planned["device_peak"] / xla_peak <= 1.25, (planned, x)


def test_aot_compile_agrees_with_the_analytic_state_bytes():
    c = _small(moe=True)
    c.hardware = dict(num_devices=8, device_kind="cpu", device_memory_gb=1.0)
    a = aot.compare(c, units=1)
    batch_bytes = a["xla_arguments"] - a["analytic_state"]
    assert 0 <= batch_bytes < 0.05 * a["analytic_state"], a
    # Measured here (jax 0.10.2, CPU): XLA's temp 445,520 B vs the plan's 437,504 B, a
    # ratio of 1.018. Within 5%: a plan that forgot a buffer or counted one twice is not.
    assert 0.95 < a["xla_temp"] / a["analytic_temp"] < 1.05, a


@pytest.mark.parametrize("name", ["m6_10t", "m6_t_1t"])
def test_cli_prints_the_json_contract_and_the_paper_configs_fit(name):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "experiments/dry_run.py",
                           f"--config=experiments/configs/{name}.py", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["fits"] is True and r["num_devices"] == PAPER[name][1]
    assert set(r["per_device_bytes"]) == {"params", "gradients", "optimizer", "activations",
                                          "host", "device_peak"}
    for key in ("total_params", "per_node_host_bytes", "transfer_s_per_step",
                "compute_s_per_step"):
        assert r[key] > 0, key
    b = r["per_device_bytes"]
    assert b["device_peak"] == b["params"] + b["gradients"] + b["optimizer"] + b["activations"]
    assert b["device_peak"] <= 32 * 2**30 < b["device_peak"] + b["host"]  # offload is needed
    assert r["per_node_host_bytes"] == 8 * b["host"] <= r["host_memory_gb_per_node"] * 2**30


def test_streamed_units_in_flight_replace_the_offloaded_state_on_the_device():
    """Offloading every layer leaves the non-stack state plus two units in flight."""
    def planned(**off):
        c = _small(moe=False)
        c.model.num_layers = 8
        c.offload.update(**off)
        return plan.plan(c, MESH)["per_device_bytes"]
    full, off = planned(), planned(param_layers="all", optimizer_layers="all")
    c = _small(moe=False)
    c.model.num_layers = 8
    a = plan.abstract_state(c)
    stack = plan.sharded_bytes(a.params["stack"], plan.abstract_mesh(MESH))
    opt_stack = full["optimizer"] - (full["params"] - stack) * 2  # AdamW: mu + nu
    unit = stack / 8
    assert off["params"] == pytest.approx(full["params"] - stack + 2 * unit, rel=1e-6)
    assert off["gradients"] == off["params"]
    assert off["optimizer"] == pytest.approx(full["optimizer"] - opt_stack + 2 * opt_stack / 8,
                                             rel=1e-3)
    assert off["host"] == pytest.approx(2 * stack + opt_stack, rel=1e-3)  # params, grads, moments
