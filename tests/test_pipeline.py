"""Pipeline parallelism: the pipelined train step equals the no-pipeline step (loss,
gradients, updated params), its layout is the stage-sharded one (per-device bytes, the
compiled HLO), and bad schedules are refused before compiling."""
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.m6_moe import moe_section
from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch, tiny_config
from m6jax import plan
from m6jax import pseudo_to_real as p2r
from m6jax import sharding
from m6jax.config_checks import validate_config
from m6jax.train import moe_metrics, stages
from m6jax.train.losses import text_loss
from m6jax.train.state import create_train_state, dummy_batch
from m6jax.checkpoint import Checkpointer
from m6jax.train.state import abstract_train_state
from m6jax.train.step import _accumulate, make_eval_step, make_train_step


def pipe_config(mesh, microbatches=1, repeats=1, layers=4, batch=8, moe=None, accum=1):
    c = tiny_config(**mesh)
    c.model.num_layers = layers
    c.batch_size = batch
    if moe:
        c.model.moe = moe_section(**moe)
    c.pipeline.update(microbatches=microbatches, repeats=repeats)
    c.optimizer.grad_accum_steps = accum
    return c


def _mesh(c, devices):
    n = int(np.prod([c.mesh.get(a, 1) for a in sharding.MESH_AXES]))
    validate_config(c, n)
    return sharding.make_mesh(c.mesh, devices[:n])


def train(c, devices, steps=2):
    """(losses, grad norms, gradients of step 1, params after `steps`, compiled HLO, state)."""
    mesh = _mesh(c, devices)
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    example = dummy_batch(c.batch_size, GRID * GRID, PATCH_DIM, TEXT_LEN)
    state, sh = create_train_state(model, tx, example, mesh, seed=0)
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS,
                           grad_accum_steps=int(c.optimizer.grad_accum_steps))
    batches = [sharding.global_batch(mesh, synthetic_batch(c.batch_size, seed=i))
               for i in range(steps)]
    grads = _grads(c, model, mesh, state.params, batches[0])
    losses, norms = [], []
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batches[0]).compile()
        for b in batches:
            state, m = compiled(state, b)
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
    return dict(losses=losses, norms=norms, grads=grads, params=jax.device_get(state.params),
                hlo=compiled.as_text(), state=state, mesh=mesh)


def _grads(c, model, mesh, params, batch):
    """The gradient the step takes (text loss + MoE aux, accumulated as the step does)."""
    model = model.clone(training=True)

    def loss_fn(params, batch=batch, rng=None):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            logits, inter = model.apply({"params": params}, batch, mutable=["intermediates"])
        loss, aux = text_loss(logits, batch, NUM_TASKS)
        moe, moe_aux = moe_metrics.aux_loss_and_metrics(c.model, inter.get("intermediates", {}))
        return loss + moe, (loss, aux, moe_aux)

    n = int(c.optimizer.grad_accum_steps)
    if n > 1:
        fn = jax.jit(lambda p: _accumulate(loss_fn, p, batch, jax.random.key(0), n)[3])
    else:
        fn = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))
    with jax.set_mesh(mesh):
        return jax.device_get(fn(params))


def assert_same_run(got, want, rtol=1e-5, atol=2e-6):
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6)
    np.testing.assert_allclose(got["norms"], want["norms"], rtol=rtol)
    for name in ("grads", "params"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[name]),
                                jax.tree.leaves(want[name])):
            np.testing.assert_allclose(a, b, rtol=rtol * 20, atol=atol * 20 if name == "params"
                                       else atol, err_msg=f"{name}{jax.tree_util.keystr(path)}")


def collective_permute_pairs(hlo):
    return [tuple(tuple(map(int, p.split(","))) for p in re.findall(r"\{(\d+,\d+)\}", m))
            for m in re.findall(r"collective-permute\(.*?source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}",
                                hlo)]


def next_stage_pairs(stages, num_devices):
    """Partition i is in stage i // (num_devices / stages) (stage is the mesh's major axis)."""
    per = num_devices // stages
    return {(i, (i + per) % num_devices) for i in range(num_devices)}


@pytest.fixture(scope="module")
def reference(devices):
    """The no-pipeline step on one device, 4 layers, batch 8."""
    return train(pipe_config(dict(data=1)), devices)


