"""Granular host offload: which arrays live in pinned host memory, that streaming them
through the step changes nothing about training (the same losses, the same state), and
that the compiled step moves one unit at a time inside the layer loop."""
import re

import jax
import numpy as np
import pytest

from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import offload, plan, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.offload_layout import Segments, for_disk
from m6jax.train import stages
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_train_step

STEPS = 3


def _config(optimizer_layers="none", param_layers="none", moe=False, optimizer="adamw", **mesh):
    c = tiny_config(**(mesh or dict(data=2)))
    c.model.num_layers = 4
    c.optimizer.name = optimizer
    c.offload.update(optimizer_layers=optimizer_layers, param_layers=param_layers)
    if moe:
        c.model.moe = tiny_moe()
    return c


def tiny_moe():
    from configs import m6_moe
    return m6_moe.moe_section(router="topk", k=1, every=2, num_experts=4, capacity_factor=2.0)


def _setup(c, devices, stage=p2r.STAGE_REAL):
    mesh = sharding.make_mesh(c.mesh, devices[:int(np.prod(list(dict(c.mesh).values())))])
    model, tx = stages.model_and_optimizer(c, stage)
    example = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)
    state, sh = create_train_state(model, tx, example, mesh, seed=0)
    plan = offload.OffloadPlan(c, stage, sh, abstract_train_state(model, tx, example, mesh)[0])
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS, offload=plan)
    return mesh, state, plan, step


def _train(c, devices):
    """Losses of STEPS steps, the final stored state and its plan (Real model)."""
    mesh, state, plan, step = _setup(c, devices)
    losses = []
    with jax.set_mesh(mesh):
        state = plan.to_stored(state)
        for i in range(STEPS):
            state, m = step(state, sharding.global_batch(mesh, synthetic_batch(8, seed=i)))
            losses.append(float(m["loss"]))
        canonical = for_disk(state)
    return losses, state, canonical


def _assert_same_training(run, ref, exact):
    (losses, _, state), (ref_losses, _, ref_state) = run, ref
    if exact:
        assert losses == ref_losses
    else:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        # Adam turns float noise in near-zero gradients into noise of ~lr * 1e-2; a wrong
        # update (unclipped, a stale moment) is off by ~lr = 2e-3.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)


@pytest.fixture(scope="module")
def no_offload(devices):
    return _train(_config(), devices)


@pytest.fixture(scope="module")
def offloaded(devices):
    """Params of every layer and optimizer state of layers 1 and 3 in host memory."""
    return _train(_config(optimizer_layers="1,3", param_layers="all"), devices)


def test_chosen_units_live_in_pinned_host_memory(offloaded):
    _, state, _ = offloaded
    query = state.params["stack"]["layers"]["attn"]["query"]
    assert isinstance(query, Segments) and len(query.parts) == 4  # runs: 0 | 1 | 2 | 3
    assert [p.sharding.memory_kind for p in query.parts] == ["pinned_host"] * 4
    mu = state.opt_state[1][0].mu["stack"]["layers"]["attn"]["query"]
    assert [p.sharding.memory_kind for p in mu.parts] == [
        "device", "pinned_host", "device", "pinned_host"]
    assert state.params["token_emb"]["embedding"].sharding.memory_kind == "device"
    assert sharding.per_device_bytes(state, "pinned_host") > 0


def test_streamed_offload_gives_the_same_losses_and_state(no_offload, offloaded):
    _assert_same_training(offloaded, no_offload, exact=False)


def test_granular_offload_on_one_device_gives_the_same_training(no_offload, devices):
    """Layers 0, 2's optimizer state and layer 1's params offloaded, on 1 device, against
    the 2-device run without offload (the same function on any mesh)."""
    _assert_same_training(_train(_config("0,2", "1", data=1), devices), no_offload,
                          exact=False)


@pytest.mark.slow
def test_streamed_moe_on_an_fsdp_expert_mesh_equals_no_offload(devices):
    mesh = dict(data=1, fsdp=2, tensor=1, expert=2)
    ref = _train(_config(moe=True, **mesh), devices)
    _assert_same_training(_train(_config("all", "1", moe=True, **mesh), devices), ref,
                          exact=False)


# ---- The compiled step's structure. CPU lowers a memory-space move to nothing (device
# and host are the same RAM), so the step is lowered for CUDA, where each move is an
# `annotate_device_placement` custom call (nothing is compiled or run for CUDA).
_PLACEMENT = re.compile(r'annotate_device_placement\((%[\w#]+)\).*?_xla_buffer_placement = '
                        r'"(\w+)".*?: \(tensor<([\dx]+)x?\w+>\)')


