"""The scaling sweep: its power-law fit, its configs, and (slow) the files it writes."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_power_law_fit_recovers_a_known_law():
    import scaling
    x = np.array([1e5, 4e5, 2e6, 1e7])
    a, b = scaling.fit_power_law(x, 12.0 * x ** -0.07)
    assert a == pytest.approx(12.0, rel=1e-9) and b == pytest.approx(0.07, rel=1e-9)


def test_sizes_grow_and_families_share_the_token_budget():
    import scaling
    from m6jax import plan
    totals = {}
    for family in scaling.FAMILIES:
        cs = [scaling.run_config(family, s, 50) for s in scaling.SIZES]
        assert len({(c.total_steps, c.batch_size, plan.sequence_shape(c)) for c in cs}) == 1
        totals[family] = [plan.plan(c, (1, 1, 1, 1))["total_params"] for c in cs]
        assert totals[family] == sorted(totals[family])
    assert all(m > d for m, d in zip(totals["moe"], totals["dense"]))


@pytest.mark.slow
def test_sweep_writes_csv_and_png(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", M6JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "experiments/scaling.py", f"--workdir={tmp_path}",
                           "--steps=4", "--sizes=xs,s"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "scaling.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["family"], r["size"]) for r in rows] == [
        ("dense", "xs"), ("dense", "s"), ("moe", "xs"), ("moe", "s")]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
