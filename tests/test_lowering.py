"""The train step lowered for CUDA and TPU on this CPU machine (no device needed) runs
the kernels m6jax/kernels.py names and holds no S x S buffer at 4,096 positions.

Read from the StableHLO text: custom calls (Pallas kernels: splash's and Triton's by
kernel name, megablox's gmm by its operands) and every tensor type in it.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from configs import m6_moe, m6_t2i
from m6jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 4096


def _long(**model):
    c = m6_t2i.get_config("long")
    c.model.update(model)
    return c


@pytest.fixture(scope="module")
def lowered():
    """platform/case -> StableHLO text, lowered once per module (seconds each)."""
    cache = {}

    def get(case, platform):
        if (case, platform) not in cache:
            config = {"long": _long, "long_dense": lambda: _long(attention="dense"),
                      "long_blocks": lambda: _long(kernels="sparse_attention=blocks"),
                      "moe": _moe, "moe_bf16": lambda: _moe(dtype="bfloat16")}[case]()
            cache[case, platform] = aot.lower_for(config, platform, units=1)
        return cache[case, platform]
    return get


def _moe(**model):
    c = m6_moe.get_config("tiny")
    c.model.moe.dispatch = "dropless"
    c.model.update(model)
    return c


def _square(text):
    return aot.square_buffers(aot.summarize(text), SEQ)


def test_long_config_is_4096_positions_block_sparse():
    c = _long()
    assert (c.data.image_size // c.data.patch_size) ** 2 + c.data.text_len == SEQ
    assert c.model.attention == "sparse"


def test_tpu_long_step_runs_splash_and_holds_no_s_by_s_buffer(lowered):
    text = lowered("long", "tpu")
    calls = aot.summarize(text)["custom_calls"]
    assert any(k.startswith("splash_mha_fwd") for k in calls), calls
    assert any(k.startswith("splash_mha_dkv") for k in calls), calls   # its backward too
    assert _square(text) == []


def test_cuda_long_step_runs_sparse_triton_and_holds_no_s_by_s_buffer(lowered):
    """Block-sparse on CUDA is our Pallas Triton kernel (m6jax/model/sparse_triton.py),
    forward and both backward kernels; no S x S scores or mask."""
    text = lowered("long", "cuda")
    calls = aot.summarize(text)["custom_calls"]
    for name in ("sparse_flash_fwd", "sparse_flash_dq", "sparse_flash_dkv"):
        assert name in calls, calls
    assert "mha_forward" not in calls, calls      # not the dense two-call path
    assert _square(text) == []


def test_cuda_long_step_on_blocks_holds_no_s_by_s_buffer(lowered):
    """model.kernels=sparse_attention=blocks (the gathered-blocks path, CPU's default):
    no fused call, and no S x S scores or mask either."""
    text = lowered("long_blocks", "cuda")
    assert not any(k.startswith("sparse_flash") for k in aot.summarize(text)["custom_calls"])
    assert _square(text) == []


def test_cuda_dense_long_step_runs_triton_flash_attention(lowered):
    text = lowered("long_dense", "cuda")
    calls = aot.summarize(text)["custom_calls"]
    assert calls.get("mha_forward", 0) >= 2 and "mha_backward" in calls, calls
    assert _square(text) == []


def test_tpu_dropless_moe_runs_megablox_gmm_not_a_padded_matmul(lowered):
    text = lowered("moe", "tpu")
    c = _moe()
    e, d, m = c.model.moe.num_experts, c.model.emb_dim, c.model.mlp_dim
    gmm = [line for line in text.splitlines() if "tpu_custom_call" in line
           and re.search(rf"tensor<{e}x{d}x{m}x\w+>\) -> tensor<\d+x{m}x", line)]
    assert gmm, "no megablox gmm over the [E, D, M] expert weights"
    assert "ragged_dot" not in text          # XLA expands it into a zero-padded matmul


def test_cuda_dropless_moe_runs_mosaic_gpu_grouped_matmuls_not_a_padded_matmul(lowered):
    """bf16 dropless MoE on CUDA: jax's Mosaic GPU ragged dot over the [E, D, M] / [E, M, D]
    expert weights (forward and row gradients) and its transposed ragged dot for the
    weight gradients; no XLA ragged_dot and no [E, rows, ...] expansion."""
    text = lowered("moe_bf16", "cuda")
    c = _moe()
    e, d, m = c.model.moe.num_experts, c.model.emb_dim, c.model.mlp_dim
    calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    weights = rf"tensor<{e}x({d}x{m}|{m}x{d})xbf16>"
    rows_dot = [ln for ln in calls if re.search(rf"{weights}\) -> tensor<\d+x\d+xbf16>", ln)]
    weight_grad = [ln for ln in calls if re.search(rf"\) -> {weights}", ln)]
    assert len(rows_dot) == 4 and len(weight_grad) == 2, (len(rows_dot), len(weight_grad))
    assert "ragged_dot" not in text
    experts = rf"tensor<{e}x({d}x{m}|{m}x{d})x(bf16|f32)>"
    dense = [ln for ln in text.splitlines() if "dot_general" in ln and re.search(experts, ln)]
    assert not dense, dense[0]  # the expert weights meet no XLA matmul (padded or not)


def test_cuda_f32_dropless_moe_runs_blocked_not_ragged_dot(lowered):
    """WGMMA takes 16-bit operands: an f32 model's dropless MoE runs `blocked` on CUDA."""
    text = lowered("moe", "cuda")
    assert "ragged_dot" not in text and "mosaic_gpu" not in text


@pytest.mark.slow  # the entry point end to end (~10 s, a subprocess); the tests above cover the step
def test_dry_run_lower_writes_hlo_and_one_summary_line(tmp_path):
    out = tmp_path / "long.mlir"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "dry_run.py"),
                           "--config=" + os.path.join(ROOT, "experiments/configs/m6_t2i.py:long"),
                           "--lower=tpu", "--aot_units=1", f"--hlo_out={out}", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lowered for tpu:")]
    assert len(lines) == 1 and "splash_mha_fwd" in lines[0], proc.stderr[-2000:]
    result = json.loads(proc.stdout)["lower"]
    assert result["square_buffers"] == [] and result["sequence"] == SEQ
    assert "stablehlo.custom_call @tpu_custom_call" in out.read_text()


