"""The pipeline from the command line: every pretraining run family takes the flags, a run
prints its schedule and writes `pipeline_bubble`, a bad schedule is one line."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from m6jax import pipeline

FAMILIES = ["m6", "m6_moe", "p2r_ablation", "m6_10b", "m6_100b", "m6_t_1t", "m6_10t"]
ARGS = [
    "--config=experiments/configs/m6.py:tiny", "--config.total_steps=4", "--config.log_every=2",
    "--config.eval_every=4", "--config.batch_size=8", "--config.mesh.data=2",
    "--config.model.emb_dim=32", "--config.model.mlp_dim=64", "--config.model.num_layers=2",
    "--config.data.vocab_size=300", "--config.data.eval_examples=32",
    "--config.optimizer.warmup_steps=1", "--config.num_caption_samples=1",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_run_family_has_the_pipeline_fields(family):
    c = importlib.import_module(f"configs.{family}").get_config()
    assert c.mesh.stage == 1 and c.pipeline.microbatches == 1 and c.pipeline.repeats == 1
    assert pipeline.from_config(c).bubble == 0.0


def test_bubble_formula():
    s = pipeline.Schedule(stages=4, microbatches=8, repeats=2)
    assert s.iterations == 2 * 8 + 3 and s.bubble == 3 / 19


def _pretrain(workdir, extra, devices=4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "experiments/pretrain.py", *ARGS, *extra, f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pretrain_prints_the_schedule_and_writes_pipeline_bubble(tmp_path):
    proc = _pretrain(tmp_path, ["--config.mesh.stage=2", "--config.pipeline.microbatches=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("pipeline: 2 stages x 1 repeats, 2 microbatches, fill-drain (GPipe), 3 iterations, "
            "bubble 33.3%") in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["pipeline_bubble"] == pytest.approx(1 / 3)
    assert summary["mesh"]["stage"] == 2


@pytest.mark.slow
def test_pretrain_refuses_a_bad_schedule_in_one_line(tmp_path):
    proc = _pretrain(tmp_path, ["--config.mesh.stage=2", "--config.pipeline.microbatches=3",
                                "--config.batch_size=12"])
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "pipeline.microbatches=3 is not a multiple of mesh.stage=2" in err[-1]
    assert "Traceback" not in proc.stderr
