"""Which kernel each op runs, per backend: one table, overridable by `model.kernels`.

  op                 cpu      cuda     tpu       what the names are
  attention          xla      triton   splash    dense prefix-LM / causal / packed
  sparse_attention   blocks   triton   splash    model.attention='sparse'
  gmm                blocked  mgpu     megablox  model.moe.dispatch='dropless'
  capacity           grouped  gather   gather    model.moe.dispatch='capacity'

  xla       jax.nn.dot_product_attention with the dense mask (XLA fuses nothing: S x S
            scores and mask; the CPU's measured path)
  blocks    m6jax/model/sparse.py: the kept key blocks gathered, [S, keys_per_block *
            block] scores, no S x S array, plain XLA ops
  splash    jax.experimental.pallas.ops.tpu.splash_attention (Pallas, Mosaic TPU): a
            static block mask (the sparse pattern, causal) plus dynamic segment ids
  triton    attention: jax.experimental.pallas.ops.gpu.attention.mha (Pallas, Triton):
            causal plus segment ids. sparse_attention: m6jax/model/sparse_triton.py, our
            block-sparse flash kernels (Pallas, Triton) over the static pattern, mask
            from the per-position vectors, forward and backward
  blocked   m6jax/model/moe/grouped.py: a static menu of row blocks (CPU-measured)
  megablox  jax.experimental.pallas.ops.tpu.megablox.gmm (Pallas, Mosaic TPU)
  mgpu      jax.experimental.pallas.ops.gpu.ragged_dot_mgpu + transposed_ragged_dot_mgpu
            (Pallas, Mosaic GPU, WGMMA: Hopper, 16-bit operands; m6jax/model/moe/mgpu.py).
            On a CUDA GPU that is not sm_90, or for an f32 model, `dropless` runs blocked.
  grouped   capacity slots through the grouped matmuls, no slot buffer (dispatch.py;
            the fastest capacity path on CPU, BENCHMARKS.md); gather / einsum: the
            [G, E, C, D] slot buffer by index gathers / one-hot matmuls. All three drop
            the same choices, so `capacity` changes speed, not results. GPU/TPU get
            gather (what the paper configs use; not measured against einsum there).
  ragged_dot  jax.lax.ragged_dot (XLA; on CPU and, per public reports, GPU it expands
            into a zero-padded dense matmul: about E times the FLOPs)

cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) is not in the table: its
jax API takes causal, trailing padding lengths, a sliding window or a dense bias, and
M6's rows (missing images before the text, packed examples, a per-row prefix) need
either segment ids or the dense [B, 1, S, S] bias this table exists to avoid.

The platform is jax's default backend, or the one being lowered for (`lowering_for`,
used by the ahead-of-time check on a machine without that device). Speed on GPU/TPU
is not measured (docs/kernels.md).
"""
from __future__ import annotations

import contextlib

import jax

TABLE = {
    "attention": {"cpu": "xla", "cuda": "triton", "tpu": "splash"},
    "sparse_attention": {"cpu": "blocks", "cuda": "triton", "tpu": "splash"},
    "gmm": {"cpu": "blocked", "cuda": "mgpu", "tpu": "megablox"},
    "capacity": {"cpu": "grouped", "cuda": "gather", "tpu": "gather"},
}
IMPLS = {
    "attention": ("xla", "splash", "triton"),
    "sparse_attention": ("blocks", "splash", "triton"),
    "gmm": ("blocked", "megablox", "ragged_dot", "mgpu"),
    "capacity": ("gather", "einsum", "grouped"),
}
# Pallas kernels compile for one platform; elsewhere they run only in interpret mode.
NATIVE = {"splash": "tpu", "triton": "cuda", "megablox": "tpu"}

_target: list[str] = []


@contextlib.contextmanager
def lowering_for(platform: str):
    """Resolve kernels for `platform` ('cpu' | 'cuda' | 'tpu') while tracing inside."""
    _target.append(platform)
    try:
        yield
    finally:
        _target.pop()


def platform() -> str:
    if _target:
        return _target[-1]
    backend = jax.default_backend()
    return {"gpu": "cuda"}.get(backend, backend)


def parse(overrides: str) -> dict[str, str]:
    """'op=impl,op=impl' -> {op: impl}; '' -> {}."""
    out = {}
    for item in filter(None, (s.strip() for s in overrides.split(","))):
        op, sep, impl = item.partition("=")
        if not sep or op.strip() not in IMPLS or impl.strip() not in IMPLS[op.strip()]:
            choices = "; ".join(f"{o}={'|'.join(i)}" for o, i in IMPLS.items())
            raise ValueError(f"model.kernels={overrides!r}: {item!r} is not op=impl "
                             f"({choices})")
        out[op.strip()] = impl.strip()
    return out


def resolve(op: str, overrides: str = "") -> str:
    """The implementation of `op` on the current platform (an override wins). A Pallas
    kernel off its platform runs in interpret mode (see `interpret`)."""
    chosen = parse(overrides).get(op)
    if chosen is not None:
        return chosen
    impl = TABLE[op].get(platform(), TABLE[op]["cpu"])
    return "blocked" if impl == "mgpu" and not _hopper() else impl


def _hopper() -> bool:
    """False on a CUDA device that is not sm_90 (mgpu's WGMMA kernels are Hopper's);
    lowering without a GPU (experiments/dry_run.py --lower=cuda) assumes an H100/H200."""
    if jax.default_backend() != "gpu":
        return True
    return str(getattr(jax.devices()[0], "compute_capability", "9.0")).startswith("9.")


def interpret(impl: str) -> bool:
    """True when a Pallas kernel runs off its platform (CPU tests): interpret mode."""
    return impl in NATIVE and NATIVE[impl] != platform()


def validate(config) -> None:
    """Refuses an unknown op or implementation in model.kernels, naming the field (the
    sparse block the Triton kernel needs: m6jax/model/sparse.py's validate)."""
    parse(config.model.kernels)