def test_splash_runs_per_device_under_a_mesh():
    """The kernel sees its device's rows and heads (shard_map), not the global batch that
    GSPMD would gather around an opaque call: batch 8 over data x fsdp = 4, heads 4 over
    tensor = 2 -> q operands [2, 2, S, Dh]."""
    from helpers import tiny_config
    c = tiny_config(data=2, fsdp=2, tensor=2)
    text = aot.lower_for(c, "tpu", units=1)
    line = next(x for x in text.splitlines() if "splash_mha_fwd" in x)
    operands = re.findall(r"tensor<(\d+)x(\d+)x\d+x(\d+)xf32>", line[line.rindex(": ("):])
    dh = c.model.emb_dim // c.model.num_heads
    assert operands and operands[0] == ("2", "2", str(dh)), operands


def test_sparse_triton_runs_per_device_under_a_mesh():
    """CUDA block-sparse under data x fsdp x tensor: the kernel's operands are one
    device's rows and heads (batch 8 / 4, heads 4 / 2; Dh 8 padded to 16)."""
    from helpers import tiny_config
    c = tiny_config(data=2, fsdp=2, tensor=2)
    c.data.text_len = 16                                   # 32 positions: 2 blocks of 16
    c.model.update(attention="sparse", sparse_block_size=16, sparse_window=0,
                   sparse_stride=2, sparse_global_blocks=1)
    text = aot.lower_for(c, "cuda", units=1)
    line = next(x for x in text.splitlines() if "sparse_flash_fwd" in x)
    operands = re.findall(r"tensor<(\d+)x(\d+)x(\d+)x(\d+)xf32>", line[line.rindex(": ("):])
    assert operands and operands[0] == ("2", "32", "2", "16"), operands


def test_splash_lowers_inside_the_pipeline_schedule():
    """mesh.stage=2: the kernel's shard_map nests inside the pipeline's stages."""
    from helpers import tiny_config
    c = tiny_config(data=2, stage=2, tensor=2)
    c.model.num_layers = 4
    c.pipeline.microbatches = 2
    calls = aot.summarize(aot.lower_for(c, "tpu", units=4))["custom_calls"]
    assert any(k.startswith("splash_mha_fwd") for k in calls), calls
