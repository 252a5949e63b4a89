"""MoE config fields refused before compiling, naming the field; the dry run's routing plan."""
import pytest

from m6jax.config_checks import validate_config
from m6jax.model.moe.dispatch import expert_capacity, uniform_drop_fraction


def _config(**mesh):
    from configs.m6_moe import moe_section
    from helpers import tiny_config
    c = tiny_config(**mesh)
    c.model.moe = moe_section(num_experts=8, every=2)
    return c


@pytest.mark.parametrize("mesh, edit, message", [
    (dict(data=8), dict(group_size=20),
     r"model.moe.group_size=20 must be >= 0 and divide the tokens per device and microbatch, 28"),
    (dict(data=8), dict(priority="random"), r"model.moe.priority='random' is not one of order, score"),
    (dict(data=2, fsdp=2, expert=2), dict(dispatch="dropless"),
     r"model.moe.dispatch='dropless' \(dropless\) with mesh.expert=2 needs mesh.fsdp=1"),
    (dict(data=2, tensor=2, expert=2), dict(dispatch="ragged_dot"),
     r"model.moe.dispatch='ragged_dot' \(dropless\) with mesh.expert=2 needs mesh.fsdp=1 and "
     r"mesh.tensor=1"),
    (dict(data=2, expert=4), dict(dispatch="grouped"),
     r"model.moe.dispatch='grouped' runs each device's tokens through all experts "
     r"\(mesh.expert=4, mesh.stage=1 must be 1\)"),
    (dict(data=2, expert=4), dict(dispatch="capacity"),   # grouped on this CPU
     r"model.moe.dispatch='capacity' \(grouped here\) runs each device's tokens through all"),
])
def test_bad_moe_routing_fields_are_refused_naming_the_field(mesh, edit, message):
    c = _config(**mesh)
    c.model.moe.update(edit)
    with pytest.raises(ValueError, match=message):
        validate_config(c, 8)


@pytest.mark.parametrize("mesh, edit, message", [
    (dict(data=4, tensor=2), dict(dispatch="grouped"),
     r"model.moe.dispatch='grouped' with mesh.tensor=2 would hold every expert whole"),
    (dict(data=4, tensor=2), dict(dispatch="blocked"),
     r"model.moe.dispatch='blocked' with mesh.tensor=2 would hold every expert whole"),
    (dict(data=4, expert=2), dict(dispatch="blocked", peer_capacity_factor=-1.0),
     r"model.moe.peer_capacity_factor=-1.0 must be >= 0"),
])
def test_sorting_dispatch_under_tensor_and_a_negative_peer_factor_are_refused(mesh, edit,
                                                                             message):
    c = _config(**mesh)
    c.model.moe.update(edit)
    with pytest.raises(ValueError, match=message):
        validate_config(c, 8)


def test_routing_groups_must_fit_a_pipeline_microbatch():
    # 8 examples of 28 tokens over 4 batch shards: 56 tokens per device, but each of the
    # 2 pipeline microbatches routes 28 of them, so a 56-token group would span both.
    c = _config(stage=2, data=4)
    c.model.num_layers = 4
    c.pipeline.microbatches = 2
    c.model.moe.group_size = 56
    with pytest.raises(ValueError, match=r"model.moe.group_size=56 must be >= 0 and divide the "
                       r"tokens per device and microbatch, 28 .*pipeline.microbatches=2"):
        validate_config(c, 8)
    c.model.moe.group_size = 28
    validate_config(c, 8)


def test_good_groups_and_dropless_on_a_data_expert_mesh_pass():
    c = _config(data=2, expert=4)
    c.model.moe.update(group_size=14, priority="score", dispatch="blocked")
    assert validate_config(c, 8) == (2, 1, 1, 4, 1)  # data, fsdp, tensor, expert, stage


def test_uniform_drop_fraction_matches_the_paper_configs_numbers():
    # One 324-token example per group, E = 512, cf 1.25: C = 1 and ~26% drop (issue #14).
    assert expert_capacity(324, 1, 512, 1.25) == 1
    assert uniform_drop_fraction(324, 1, 512, 1) == pytest.approx(0.2585, abs=1e-3)
    assert uniform_drop_fraction(324, 4, 960, 2) == pytest.approx(0.161, abs=1e-3)
    # Hand-computed: 2 tokens, 2 experts, C = 1: both pick the same expert w.p. 1/2 and
    # one of the 2 choices drops, so 1/4 of the choices.
    assert uniform_drop_fraction(2, 1, 2, 1) == pytest.approx(0.25)
    assert uniform_drop_fraction(10, 1, 8, 10) == 0.0


@pytest.mark.parametrize("name", ["m6_100b", "m6_10t", "m6_t_1t"])
def test_paper_configs_plan_under_two_percent_uniform_drop(name):
    import importlib
    from m6jax import plan
    c = importlib.import_module(f"configs.{name}").get_config("paper")
    r = plan.moe_routing_plan(c)
    assert r["capacity_per_expert"] >= plan.MIN_CAPACITY and r["warning"] is None
    assert r["uniform_drop_fraction"] < 0.02


def test_dry_run_warns_when_capacity_is_below_four():
    from configs import m6_100b
    from m6jax import plan
    c = m6_100b.get_config("paper")
    c.model.moe.update(group_size=0, capacity_factor=1.25)   # one example per group
    r = plan.moe_routing_plan(c)
    assert r["capacity_per_expert"] == 1 and r["uniform_drop_fraction"] > 0.25
    assert "moe.capacity_per_expert=1 < 4" in r["warning"]


def test_capacity_dispatch_is_the_backends_capacity_path():
    """`capacity` (m6_moe:tiny's default) is grouped on CPU, gather on GPU/TPU, or what
    model.kernels names; an expert mesh on CPU is refused as grouped is, but not on GPU."""
    from m6jax import kernels
    from m6jax.model.moe.layer import capacity_impl
    assert capacity_impl("capacity") == "grouped"
    assert capacity_impl("capacity", "capacity=einsum") == "einsum"
    assert capacity_impl("gather") == "gather"
    with kernels.lowering_for("cuda"):
        assert capacity_impl("capacity") == "gather"
        c = _config(data=2, expert=4)
        c.model.moe.dispatch = "capacity"
        validate_config(c, 8)
    with kernels.lowering_for("tpu"):
        assert capacity_impl("capacity") == "gather"
    from configs.m6_moe import get_config
    assert get_config("tiny").model.moe.dispatch == "capacity"