def _cuda_stablehlo(c, devices):
    mesh, state, plan, step = _setup(c, devices)
    with jax.set_mesh(mesh):
        stored = jax.eval_shape(plan.store, state)
        stored = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              stored, plan.stored_shardings)
        batch = sharding.global_batch(mesh, synthetic_batch(8))
        text = step.trace(stored, batch).lower(lowering_platforms=("cuda",)).as_text()
    return text, plan


def _functions(text):
    """name -> body of each func.func in a StableHLO module."""
    parts = re.split(r"\n  func\.func (?:public|private) @", text)
    return {p.split("(", 1)[0]: p for p in parts[1:]}


def _moves(body, with_operand=False):
    out = [(kind, tuple(int(d) for d in shape.split("x") if d.isdigit()), operand)
           for operand, kind, shape in _PLACEMENT.findall(body)]
    return out if with_operand else [m[:2] for m in out]


def test_compiled_step_streams_one_unit_per_loop_iteration(devices):
    """Every offloaded leaf crosses between host and device only as one unit ([D, ...],
    no layer axis), inside functions called from the layer loops' bodies; no move of a
    whole stack ([units, D, ...]) exists, before the loop or after it. The step of the
    earlier offload (the whole stack loaded before the step) fails this."""
    c = _config(optimizer_layers="all", param_layers="all")
    text, plan = _cuda_stablehlo(c, devices)
    funcs = _functions(text)
    query_shape = (32, 4, 8)  # one unit of attn/query: [emb_dim, heads, head_dim]
    units = plan.units
    moves = {name: _moves(body) for name, body in funcs.items()}
    everything = [m for ms in moves.values() for m in ms]
    whole = (units, *query_shape)
    assert ("device", whole) not in everything, "a whole offloaded stack came to the device"
    assert ("device", query_shape) in everything and ("pinned_host", query_shape) in everything
    # The only whole-stack host placements are the step's outputs, taken as they leave a
    # loop whose iterations already wrote each unit to the host (`%N#k`: a while result).
    for kind, shape, operand in _moves(funcs["main"], with_operand=True):
        if shape == whole:
            assert kind == "pinned_host" and "#" in operand
    # The moves sit in functions that the while loops call (the scanned bodies).
    # (main's own statements are indented 4 spaces; those inside a while region more)
    called = set(re.findall(r"\n {6,}[^\n]*func\.call @(\w+)", funcs["main"]))
    moving = {name for name, ms in moves.items() if any(s == query_shape for _, s in ms)}
    assert moving and moving <= _closure(called, funcs)


def _closure(names, funcs):
    out, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in out or n not in funcs:
            continue
        out.add(n)
        todo += re.findall(r"func\.call @(\w+)", funcs[n])
    return out


@pytest.mark.parametrize("value,message", [
    ("0,7", "offload.optimizer_layers='0,7': layer 7 is not in [0, model.num_layers=4)"),
    ("first", "offload.optimizer_layers='first' must be 'none', 'all' or layer indices"),
])
def test_bad_layer_lists_are_refused(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        offload.parse_layers(value, 4, "offload.optimizer_layers")


def test_layer_lists_parse():
    assert offload.parse_layers("all", 3, "f") == (0, 1, 2)
    assert offload.parse_layers("none", 3, "f") == ()
    assert offload.parse_layers("2, 0", 3, "f") == (0, 2)
    assert offload.parse_layers([1], 3, "f") == (1,)


def test_a_backend_without_pinned_host_memory_is_refused(monkeypatch):
    class Mem:
        kind = "device"

    class Dev:
        platform = "fakeaccel"

        def addressable_memories(self):
            return [Mem()]
    with pytest.raises(ValueError, match=r"offload.param_layers='all': the fakeaccel backend "
                                         r"has no pinned_host memory"):
        offload.check_backend(_config(param_layers="all"), [Dev()])


def _across_switch(c, devices, steps=(2, 2)):
    """Losses of a Pseudo stage, the delink, then a Real stage, each with `c`'s offload
    plan, and the final canonical Real state."""
    mesh = sharding.make_mesh(c.mesh, devices[:2])
    example = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)
    losses, state = [], None
    with jax.set_mesh(mesh):
        for stage, n in zip((p2r.STAGE_PSEUDO, p2r.STAGE_REAL), steps):
            model, tx = stages.model_and_optimizer(c, stage)
            abstract, sh = abstract_train_state(model, tx, example, mesh)
            plan = offload.OffloadPlan(c, stage, sh, abstract)
            if state is None:  # both made straight into the stored layout
                state, sh = create_train_state(model, tx, example, mesh, seed=0,
                                               make_offload=lambda *_: plan)
            else:
                state = p2r.delink_state(state, c, tx, abstract, sh, plan)
            step = make_train_step(model, tx, mesh, sh, NUM_TASKS, offload=plan)
            for i in range(n):
                batch = sharding.global_batch(mesh, synthetic_batch(8, seed=len(losses)))
                state, m = step(state, batch)
                losses.append(float(m["loss"]))
    return losses, None, for_disk(state)