@pytest.fixture(scope="module")
def stage2_data2_fsdp2(devices):
    return train(pipe_config(dict(stage=2, data=2, fsdp=2), microbatches=2), devices)


def test_stage2_data2_fsdp2_equals_the_no_pipeline_step(stage2_data2_fsdp2, reference):
    assert_same_run(stage2_data2_fsdp2, reference)


def test_stages_hold_their_own_chunk_and_pass_activations_by_collective_permute(
        stage2_data2_fsdp2):
    run = stage2_data2_fsdp2
    layers = run["state"].params["stack"]["layers"]
    total = sum(x.nbytes for x in jax.tree.leaves(layers))
    # Unit axis over 2 stages, embed over 2 fsdp shards (norm scales: stage only).
    norms = sum(x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(layers)
                if "norm" in jax.tree_util.keystr(p))
    assert sharding.per_device_bytes(layers) == (total - norms) // 4 + norms // 2
    pairs = collective_permute_pairs(run["hlo"])
    assert next_stage_pairs(2, 8) in [set(p) for p in pairs]
    # FSDP gathers a stage's chunk inside its stage group; no gather of the stack's
    # weights spans stages, so no device ever holds another stage's chunk.
    gathers = [line for line in run["hlo"].splitlines() if " all-gather(" in line]
    stack = [line for line in gathers if "/stack/" in line]
    assert stack   # the FSDP gathers are there to be checked
    for line in stack:
        groups = replica_groups(line)
        assert all(len({d // 4 for d in g}) == 1 for g in groups), line[:300]


def stack_weight_gathers(hlo, layers):
    """{leaf path: [units gathered at once]} for each stack weight sharded inside a stage
    (a spec axis beyond `stage`): every all-gather whose result ends in the leaf's
    one-unit shape, counted by the product of its leading dims (vmapped stage, units)."""
    shapes = [_ints(m) for m in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)]
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(layers):
        if all(a is None for a in tuple(leaf.sharding.spec)[1:]):
            continue
        unit = list(leaf.shape[1:])
        out[jax.tree_util.keystr(path)] = [
            int(np.prod(d[:len(d) - len(unit)])) for d in shapes
            if len(d) >= len(unit) and d[len(d) - len(unit):] == unit]
    return out


def test_fsdp_inside_a_stage_gathers_one_unit_at_a_time(stage2_data2_fsdp2):
    """Each FSDP-sharded weight is gathered one unit at a time (inside the unit loop),
    never a stage's whole chunk; the per-device params are the plan's."""
    run = stage2_data2_fsdp2
    gathers = stack_weight_gathers(run["hlo"], run["state"].params["stack"]["layers"])
    assert sum(map(len, gathers.values())) >= 6, gathers   # the gathers are there to check
    assert all(n == 1 for units in gathers.values() for n in units), gathers
    c = pipe_config(dict(stage=2, data=2, fsdp=2), microbatches=2)
    assert plan.plan(c, (2, 2, 1, 1, 2))["per_device_bytes"]["params"] == \
        sharding.per_device_bytes(run["state"].params)


@pytest.fixture(scope="module")
def stage2_expert2_data2(devices):
    """The compiled MoE step (4 experts over expert=2 inside 2 stages) and its state."""
    c = pipe_config(dict(stage=2, expert=2, data=2), microbatches=2,
                    moe=dict(num_experts=4, k=2, every=1, capacity_factor=1.0))
    mesh = _mesh(c, devices)
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    state, sh = create_train_state(model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN),
                                   mesh, seed=0)
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS)
    with jax.set_mesh(mesh):
        hlo = step.lower(state, sharding.global_batch(mesh, synthetic_batch(8))).compile().as_text()
    return c, state, hlo


def test_experts_stay_sharded_inside_a_stage(stage2_expert2_data2):
    """No device gathers the experts of a stage: tokens travel (all-to-all), weights do
    not; the per-device params are the plan's (wi, wo split over stage x expert)."""
    c, state, hlo = stage2_expert2_data2
    layers = state.params["stack"]["layers"]
    gathers = stack_weight_gathers(hlo, layers)
    assert gathers["['moe']['wi']"] == [] and gathers["['moe']['wo']"] == [], gathers
    assert "all-to-all" in hlo
    wi = layers["moe"]["wi"]
    assert wi.addressable_shards[0].data.size * 4 == wi.size
    assert plan.plan(c, (2, 1, 1, 2, 2))["per_device_bytes"]["params"] == \
        sharding.per_device_bytes(state.params)


