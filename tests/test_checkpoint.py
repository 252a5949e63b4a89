"""Fault tolerance of the entry point as a user runs it: kill, preempt, corrupt, NaN, fine-tune.

Every run is `experiments/pretrain.py` in a subprocess on 2 fake CPU devices with a tiny
MoE model whose training is random (dropout 0.1, router jitter 0.1): bitwise-equal losses
after a resume then also prove the RNG was restored. `reference` is one uninterrupted run
that the others are compared with.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from conftest import ROOT

STEPS, EVERY = 10, 3
DENSE_ARGS = [
    "--config=experiments/configs/m6.py:tiny", f"--config.total_steps={STEPS}",
    "--config.log_every=1", "--config.eval_every=100", "--config.batch_size=8",
    "--config.mesh.data=2", "--config.model.emb_dim=32", "--config.model.mlp_dim=64",
    "--config.model.num_layers=2", "--config.data.vocab_size=300",
    "--config.data.eval_examples=32", "--config.optimizer.warmup_steps=2",
    "--config.num_caption_samples=1", "--config.peak_tflops_per_device=1",
    f"--config.checkpoint_every={EVERY}", "--config.keep_checkpoints=3",
]
# This file's runs: the same with MoE layers, dropout and router jitter on.
# --config must come before its overrides (ml_collections reads them in argv order).
ARGS = ["--config=experiments/configs/m6_moe.py:tiny"] + [
    a for a in DENSE_ARGS if not a.startswith("--config=")] + [
    "--config.model.dropout_rate=0.1", "--config.model.moe.jitter=0.1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_cache")


def _cmd(workdir, cache, extra=(), args=None):
    tok = f"--config.data.tokenizer_path={cache / 'tokenizer.model'}"  # trained once, shared
    return [sys.executable, "experiments/pretrain.py", *(ARGS if args is None else args), tok,
            *extra, f"--workdir={workdir}"]


def _env(cache, **hooks):
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                M6JAX_CACHE=str(cache), **hooks)


def _run(workdir, cache, extra=(), args=None, **hooks):
    return subprocess.run(_cmd(workdir, cache, extra, args), cwd=ROOT, env=_env(cache, **hooks),
                          capture_output=True, text=True, timeout=300)


def _run_until(workdir, cache, logged_step, sig, extra=(), args=None, **hooks):
    """Starts a run, sends `sig` once metrics.jsonl has `logged_step`, returns the process."""
    hooks.setdefault("M6JAX_TEST_STEP_DELAY_S", "0.25")  # so the kill lands mid-run
    proc = subprocess.Popen(_cmd(workdir, cache, extra, args), cwd=ROOT, env=_env(cache, **hooks),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _metrics(workdir) and _metrics(workdir)[-1]["step"] >= logged_step:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def _metrics(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return rows


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in _metrics(workdir)]


def _steps(workdir):
    return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run(workdir, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_uninterrupted_run_keeps_the_newest_checkpoints(reference):
    assert [s for s, _ in _losses(reference)] == list(range(1, STEPS + 1))
    assert _steps(reference) == [6, 9, 10]  # every 3 steps + the last, newest 3 kept


def test_sigkill_then_same_command_continues_the_loss_curve_bitwise(reference, cache, tmp_path):
    code, _, _ = _run_until(tmp_path, cache, logged_step=5, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    killed_at = _metrics(tmp_path)[-1]["step"]
    assert 5 <= killed_at < STEPS and _steps(tmp_path)[-1] < killed_at
    proc = _run(tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stderr
    assert _losses(tmp_path) == _losses(reference)  # bitwise: float equality of every loss


def test_sigkill_between_an_async_save_start_and_its_commit(reference, cache, tmp_path):
    # The hook kills the process right after the save of step 6 was started (arrays
    # copied to host, orbax writing in its background thread), before the commit.
    proc = _run(tmp_path, cache, M6JAX_TEST_KILL_DURING_SAVE="6")
    assert proc.returncode == -signal.SIGKILL
    assert "SIGKILL during the save of step 6 (not committed yet)" in proc.stdout
    assert _steps(tmp_path) == [3]  # the half-written step 6 never became a checkpoint
    proc = _run(tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 3" in proc.stderr
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]
    assert _losses(tmp_path) == _losses(reference)


def test_sigterm_checkpoints_the_step_it_arrived_at(reference, cache, tmp_path):
    code, out, err = _run_until(tmp_path, cache, logged_step=4, sig=signal.SIGTERM)
    assert code == 0, err[-3000:]
    last_logged = _metrics(tmp_path)[-1]["step"]
    assert f"preempted: saved the checkpoint of step {last_logged}" in out
    assert _steps(tmp_path)[-1] == last_logged < STEPS
    meta = json.loads((tmp_path / "checkpoints" / str(last_logged) / "meta" / "metadata").read_text())
    assert meta["data"] == {"step": last_logged} and meta["stage"] == "real"
    assert int(_saved_state(tmp_path, last_logged)["step"]) == last_logged
    assert _losses(tmp_path) == _losses(reference)[:last_logged]  # resuming: see the SIGKILL test


def test_unreadable_newest_checkpoints_fall_back_to_an_older_one(reference, cache, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    for f in (workdir / "checkpoints" / "10" / "state").rglob("*"):  # truncate every file
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for f in (workdir / "checkpoints" / "9" / "state" / "ocdbt.process_0" / "d").iterdir():
        f.unlink()  # delete the array data
    proc = _run(workdir, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (10, 9):
        assert f"checkpoint: step {step} in {workdir / 'checkpoints'} is unreadable" in proc.stderr
    assert "resumed from step 6" in proc.stderr
    assert sorted(os.listdir(workdir / "checkpoints_unreadable"))[0].startswith("10.")
    assert _losses(workdir) == _losses(reference)


@pytest.mark.slow  # ~40 s; tests/test_checkpoint_mesh.py restores onto other meshes in-process
def test_same_command_with_another_mesh_resumes_onto_it(reference, cache, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    for step in (9, 10):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    # One device, not tensor 2: the MoE run's `grouped` dispatch under mesh.tensor > 1 is
    # refused (issue 27), and a batch split four ways would cut its routing groups.
    proc = subprocess.run(_cmd(workdir, cache, ["--config.mesh.data=1"]), cwd=ROOT,
                          env=dict(_env(cache), XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "stage": 1}
    got, want = _losses(workdir), _losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    # 3.2e-5 measured on one device: one reduction over the batch, not two.
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-4)


def _saved_state(workdir, step):
    """A checkpoint's TrainState as a dict of numpy arrays (no devices involved)."""
    path = epath.Path(workdir / "checkpoints" / str(step) / "state")
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def test_nan_under_skip_leaves_params_unchanged_and_is_counted(reference, cache, tmp_path):
    proc = _run(tmp_path, cache, M6JAX_TEST_NAN_STEPS="5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(tmp_path)
    assert np.isnan(rows[4]["loss"]) and [r["nonfinite_steps"] for r in rows[3:6]] == [0, 1, 1]
    assert _losses(tmp_path)[:4] == _losses(reference)[:4]
    for step in _steps(tmp_path):
        state = _saved_state(tmp_path, step)
        assert all(np.isfinite(x).all() for x in _leaves(state["params"]))
        assert int(state["nonfinite_steps"]) == 1


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_nan_under_stop_exits_and_keeps_the_last_good_checkpoint(reference, cache, tmp_path):
    proc = _run(tmp_path, cache, ["--config.nonfinite_policy=stop"], M6JAX_TEST_NAN_STEPS="5")
    assert proc.returncode != 0
    assert "non-finite loss or gradients at step 5" in proc.stderr
    assert "Last good checkpoint: step 3" in proc.stderr
    assert _steps(tmp_path) == [3]
    proc = _run(tmp_path, cache)  # the same command without the poison resumes from 3
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path) == _losses(reference)


def test_init_from_takes_params_only(reference, cache, tmp_path):
    proc = _run(tmp_path, cache, [f"--config.init_from={reference}", "--config.total_steps=3",
                                  "--config.optimizer.learning_rate=1e-4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((reference / "summary.json").read_text())
    tuned = json.loads((tmp_path / "summary.json").read_text())
    # Its first eval is the source's last one: the same params on the same eval set.
    assert tuned["initial_eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-6)
    assert [s for s, _ in _losses(tmp_path)] == [1, 2, 3]  # fresh step count and optimizer
    assert int(_saved_state(tmp_path, 3)["step"]) == 3


def test_init_from_a_missing_path_is_a_config_error(cache, tmp_path):
    proc = _run(tmp_path / "w", cache, [f"--config.init_from={tmp_path / 'nothing'}"])
    assert proc.returncode != 0
    assert f"config error: init_from={str(tmp_path / 'nothing')!r} does not exist" in proc.stderr
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