@pytest.mark.slow
def test_streamed_offload_across_a_pseudo_to_real_switch(devices):
    def config(**off):
        c = _config(**off)
        c.model.share_layers = True
        c.pseudo_to_real.update(switch_step=2, optimizer="copy")
        return c
    ref = _across_switch(config(), devices)
    _assert_same_training(_across_switch(config(optimizer_layers="all", param_layers="0,3"),
                                         devices), ref, exact=False)


def test_an_offload_plan_that_cannot_fit_is_refused_naming_the_term(devices):
    c = _config(param_layers="1")
    c.hardware = dict(num_devices=2, device_kind="cpu", device_memory_gb=1e-4)
    with pytest.raises(ValueError, match=r"offload.param_layers='1', offload.optimizer_layers="
                                         r"'none': the device peak [\d.]+ GiB exceeds the 0.0001 GiB "
                                         r"of device memory \(largest term: \w+ [\d.]+ GiB\)"):
        plan.check_offload(c, devices[:2])
    c.hardware.device_memory_gb = 4.0
    plan.check_offload(c, devices[:2])  # fits: no error


def test_bf16_master_weights_and_adafactor_stream_and_train_the_same(devices):
    """m6_10t's choices: bfloat16 master weights and Adafactor (factored moments, whose
    (1,)-shaped placeholders stay whole), with params and state of layers 0, 1 offloaded."""
    def config(**off):
        c = _config(optimizer="adafactor", **off)
        c.model.param_dtype = "bfloat16"
        return c
    run, ref = _train(config(optimizer_layers="all", param_layers="0,1"), devices), \
        _train(config(), devices)
    wi = run[1].params["stack"]["layers"]["mlp"]["wi"]["kernel"].parts[0]
    assert wi.dtype == np.dtype("bfloat16") and wi.sharding.memory_kind == "pinned_host"
    assert ref[2].params["token_emb"]["embedding"].dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(run[0], ref[0], rtol=1e-3)  # bf16 weights: looser losses
    for a, b in zip(jax.tree.leaves(run[2]), jax.tree.leaves(ref[2])):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=2e-2)


def test_activation_offload_policy_parks_layer_inputs_on_the_host(devices):
    """remat_policy=offload_layer_input: each layer's input [B, S, D] goes to the host in
    the forward loop and comes back in the backward one (CUDA lowering, as above)."""
    c = _config()
    c.model.remat_policy = "offload_layer_input"
    text, _ = _cuda_stablehlo(c, devices)
    act = (8, GRID * GRID + TEXT_LEN, 32)  # [batch, S, D] (StableHLO has global shapes)
    moves = [m for body in _functions(text).values() for m in _moves(body)]
    assert ("pinned_host", act) in moves and ("device", act) in moves
    c.model.remat_policy = "full"
    text, _ = _cuda_stablehlo(c, devices)
    assert ("pinned_host", act) not in [m for b in _functions(text).values() for m in _moves(b)]


def test_stored_state_bytes_per_device_match_the_plan(devices):
    """On an fsdp=2 x tensor=2 mesh the stored state's bytes per device in each memory
    kind equal the plan's: offloaded units are sharded like the canonical leaves (a
    replicated host copy would double the host bytes and fail this)."""
    from m6jax import plan
    c = _config("all", "0,1", data=1, fsdp=2, tensor=2)
    mesh, state, off, _ = _setup(c, devices)
    with jax.set_mesh(mesh):
        stored = off.to_stored(state)
    a = plan.abstract_state(c)
    planned = plan.offload_bytes(c, a, plan.abstract_mesh((1, 2, 2, 1)), p2r.STAGE_REAL)
    host = planned["params_host"] + planned["optimizer_host"]
    assert sharding.per_device_bytes(stored, "pinned_host") == pytest.approx(host, abs=64)
    total = sharding.per_device_bytes(state)
    assert sharding.per_device_bytes(stored, "device") == pytest.approx(total - host, abs=64)
