"""The preprocessed format as a user runs it (slow): m6.py:photos from
`make_shards.py --format=preprocessed` shards with 2 loader workers, preempted mid-run
and resumed, gives bitwise the losses of an uninterrupted run."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_photos_e2e import STEPS, _cmd, _env, _losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from m6jax.data import photos
    cache = tmp_path_factory.mktemp("pre_cache")
    captions = photos.photo_folder(str(cache / "folder"))
    out = cache / "pre"
    tool = subprocess.run([sys.executable, "experiments/make_shards.py",
                           f"--images={cache / 'folder'}", f"--captions={captions}",
                           f"--out={out}", "--format=preprocessed", "--per_shard=5",
                           "--image_size=64", "--crop_margin=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr
    files = f"--config.data.image_text_files={out / 'shard-*.npy'}"
    workdir = tmp_path_factory.mktemp("pre_ref")
    run = subprocess.run(_cmd(workdir, cache, [files]), cwd=ROOT, env=_env(cache),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return cache, files, workdir


def test_preempted_run_on_preprocessed_shards_resumes_with_workers_bitwise(setup, tmp_path):
    cache, files, reference = setup
    proc = subprocess.Popen(_cmd(tmp_path, cache, [files]), cwd=ROOT,
                            env=_env(cache, M6JAX_TEST_STEP_DELAY_S="0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        path = tmp_path / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted: saved the checkpoint of step" in out, err[-3000:]
    assert len(_losses(tmp_path)) < STEPS
    rerun = subprocess.run(_cmd(tmp_path, cache, [files]), cwd=ROOT, env=_env(cache),
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _losses(tmp_path) == _losses(reference)  # floats compared exactly
