"""Text-to-image from codes made once, as a user runs it (slow, ~40 min a run on 2 cores):
train_vq.py, encode_codes.py, then pretrain.py with m6_t2i.py:tiny twice, reading the
codes and encoding at start-up: the same t2i_accuracy (>= 0.9), bitwise the same losses."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(script, args, cache):
    env = dict(os.environ, XLA_FLAGS="", M6JAX_CACHE=str(cache))
    return subprocess.run([sys.executable, f"experiments/{script}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=7200)


def test_t2i_from_stored_codes_equals_encoding_at_start_up(tmp_path):
    cache, vq, codes = tmp_path / "cache", tmp_path / "vq", tmp_path / "codes"
    proc = _run("train_vq.py", ["--config=experiments/configs/vq.py:tiny", f"--workdir={vq}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("encode_codes.py", [f"--vq_from={vq}", f"--out={codes}"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries, losses = [], []
    for name, extra in (("from_codes", [f"--config.data.codes_dir={codes}"]), ("at_init", [])):
        workdir = tmp_path / name
        proc = _run("pretrain.py", ["--config=experiments/configs/m6_t2i.py:tiny",
                                    f"--config.vq_from={vq}", f"--workdir={workdir}", *extra], cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries.append(json.loads((workdir / "summary.json").read_text()))
        losses.append([json.loads(l)["loss"] for l in open(workdir / "metrics.jsonl")])
    assert summaries[0]["t2i_accuracy"] >= 0.9
    assert summaries[0]["t2i_accuracy"] == summaries[1]["t2i_accuracy"]
    assert losses[0] == losses[1]
