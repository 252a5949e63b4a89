"""What restore does with each kind of unusable checkpoint, and when saves happen.

In-process on one device with a tiny state: only a checkpoint that fails validation is
set aside (and the log says why); an I/O error is retried, then raised, with nothing
moved and nothing older restored; `checkpoint_minutes` saves on a fake clock.
"""
import errno
import json
import os

import jax
import pytest

from helpers import tiny_config
from m6jax import checkpoint, sharding
from m6jax.train import stages
from m6jax.train.state import abstract_train_state, create_train_state, dummy_batch

EXAMPLE = dummy_batch(8, 16, 4, 12)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    config.checkpoint_every = 1
    config.keep_checkpoints = 10
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    model, tx = stages.model_and_optimizer(config, "real")
    state, _ = create_train_state(model, tx, EXAMPLE, mesh, 0)
    abstract, _ = abstract_train_state(model, tx, EXAMPLE, mesh, 0)
    return config, state, abstract


def _save_steps(workdir, config, state, steps):
    ckpt = checkpoint.Checkpointer(str(workdir), config)
    for step in steps:
        s = state.replace(step=jax.numpy.int32(step))
        assert ckpt.save(step, s, dict(data={"step": step}, stage="real"), force=True)
    ckpt.wait()
    ckpt.close()


class _Log:
    def __init__(self):
        self.lines = []

    def __call__(self, msg, *args):
        self.lines.append(msg % args if args else msg)


@pytest.fixture
def warnings(monkeypatch):
    log = _Log()
    monkeypatch.setattr(checkpoint.logging, "warning", log)
    return log.lines


def test_a_checkpoint_that_fails_validation_is_set_aside_with_the_reason(
        setup, tmp_path, warnings):
    config, state, abstract = setup
    _save_steps(tmp_path, config, state, [1, 2])
    meta = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(json.dumps({"data": {"step": 7}, "stage": "real", "step": 2}))
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    restored, _ = ckpt.restore_latest(abstract)
    assert int(restored.step) == 1
    assert os.listdir(tmp_path / "checkpoints_unreadable")[0].startswith("2.")
    (line,) = warnings
    assert line.startswith(f"checkpoint: step 2 in {tmp_path / 'checkpoints'} is unreadable "
                           "(fails validation: ValueError: its meta says step 2 / data position 7)")


def test_a_transient_io_error_is_retried_and_nothing_is_set_aside(
        setup, tmp_path, monkeypatch, warnings):
    config, state, abstract = setup
    _save_steps(tmp_path, config, state, [1, 2])
    monkeypatch.setattr(checkpoint, "READ_RETRY_S", 0.0)
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    real_restore, calls = ckpt.manager.restore, []

    def flaky(step, args):
        calls.append(step)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_restore(step, args=args)
    monkeypatch.setattr(ckpt.manager, "restore", flaky)
    restored, meta = ckpt.restore_latest(abstract)
    assert calls == [2, 2, 2] and int(restored.step) == 2 and meta["data"] == {"step": 2}
    assert not (tmp_path / "checkpoints_unreadable").exists()
    assert [w.split(" failed")[0] for w in warnings] == ["checkpoint: reading step 2"] * 2


def test_a_lasting_io_error_fails_loudly_and_rolls_nothing_back(
        setup, tmp_path, monkeypatch, warnings):
    config, state, abstract = setup
    _save_steps(tmp_path, config, state, [1, 2])
    monkeypatch.setattr(checkpoint, "READ_RETRY_S", 0.0)
    ckpt = checkpoint.Checkpointer(str(tmp_path), config)
    calls = []

    def broken(step, args):
        calls.append(step)
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(ckpt.manager, "restore", broken)
    with pytest.raises(checkpoint.CheckpointReadError,
                       match="checkpoint step 2 in .* could not be read after 3 attempts "
                             r"\(OSError: \[Errno 5\] Input/output error\); it was not set aside"):
        ckpt.restore_latest(abstract)
    assert calls == [2, 2, 2]  # step 1 was never tried: no silent roll-back
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()


def test_deleted_array_data_is_damage_not_an_io_error(setup, tmp_path, warnings):
    config, state, abstract = setup
    _save_steps(tmp_path, config, state, [1, 2])
    for f in (tmp_path / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
        f.unlink()
    restored, _ = checkpoint.Checkpointer(str(tmp_path), config).restore_latest(abstract)
    assert int(restored.step) == 1
    assert len(warnings) == 1 and "step 2" in warnings[0] and "fails validation" in warnings[0]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_checkpoint_minutes_saves_every_interval_of_the_clock(setup, tmp_path):
    config, state, _ = setup
    config = config.copy_and_resolve_references()
    config.checkpoint_every, config.checkpoint_minutes = 0, 1.0
    clock = FakeClock()
    ckpt = checkpoint.Checkpointer(str(tmp_path), config, clock=clock)
    saved = []
    for step in range(1, 13):
        clock.t += 25.0  # a 25 s step: 60 s have passed at steps 3, 6 (75 s after 3), 9, 12
        due = ckpt.should_save(step)
        if ckpt.save(step, state, dict(data={"step": step}, stage="real")):
            saved.append(step)
        assert due == (step in saved)
    ckpt.wait()
    ckpt.close()
    assert saved == [3, 6, 9, 12]
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == saved