def _iota(dims, perm):
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def replica_groups(line: str) -> list[list[int]]:
    """The device groups of one HLO collective's `replica_groups=` (the iota forms XLA
    prints: `[G,N]<=[dims]T(perm)`, `mesh[...] device_ids=(...) {axes}`, or explicit)."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        perm = _ints(m.group(4)) if m.group(4) else None
        return _iota(_ints(m.group(3)), perm).reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                  r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}", line)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        if m.group(2):
            perm = _ints(m.group(3)) if m.group(3) else None
            ids = _iota(_ints(m.group(2)), perm).reshape(sizes)
        else:
            ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
        rest = [i for i in range(len(names)) if i not in grouped]
        n = int(np.prod([sizes[i] for i in grouped]))
        return ids.transpose(rest + grouped).reshape(-1, n).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", line)
    return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]


def test_replica_groups_parse_the_iota_forms():
    assert replica_groups("replica_groups=[4,2]<=[8], dims") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), d")[0] == [0, 4]
    line = "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}, d"
    assert replica_groups(line)[:2] == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups={{0,2},{1,3}}, d") == [[0, 2], [1, 3]]


@pytest.mark.slow
def test_stage4_data2_equals_the_no_pipeline_step(devices, reference):
    run = train(pipe_config(dict(stage=4, data=2), microbatches=4), devices)
    assert_same_run(run, reference)
    layers = run["state"].params["stack"]["layers"]
    assert sharding.per_device_bytes(layers) * 4 == sum(x.nbytes for x in jax.tree.leaves(layers))
    assert next_stage_pairs(4, 8) in [set(p) for p in collective_permute_pairs(run["hlo"])]
    assert "all-gather" not in run["hlo"]   # data parallel inside a stage: nothing to gather
    # Evaluation runs the schedule too: a plain scan would gather the whole stack.
    c = pipe_config(dict(stage=4, data=2), microbatches=4)
    mesh = run["mesh"]
    eval_step = make_eval_step(stages.build_model(c), mesh, jax.tree.map(
        lambda x: x.sharding, run["state"].params), NUM_TASKS)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(mesh, synthetic_batch(8))
        assert "all-gather" not in eval_step.lower(run["state"].params, batch).compile().as_text()


@pytest.mark.slow
def test_circular_schedule_equals_the_no_pipeline_step(devices, reference):
    # 4 units over 2 stages x 2 repeats: stage 0 runs units 0 and 2, stage 1 units 1 and 3.
    run = train(pipe_config(dict(stage=2, data=4), microbatches=2, repeats=2), devices)
    assert_same_run(run, reference)


@pytest.mark.slow
def test_moe_with_experts_sharded_inside_stages_equals_the_no_pipeline_step(devices):
    moe = dict(num_experts=4, k=2, every=1, capacity_factor=1.0)  # some tokens dropped
    # The MoE aux losses are per call, so the reference runs the same 2 microbatches
    # one after another (grad accumulation) without a pipeline.
    want = train(pipe_config(dict(data=1), moe=moe, accum=2), devices)
    got = train(pipe_config(dict(stage=2, expert=2, data=2), microbatches=2, moe=moe), devices)
    assert_same_run(got, want)
    assert "all-to-all" in got["hlo"]   # tokens to their experts inside each stage
    wi = got["state"].params["stack"]["layers"]["moe"]["wi"]   # [units, E, D, M]
    assert wi.sharding.spec[:2] == ("stage", "expert")


@pytest.mark.slow
def test_pipeline_composes_with_grad_accumulation(devices, reference):
    run = train(pipe_config(dict(stage=2, data=2), microbatches=2, accum=2), devices)
    assert_same_run(run, reference)


@pytest.mark.parametrize("mesh,pipe,batch,message", [
    (dict(stage=3, data=1), dict(microbatches=3), 9, r"mesh.stage=3 x pipeline.repeats=1 does "
     r"not divide the 4 scanned units"),
    (dict(stage=2, data=2), dict(microbatches=2, repeats=4), 8, r"mesh.stage=2 x "
     r"pipeline.repeats=4 does not divide"),
    (dict(stage=2, data=2), dict(microbatches=3), 12, r"pipeline.microbatches=3 is not a "
     r"multiple of mesh.stage=2"),
    (dict(stage=2, data=2), dict(microbatches=4), 12, r"batch_size=12 .* is not divisible by "
     r"pipeline.microbatches=4"),
    (dict(stage=1, data=2), dict(microbatches=2), 8, r"pipeline.microbatches=2, "
     r"pipeline.repeats=1 need mesh.stage > 1"),
])
def test_bad_schedule_is_refused_naming_the_field(mesh, pipe, batch, message):
    c = pipe_config(mesh, batch=batch, **pipe)
    n = int(np.prod([c.mesh.get(a, 1) for a in sharding.MESH_AXES]))
    with pytest.raises(ValueError, match=message):
        validate_config(c, n)


def test_pipeline_with_offload_is_refused():
    c = pipe_config(dict(stage=2, data=2), microbatches=2)
    c.offload.param_layers = "all"
    with pytest.raises(ValueError, match="mesh.stage=2 with offload"):
        validate_config(c, 4)


@pytest.mark.slow
def test_pseudo_to_real_across_the_switch_equals_the_no_pipeline_run(devices):
    def run(mesh, microbatches):
        c = pipe_config(mesh, microbatches=microbatches)
        c.model.share_layers = True
        c.pseudo_to_real.update(switch_step=1, optimizer="scaled")
        mesh = _mesh(c, devices)
        example = dummy_batch(c.batch_size, GRID * GRID, PATCH_DIM, TEXT_LEN)
        batches = [sharding.global_batch(mesh, synthetic_batch(8, seed=i)) for i in range(2)]
        pseudo, tx = stages.model_and_optimizer(c, p2r.STAGE_PSEUDO)
        state, sh = create_train_state(pseudo, tx, example, mesh, seed=0)
        real, real_tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
        abstract, real_sh = abstract_train_state(real, real_tx, example, mesh)
        with jax.set_mesh(mesh):
            state, m1 = make_train_step(pseudo, tx, mesh, sh, NUM_TASKS)(state, batches[0])
            pseudo_layers = state.params["stack"]["layers"]
            state = p2r.delink_state(state, c, real_tx, abstract, real_sh)
            state, m2 = make_train_step(real, real_tx, mesh, real_sh, NUM_TASKS)(state, batches[1])
        return [float(m1["loss"]), float(m2["loss"])], pseudo_layers, state

    want_losses, _, want = run(dict(data=1), 1)
    losses, pseudo_layers, got = run(dict(stage=2, data=4), 2)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=4e-5)
    # The shared block is on every stage; the delinked stack is split over the stages.
    kernel = pseudo_layers["mlp"]["wi"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == kernel.shape
    real_kernel = got.params["stack"]["layers"]["mlp"]["wi"]["kernel"]      # [units, D, M]
    assert real_kernel.addressable_shards[0].data.shape[0] * 2 == real_kernel.shape[0]


def test_checkpoint_saved_on_two_stages_restores_on_one_and_on_four(
        stage2_data2_fsdp2, devices, tmp_path):
    """The params keep the canonical [units, ...] layout: stage only shards the unit axis."""
    host = jax.device_get(stage2_data2_fsdp2["state"])
    state = stage2_data2_fsdp2["state"]
    for i, mesh in enumerate((dict(data=8), dict(stage=4, data=2))):
        ckpt = Checkpointer(str(tmp_path / str(i)), tiny_config())
        ckpt.save(2, state, {"data": {"step": 2}}, force=True)
        ckpt.close()
        c = pipe_config(mesh, microbatches=4 if "stage" in mesh else 1)
        model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
        abstract, _ = abstract_train_state(
            model, tx, dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN), _mesh(c, devices))
        state, _ = Checkpointer(str(tmp_path / str(i)), c).restore_latest(abstract)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(host)):
            np.testing.assert_array_equal(np.asarray(a), b)
        layers = state.params["stack"]["layers"]
        stages_now = mesh.get("stage", 1)
        assert sharding.per_device_bytes(layers) * stages_now == sum(
            x.nbytes for x in jax.tree.leaves(layers))
