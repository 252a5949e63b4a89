"""benchmarks/cpu_vs_torch.py as a user runs it: rows with the contract keys, and a
clean skip when the optional PyTorch dependency is absent."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "cpu_vs_torch.py")


def _run(args, tmp_path, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)   # one CPU device, as a user runs it
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_torch_it_says_so_and_writes_nothing(tmp_path):
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('No module named torch')\n")
    out = tmp_path / "rows.json"
    r = _run([f"--json={out}"], tmp_path, {"PYTHONPATH": str(fake)})
    assert r.returncode == 0, r.stderr
    assert "PyTorch is not installed" in r.stdout
    assert not out.exists()


def test_rows_have_the_contract_keys(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "rows.json"
    r = _run([f"--json={out}", "--ops=mlp", "--iters=1", "--batch=2", "--length=32",
              "--emb_dim=16", "--mlp_dim=32"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [row["op"] for row in rows] == ["mlp"]
    for row in rows:
        assert set(row) == {"op", "shape", "jax_ms", "torch_ms", "ratio"}
        assert row["jax_ms"] > 0 and row["torch_ms"] > 0 and row["ratio"] > 0
