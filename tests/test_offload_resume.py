"""Checkpoints of an offloaded run are the canonical format: one saved with offload
restores without it onto another mesh, and the reverse, to the losses of a run that was
never interrupted; and a run with everything offloaded, killed with SIGKILL before its
Pseudo-to-Real switch, resumes through the switch to the uninterrupted run's losses."""
import math
import signal

import jax
import pytest

import test_checkpoint
from helpers import GRID, NUM_TASKS, PATCH_DIM, TEXT_LEN, synthetic_batch
from m6jax import offload, sharding
from m6jax import pseudo_to_real as p2r
from m6jax.checkpoint import Checkpointer
from m6jax.offload_layout import Segments
from m6jax.train import stages
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch
from m6jax.train.step import make_train_step
from test_checkpoint import _losses, _steps, cache  # noqa: F401
from test_offload import _config

OFFLOADED = dict(optimizer_layers="1,3", param_layers="all")  # four runs per stack leaf
EXAMPLE = dummy_batch(8, GRID * GRID, PATCH_DIM, TEXT_LEN)


def _parts(off, mesh_fields, devices):
    c = _config(**off, **mesh_fields)
    n = math.prod(mesh_fields.values())
    mesh = sharding.make_mesh(c.mesh, devices[:n])
    model, tx = stages.model_and_optimizer(c, p2r.STAGE_REAL)
    abstract, sh = abstract_train_state(model, tx, EXAMPLE, mesh)
    plan = offload.OffloadPlan(c, p2r.STAGE_REAL, sh, abstract)
    step = make_train_step(model, tx, mesh, sh, NUM_TASKS, offload=plan)
    return c, mesh, model, tx, abstract, plan, step


def _steps_of(parts, state, first, n):
    _, mesh, *_, step = parts
    losses = []
    with jax.set_mesh(mesh):
        for i in range(first, first + n):
            state, m = step(state, sharding.global_batch(mesh, synthetic_batch(8, seed=i)))
            losses.append(float(m["loss"]))
    return state, losses


def _run(devices, tmp_path, before, after):
    """2 steps with `before` = (offload, mesh), saved, restored with `after`, 2 more."""
    first = _parts(*before, devices)
    c, mesh, model, tx, _, plan, _ = first
    state, _ = create_train_state(model, tx, EXAMPLE, mesh, 0, make_offload=lambda *_: plan)
    state, losses = _steps_of(first, state, 0, 2)
    ckpt = Checkpointer(str(tmp_path), c)
    ckpt.save(2, state, {"data": {"step": 2}}, force=True)
    ckpt.close()
    second = _parts(*after, devices)
    c2, mesh2, _, _, abstract, plan2, _ = second
    restored, _ = Checkpointer(str(tmp_path), c2).restore_latest(plan2.restore_target(abstract))
    with jax.set_mesh(mesh2):
        restored = plan2.to_stored(restored)
    _, more = _steps_of(second, restored, 2, 2)
    return losses + more, restored


@pytest.fixture(scope="module")
def reference(devices):
    """4 uninterrupted steps, no offload, on data=2."""
    parts = _parts({}, dict(data=2), devices)
    _, mesh, model, tx, *_ = parts
    state, _ = create_train_state(model, tx, EXAMPLE, mesh, 0)
    return _steps_of(parts, state, 0, 4)[1]


@pytest.mark.slow  # four compiled steps (~1-2 min on 2 loaded cores)
def test_offloaded_checkpoint_restores_without_offload_on_another_mesh(devices, tmp_path,
                                                                       reference):
    losses, restored = _run(devices, tmp_path, (OFFLOADED, dict(data=2)),
                            ({}, dict(data=1, fsdp=2, tensor=2)))
    query = restored.params["stack"]["layers"]["attn"]["query"]
    assert not isinstance(query, Segments) and query.shape[0] == 4  # the canonical layout
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_plain_checkpoint_restores_with_offload_on_another_mesh(devices, tmp_path, reference):
    losses, restored = _run(devices, tmp_path, ({}, dict(data=1, fsdp=2, tensor=2)),
                            (OFFLOADED, dict(data=2)))
    query = restored.params["stack"]["layers"]["attn"]["query"]
    assert [p.sharding.memory_kind for p in query.parts] == ["pinned_host"] * 4
    assert losses == pytest.approx(reference, rel=1e-5)


# ---- Kill -9 through the entry point: MoE with dropout and router jitter (test_checkpoint's
# runs), Pseudo-to-Real at step 5, every layer's params and optimizer state offloaded.
EVERYTHING = ["--config.model.share_layers=True", "--config.pseudo_to_real.switch_step=5",
              "--config.pseudo_to_real.optimizer=scaled", "--config.keep_checkpoints=4",
              "--config.offload.param_layers=all", "--config.offload.optimizer_layers=all"]


@pytest.mark.slow  # three entry-point runs
def test_offloaded_run_killed_before_the_switch_resumes_to_the_same_losses(cache, tmp_path):  # noqa: F811
    ref = tmp_path / "reference"
    proc = test_checkpoint._run(ref, cache, EVERYTHING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pseudo-to-real: delinked at step 5" in proc.stderr
    killed = tmp_path / "killed"
    code, _, _ = test_checkpoint._run_until(killed, cache, logged_step=4, sig=signal.SIGKILL,
                                            extra=EVERYTHING)
    assert code == -signal.SIGKILL
    assert _steps(killed)[-1] == 3, "the kill landed too late or too early"
    proc = test_checkpoint._run(killed, cache, EVERYTHING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 3" in proc.stderr and "delinked at step 5" in proc.stderr
    assert _losses(killed) == _losses(ref)  # float equality of every loss
    # generate.py's loader reads the run into its stored layout (the decoders stream it)
    from m6jax.decoding.run import load_run
    _, _, _, params, param_sh, _ = load_run(str(ref), jax.devices()[:2])
    experts = jax.tree.leaves(params["stack"]["layers"], is_leaf=lambda x: isinstance(
        x, Segments))
    assert experts and all(isinstance(x, Segments) for x in experts)
    assert {p.sharding.memory_kind for x in experts for p in x.parts} == {"pinned_host"}
