"""Multi-host for real on this machine: 2 processes x 4 CPU devices (launch/local.py,
jax.distributed + gloo) train exactly like 1 process with 8 devices on the same mesh."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ARGS = [
    "experiments/pretrain.py", "--config=experiments/configs/m6_10b.py:tiny",
    "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=100",
    "--config.batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2", "--config.model.emb_dim=32", "--config.model.mlp_dim=64",
    "--config.model.num_layers=2", "--config.data.vocab_size=300",
    "--config.data.eval_examples=16", "--config.optimizer.warmup_steps=1",
    "--config.num_caption_samples=1",
]


def _env(cache):
    return dict(os.environ, M6JAX_CACHE=str(cache), JAX_PLATFORMS="cpu", XLA_FLAGS="")


# The two runs take ~70 s here on an idle machine (three processes compile on 2 cores).
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    single = subprocess.run(
        [sys.executable, *ARGS, f"--workdir={one}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=dict(_env(cache), XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=4",
         "--", *ARGS, f"--workdir={two}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=_env(cache))
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    return (one, single), (two, multi)


def _losses(workdir):
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_two_processes_give_the_same_losses_as_one(runs):
    # Same global batches and the same mesh; only the order of cross-process sums in
    # gloo vs in-process reductions differs, so equal to float32 rounding (seen: 1e-7).
    (one, _), (two, _) = runs
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    assert [l for _, l in b] == pytest.approx([l for _, l in a], rel=1e-6, abs=0)


def test_two_processes_give_the_same_eval_loss_as_one(runs):
    (one, _), (two, _) = runs
    a, b = (json.loads((w / "summary.json").read_text(encoding="utf-8")) for w in (one, two))
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
    assert b["num_devices"] == 8 and b["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "stage": 1}


def test_only_process_0_prints_progress_and_logs_name_their_process(runs):
    _, (_, multi) = runs
    out = multi.stdout
    assert "[0] step      3/3 | loss" in out
    assert "[1] step" not in out and "[1] caption accuracy" not in out
    assert "[process 1/2]" in out and "[process 0/2]" in out


def test_local_launcher_stops_all_processes_when_one_fails(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=1",
         "--", "experiments/pretrain.py", "--config=experiments/configs/m6.py:tiny",
         "--config.model.num_heads=6", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(tmp_path / "c"))
    assert proc.returncode != 0
    assert "model.num_heads=6 does not divide model.emb_dim=128" in proc.stdout


@pytest.mark.slow  # one more 2-process run (~40 s here)
def test_two_processes_restore_the_step_process_0_chose(runs, tmp_path):
    """Process 1's view of the newest checkpoint is made to fail validation (a test hook
    standing for storage that lags on one host): process 0 decides, so both resume from
    step 3; deciding on each process alone would start process 1 from scratch."""
    import shutil
    _, (two, _) = runs
    workdir = tmp_path / "w"
    shutil.copytree(two, workdir)
    args = [a if not a.startswith("--config.total_steps") else "--config.total_steps=5"
            for a in ARGS]
    multi = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=4",
         "--", *args, f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=dict(_env(tmp_path / "c"), M6JAX_TEST_UNREADABLE_STEPS="1:3"))
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    for proc in (0, 1):
        assert any(line.startswith(f"[{proc}]") and "resumed from step 3" in line
                   for line in multi.stdout.splitlines()), multi.stdout[-3000:]
    assert [s for s, _ in _losses(workdir)] == [1, 2, 3, 4, 5]
    assert not (workdir / "checkpoints_unreadable").exists()


def _saved_steps(stdout: str, proc: int) -> list[int]:
    return [int(line.split("checkpoint: saving step ")[1].split()[0])
            for line in stdout.splitlines()
            if line.startswith(f"[{proc}]") and "checkpoint: saving step " in line]


@pytest.mark.slow  # one more 2-process run (~40 s here)
def test_a_skewed_clock_on_one_process_saves_the_same_steps_on_both(tmp_path):
    """checkpoint_minutes=10 over a run of seconds: only process 0's clock, made to jump
    601 s per reading (a test hook), finds a save due, at every step. Process 0 decides
    and both processes save steps 1, 2, 3; deciding on each process's own clock made
    process 0 save alone and wait in orbax's sync for process 1 forever."""
    args = [a for a in ARGS if not a.startswith(("--config.mesh.", "--config.total_steps"))]
    multi = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=1",
         "--", *args, "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
         "--config.total_steps=3", "--config.checkpoint_every=0",
         "--config.checkpoint_minutes=10", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(_env(tmp_path / "c"), M6JAX_TEST_CLOCK_JUMP="0:601"))
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    assert _saved_steps(multi.stdout, 0) == _saved_steps(multi.stdout, 1) == [1, 2, 3], \
        multi.stdout[-3000:]
    assert sorted(int(d.name) for d in (tmp_path / "w" / "checkpoints").iterdir()
                  if d.name.isdigit()) == [1, 2, 3]
