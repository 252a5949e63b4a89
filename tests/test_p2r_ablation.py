"""experiments/p2r_ablation.py as a user runs it: a subprocess, its exit code, its files."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = {"run", "switch_step", "final_loss", "steps_to_scratch_loss",
           "wall_s_to_scratch_loss", "optimizer_handoff", "seed", "eval_loss",
           "fraction_of_scratch_steps"}


@pytest.mark.slow  # two 10-step trainings of the 12-layer ablation model (~1 min)
def test_ablation_writes_the_csv_and_the_png(tmp_path):
    cmd = [sys.executable, "experiments/p2r_ablation.py", f"--workdir={tmp_path}", "--steps=10",
           "--switch_steps=5", "--handoffs=scaled", "--seeds=0", "--nomoe", "--window=4"]
    env = dict(os.environ, M6JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "p2r_ablation.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert COLUMNS <= set(rows[0])
    assert [(r["run"], r["optimizer_handoff"], r["switch_step"]) for r in rows] == [
        ("scratch", "none", "0"), ("p2r_5_scaled", "scaled", "5")]
    assert (tmp_path / "p2r_ablation.png").stat().st_size > 10_000
