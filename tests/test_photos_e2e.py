"""m6.py:photos as a user runs it: 2 loader workers, packed text, a ResNet, preempted and
resumed mid-run with bitwise the losses of an uninterrupted run; a profile trace."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

STEPS = 8
ARGS = ["--config=experiments/configs/m6.py:photos", f"--config.total_steps={STEPS}",
        "--config.log_every=1", "--config.data.image_size=64", "--config.data.vocab_size=300",
        "--config.data.eval_examples=8", "--config.num_caption_samples=1",
        "--config.peak_tflops_per_device=1", "--config.mesh.data=2",
        "--config.optimizer.warmup_steps=2"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("photos_cache")


def _cmd(workdir, cache, extra=()):
    tok = f"--config.data.tokenizer_path={cache / 'tokenizer.model'}"  # trained once, shared
    return [sys.executable, "experiments/pretrain.py", *ARGS, tok, *extra, f"--workdir={workdir}"]


def _env(cache, **extra):
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                M6JAX_CACHE=str(cache), **extra)


def _losses(workdir):
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        return [(r["step"], r["loss"], r["pad_fraction"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("photos_ref")
    run = subprocess.run(_cmd(workdir, cache, ["--config.profile_steps=3,4"]), cwd=ROOT,
                         env=_env(cache), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def test_preempted_photos_run_resumes_with_workers_bitwise(reference, cache, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, cache), cwd=ROOT,
                            env=_env(cache, M6JAX_TEST_STEP_DELAY_S="0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        path = tmp_path / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted: saved the checkpoint of step" in out, err[-3000:]
    assert len(_losses(tmp_path)) < STEPS
    rerun = subprocess.run(_cmd(tmp_path, cache), cwd=ROOT, env=_env(cache),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _losses(tmp_path) == _losses(reference)  # floats compared exactly


def test_photos_run_logs_pad_fraction_and_writes_the_profile_trace(reference):
    losses = _losses(reference)
    assert [s for s, _, _ in losses] == list(range(1, STEPS + 1))
    assert all(0 <= p < 1 for _, _, p in losses)
    traces = [f for _, _, files in os.walk(reference / "tensorboard" / "plugins" / "profile")
              for f in files if f.endswith(".xplane.pb")]
    assert traces
