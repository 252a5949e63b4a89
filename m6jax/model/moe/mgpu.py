"""The dropless grouped matmul on Hopper GPUs: jax's Mosaic GPU ragged-dot kernels.

`gmm(rows, w, sizes)` = `jax.lax.ragged_dot(rows, w, sizes)` (rows [N, K] sorted by
group, w [E, K, M], sizes [E]; rows past sum(sizes) give 0), computed by
`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` (WGMMA, sm_90) with a VJP of the
same family: the row gradient is the ragged dot against the transposed weights
(`transpose_rhs`), the weight gradient `transposed_ragged_dot_mgpu` (per group,
rows^T @ dy). Unlike XLA's `ragged_dot` on GPU, neither expands into a zero-padded
[E, N, ...] dense matmul.

The kernels take 16-bit operands and whole tiles: rows are padded to 128 and feature
widths to 64 with zeros (exact; cut off after). They have no interpret mode, so the CPU
tests swap in `jax.lax.ragged_dot_general` references for `KERNELS` (the padding, the
masking and the VJP are ours and tested; the kernels are jax's) and check the lowered
CUDA step for the Mosaic GPU calls. GPU numerics and speed: benchmarks/gpu_kernels.sh.
"""
from __future__ import annotations

import contextlib
import types
from unittest import mock

import jax
import jax.numpy as jnp

_ROWS, _WIDTH = 128, 64       # row and feature-width padding (the kernels' tiles)
_SMS = 132                    # H100/H200 SXM streaming multiprocessors (for lowering only)


def _tile(dim: int) -> int:
    return 128 if dim % 128 == 0 else 64


def _ragged_dot(lhs, rhs, sizes, transpose_rhs=False):
    """lhs [N, K] @ rhs[g] ([E, K, M], or [E, M, K] with transpose_rhs) per row group."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    _on_cuda()
    k = lhs.shape[1]
    m = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return ragged_dot_mgpu.ragged_dot(
        lhs, rhs, group_sizes=sizes, block_m=_ROWS, block_n=_tile(m), block_k=_tile(k),
        max_concurrent_steps=2, grid_block_n=1, transpose_rhs=transpose_rhs)


def _transposed(lhs, dy, sizes):
    """[E, K, M]: per group g, lhs[rows of g]^T @ dy[rows of g]."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    _on_cuda()
    k, m = lhs.shape[1], dy.shape[1]
    with _sm_count_for_lowering(trd):
        return trd.transposed_ragged_dot(
            lhs, dy, group_sizes=sizes, block_m=_tile(k), block_n=_tile(m), block_k=_WIDTH,
            max_concurrent_steps=2, grid_block_n=1)


def _on_cuda():
    from m6jax import kernels
    if kernels.platform() != "cuda":
        raise ValueError(f"the mgpu grouped matmul (model.moe.dispatch=mgpu or model.kernels="
                         f"gmm=mgpu) is a CUDA (Hopper) kernel and this backend is "
                         f"{kernels.platform()}: use blocked")


@contextlib.contextmanager
def _sm_count_for_lowering(module):
    """transposed_ragged_dot_mgpu reads jax.devices()[0].core_count (the SM count); a CPU
    device lowering for CUDA (experiments/dry_run.py --lower=cuda) has none, so it gets
    an H100/H200's. On a GPU the real device answers."""
    if jax.default_backend() == "gpu":
        yield
        return
    fake = types.SimpleNamespace(core_count=_SMS)
    with mock.patch.object(module.jax, "devices", lambda *a, **k: [fake]):
        yield


# (ragged dot, transposed ragged dot): the tests replace these with XLA references.
KERNELS = {"ragged_dot": _ragged_dot, "transposed": _transposed}


def _pad(a, rows: int, cols: int):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def _live(y, sizes):
    """Rows past sum(sizes) belong to no group; the kernels leave them unwritten."""
    return jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(sizes), y, 0)


@jax.custom_vjp
def gmm(rows, w, sizes):
    return _forward(rows, w, sizes)


def _tiled(rows, w):
    """rows [N, K], w [E, K, M] zero-padded to the kernels' tiles (N to 128, K, M to 64)."""
    (n, k), m = rows.shape, w.shape[2]
    kp, mp = _up(k, _WIDTH), _up(m, _WIDTH)
    return _pad(rows, _up(n, _ROWS), kp), jnp.pad(w, ((0, 0), (0, kp - k), (0, mp - m)))


def _forward(rows, w, sizes):
    (n, _), m = rows.shape, w.shape[2]
    rows_p, w_p = _tiled(rows, w)
    return _live(KERNELS["ragged_dot"](rows_p, w_p, sizes)[:n, :m], sizes)


def _gmm_fwd(rows, w, sizes):
    return _forward(rows, w, sizes), (rows, w, sizes)


def _gmm_bwd(res, dy):
    rows, w, sizes = res
    (n, k), m = rows.shape, w.shape[2]
    rows_p, w_p = _tiled(rows, w)
    dy_p = _pad(dy.astype(rows.dtype), rows_p.shape[0], w_p.shape[2])
    drows = KERNELS["ragged_dot"](dy_p, w_p, sizes, transpose_rhs=True)[:n, :k]
    dw = KERNELS["transposed"](rows_p, dy_p, sizes)[:, :k, :m]
    return _live(drows, sizes), dw.astype(w.dtype), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def reference_kernels():
    """The kernels' semantics in XLA ops (for CPU tests). ragged_dot_mgpu never writes
    the rows past sum(sizes): NaN here, so a caller that reads them fails."""
    def ragged_dot(lhs, rhs, sizes, transpose_rhs=False):
        rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        y = jax.lax.ragged_dot(lhs, rhs, sizes)
        return jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(sizes), y, jnp.nan)

    def transposed(lhs, dy, sizes):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())),
            lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(lhs, dy, sizes, ragged_dot_dimension_numbers=dims)
    return {"ragged_dot": ragged_dot, "transposed": transposed}
