"""The entry point as a user runs it: files it writes, and the same losses for the same seed."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ARGS = [
    "--config=experiments/configs/m6.py:tiny", "--config.total_steps=8", "--config.log_every=2",
    "--config.eval_every=4", "--config.batch_size=8", "--config.mesh.data=2",
    "--config.model.emb_dim=32", "--config.model.mlp_dim=64", "--config.model.num_layers=2",
    "--config.data.vocab_size=300", "--config.data.eval_examples=32",
    "--config.optimizer.warmup_steps=2", "--config.num_caption_samples=2",
]


def _pretrain(workdir, cache_dir, extra=()):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               M6JAX_CACHE=str(cache_dir))
    cmd = [sys.executable, "experiments/pretrain.py", *ARGS, *extra, f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    runs = []
    for name in ("run_a", "run_b"):
        workdir = tmp_path_factory.mktemp(name)
        proc = _pretrain(workdir, cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((workdir, proc))
    return runs


def _metrics(workdir):
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_has_one_line_per_logged_step(two_runs):
    rows = _metrics(two_runs[0][0])
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all({"step", "loss", "tokens_per_s", "mfu"} <= set(r) for r in rows)
    assert any(k.startswith("loss/") for k in rows[-1])


def test_summary_json_has_the_contract_keys(two_runs):
    summary = json.loads((two_runs[0][0] / "summary.json").read_text(encoding="utf-8"))
    for key in ("caption_accuracy", "eval_loss", "initial_eval_loss", "tokens_per_s", "mfu",
                "wall_s", "total_steps"):
        assert key in summary, key
    assert summary["total_steps"] == 8
    assert summary["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 1, "stage": 1}
    # The fraction of the 359 held-out digits (20% of 1,797) whose greedy caption names the
    # right class, per language; the headline number is the mean of the two.
    en, zh = summary["caption_accuracy_en"], summary["caption_accuracy_zh"]
    for acc in (en, zh):
        assert abs(acc * 359 - round(acc * 359)) < 1e-6, acc
    assert summary["caption_accuracy"] == pytest.approx((en + zh) / 2, abs=1e-12)


def test_same_command_and_seed_give_the_same_losses(two_runs):
    a, b = (_metrics(w) for w, _ in two_runs)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_progress_line_and_captions_are_printed(two_runs):
    out = two_runs[0][1].stdout
    assert "step      8/8 | loss" in out
    assert "Generated captions" in out


def test_bad_config_fails_before_compiling(tmp_path):
    proc = _pretrain(tmp_path / "w", tmp_path / "cache", ["--config.model.num_heads=6"])
    assert proc.returncode != 0
    assert "model.num_heads=6 does not divide model.emb_dim=32" in proc.stderr
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_the_run_prints_a_line_per_event_and_no_library_info(two_runs):
    """The quickstart printed 238 absl/Orbax INFO lines of 576 (about 40 a checkpoint)."""
    proc = two_runs[0][1]
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    assert not [l for l in lines if "orbax" in l.lower() or "backend 'tpu'" in l], lines
    progress = [l for l in lines if l.startswith("step ")]
    assert len(progress) == 4  # 8 steps, logged every 2
    for kept in ("parameters", "initial eval loss", "checkpoint: saving step 8", "images: grey"):
        assert any(kept in l for l in lines), kept
    # config, mesh, images, model, peak, initial eval, mid-run eval, checkpoint; then the
    # caption header, 2 captions and the final line.
    assert len(lines) - len(progress) <= 13, lines


def test_rerunning_a_finished_run_keeps_its_summary(two_runs, tmp_path):
    workdir = two_runs[0][0]
    before = (workdir / "summary.json").read_text(encoding="utf-8")
    proc = _pretrain(workdir, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run already complete at step 8" in proc.stdout
    assert (workdir / "summary.json").read_text(encoding="utf-8") == before
    json.loads(before, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
