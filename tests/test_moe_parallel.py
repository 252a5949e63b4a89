"""Routing groups and dropless under expert parallelism: the train step's loss, MoE
metrics and gradients on a (data 2, expert 4) mesh equal one device's, and the compiled
step never all-gathers an expert weight (the dropless path used to let GSPMD replicate
every expert onto every device). The dropless exchange's bytes per device do not grow
with the expert axis (model.moe.peer_capacity_factor), read from the compiled HLO."""
import re

import numpy as np
import pytest

from test_moe_mesh import _run, moe_tiny_config  # noqa: F401  (shared step builder)
import test_moe_mesh


E, D, M = 8, 32, 64  # the tiny config's experts, emb_dim, mlp_dim


def expert_weight_all_gathers(hlo: str) -> list[str]:
    """HLO all-gathers whose result holds all E experts of a [E, D, M] / [E, M, D] leaf."""
    full = re.compile(rf"\[(?:\d+,)?{E},(?:{D},{M}|{M},{D})\]")
    return [line.strip()[:160] for line in hlo.splitlines()
            if re.search(r"\ball-gather(-start)?\(", line) and full.search(line.split("=")[1])]


def _with_moe(monkeypatch, **moe):
    base = test_moe_mesh.moe_tiny_config

    def config(**mesh):
        c = base(**mesh)
        c.model.moe.update(moe)
        return c
    monkeypatch.setattr(test_moe_mesh, "moe_tiny_config", config)


CASES = {  # name -> model.moe overrides
    "group_size_score": dict(group_size=14, priority="score"),   # half an example (28 tokens)
    "blocked": dict(dispatch="blocked"),
    "ragged_dot": dict(dispatch="ragged_dot"),
}


# Each case compiles two train steps; the default suite keeps the dropless one (the
# replication regression), the others run with the slow set.
@pytest.mark.parametrize("case", [
    pytest.param("group_size_score", marks=pytest.mark.slow), "blocked",
    pytest.param("ragged_dot", marks=pytest.mark.slow)])
def test_data_expert_mesh_matches_one_device_without_gathering_experts(case, devices,
                                                                      monkeypatch):
    _with_moe(monkeypatch, **CASES[case])
    (ref_loss, ref_m, ref_g), _ = _run((1, 1, 1, 1), devices)
    (loss, m, grads), hlo = _run((2, 1, 1, 4), devices)
    if case == "group_size_score":
        assert ref_m["moe/dropped_fraction"] > 0, "the case should drop some tokens"
    test_moe_mesh.assert_same_step((loss, m, grads), (ref_loss, ref_m, ref_g))
    assert "all-to-all" in hlo
    assert not expert_weight_all_gathers(hlo), expert_weight_all_gathers(hlo)[:3]


@pytest.mark.parametrize("dispatch", ["grouped", pytest.param("blocked", marks=pytest.mark.slow)])
def test_sorting_paths_on_a_data_fsdp_mesh_match_one_device_and_sort_locally(
        dispatch, devices, monkeypatch):
    # `grouped` and the dropless paths sort choices by expert; without an expert axis
    # each device must sort its own groups (shard_map over the batch axes). Left to
    # GSPMD the sort all-gathers every device's expert indices (s32), which is what this
    # HLO check catches.
    _with_moe(monkeypatch, dispatch=dispatch)
    (ref_loss, ref_m, ref_g), _ = _run((1, 1, 1, 1), devices)
    (loss, m, grads), hlo = _run((2, 2, 1, 1), devices)
    if dispatch == "grouped":
        assert ref_m["moe/dropped_fraction"] > 0, "the case should drop some tokens"
    test_moe_mesh.assert_same_step((loss, m, grads), (ref_loss, ref_m, ref_g))
    index_gathers = [line.strip()[:160] for line in hlo.splitlines()
                     if re.search(r"\ball-gather(-start)?\(", line) and "= s32[" in line]
    assert not index_gathers, index_gathers[:3]


# --- the dropless exchange's traffic (issue 27) ---------------------------------------

G_DEV, S_GROUP, K = 2, 16, 2   # per device: 2 groups of 16 tokens, 2 choices: N = 64 rows


def _dropless_on(n, expert_index, factor, devices, seed=0):
    """parallel.dropless on (data 8/n, expert n) over [8 * G_DEV, S, D] tokens, E experts:
    (y, sent, HLO, x, wi, wo, combine)."""
    import jax
    from m6jax import sharding
    from m6jax.model.moe import parallel
    from m6jax.model.moe.routers import Routing
    rng = np.random.default_rng(seed)
    g = 8 * G_DEV
    x = rng.normal(size=(g, S_GROUP, D)).astype(np.float32)
    wi = (rng.normal(size=(E, D, M)) / np.sqrt(D)).astype(np.float32)
    wo = (rng.normal(size=(E, M, D)) / np.sqrt(M)).astype(np.float32)
    combine = rng.uniform(0.2, 1.0, size=(g, S_GROUP, K)).astype(np.float32)
    mesh = sharding.make_mesh(dict(data=8 // n, fsdp=1, tensor=1, expert=n, stage=1), devices)

    def f(x, e, c, wi, wo):
        return parallel.dropless(x, Routing(e, c, None, None, None), wi, wo, jax.nn.relu,
                                 "blocked", True, factor)

    with jax.set_mesh(mesh):
        compiled = jax.jit(f).lower(x, expert_index, combine, wi, wo).compile()
        y, sent = compiled(x, expert_index, combine, wi, wo)
    return np.asarray(y), np.asarray(sent), compiled.as_text(), x, wi, wo, combine


def _per_token(x, expert_index, combine, wi, wo, sent):
    """The reference: y[t] = sum over t's sent choices of c * relu(x W_i[e]) W_o[e]."""
    y = np.zeros(x.shape, np.float64)
    for idx in np.ndindex(*expert_index.shape):
        if sent[idx]:
            e = expert_index[idx]
            h = np.maximum(x[idx[:2]].astype(np.float64) @ wi[e], 0)
            y[idx[:2]] += combine[idx] * (h @ wo[e])
    return y


def all_to_all_bytes(hlo: str) -> int:
    """Bytes one device sends through the HLO's all-to-alls (their per-device results)."""
    size = {"f32": 4, "s32": 4, "bf16": 2, "pred": 1}
    total = 0
    for line in hlo.splitlines():
        if not re.search(r"\ball-to-all\(", line):
            continue
        result = line.split("all-to-all(")[0]
        for dtype, dims in re.findall(r"(f32|s32|bf16|pred)\[([\d,]*)\]", result):
            total += size[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total



def _spread_routing():
    """Choice j of a device goes to expert j mod E: every peer gets N / n rows."""
    flat = np.arange(8 * G_DEV * S_GROUP * K) % E
    return flat.reshape(8 * G_DEV, S_GROUP, K).astype(np.int32)


def test_dropless_bytes_sent_per_device_do_not_grow_with_the_expert_axis(devices):
    """At 64 choices per device, peer_capacity_factor=1 sends 64 rows per device (and
    their expert ids and outputs) at expert 2, 4 and 8; factor 0 (all 64 per peer)
    would send n x 64. The result equals the per-token reference (no choice overflows)."""
    routing = _spread_routing()
    sent_bytes = {}
    for n in (2, 4, 8):
        y, sent, hlo, x, wi, wo, c = _dropless_on(n, routing, 1.0, devices)
        assert sent.all()
        np.testing.assert_allclose(y, _per_token(x, routing, c, wi, wo, sent), rtol=2e-5, atol=2e-5)
        sent_bytes[n] = all_to_all_bytes(hlo)
    rows = 8 * G_DEV * S_GROUP * K // 8   # choices per device
    assert sent_bytes == {n: rows * (D + 1 + D) * 4 for n in (2, 4, 8)}, sent_bytes
    # factor 0 (all 64 rows per peer) sends n x this: benchmarks/expert_exchange.py
    # measures it, and the `dropless_n_fold` mutation makes this test red.


def test_dropless_peer_block_overflow_drops_the_later_choices(devices):
    """Every choice to experts 0 and 1 (peer 0 at expert=4, 2 experts per peer): each
    device's block for peer 0 holds ceil(1.0 x 64 / 4) = 16 rows, its first 16 choices in
    (token, choice) order, i.e. the first 8 tokens of its first group; the rest add 0."""
    routing = np.zeros((8 * G_DEV, S_GROUP, K), np.int32)
    routing[..., 1] = 1
    y, sent, _, x, wi, wo, c = _dropless_on(4, routing, 1.0, devices)
    want = np.zeros(sent.shape, bool)
    want[0::G_DEV, :8] = True
    np.testing.assert_array_equal(sent, want)
    np.testing.assert_allclose(y, _per_token(x, routing, c, wi, wo, want), rtol=2e-5, atol=2e-5)


def test_the_plan_counts_the_dropless_exchange_and_warns_when_it_grows():
    """8 examples of 28 tokens, k=2, on 8 devices: 56 choices per device. With
    peer_capacity_factor=1 the send buffer is 56 rows at expert 2, 4 and 8 (each row its
    32 floats out, an int32 expert id, 32 floats back); with 0 it is n x 56, and the plan
    warns naming the field."""
    from m6jax import plan
    from test_moe_mesh import moe_tiny_config as base
    for factor, rows in ((1.0, lambda n: 56), (0.0, lambda n: n * 56)):
        for n in (2, 4, 8):
            c = base(data=8 // n, expert=n)
            c.model.moe.update(dispatch="blocked", peer_capacity_factor=factor)
            r = plan.moe_routing_plan(c, (8 // n, 1, 1, n, 1))
            x = r["expert_exchange"]
            assert x["send_rows"] == rows(n) and x["bytes_per_layer"] == rows(n) * (2 * 32 * 4 + 4)
            assert x["grows_with_expert_axis"] == (factor == 0)
            assert (r["warning"] is not None and "model.moe.peer_capacity_factor=0" in
                    r["warning"]) == (factor == 0)


@pytest.mark.slow  # four compiles of the layer (~30 s here)
def test_the_layer_counts_peer_block_overflow_as_dropped(devices):
    """MoeMlp (blocked, dropless) on (data 2, expert 4): with peer_capacity_factor 0.25
    each peer block holds a quarter of a device's choices / 4, so routing any less even
    than that drops some; `dropped_fraction` reports it (0 with factor 0)."""
    import jax
    from m6jax import schema, sharding
    from m6jax.model.moe import MoeMlp
    x = jax.random.normal(jax.random.key(0), (8, 16, D))
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=1, expert=4, stage=1), devices)
    dropped = {}
    for factor in (0.0, 0.25):
        cfg = schema.moe_section(num_experts=E, k=2, every=1, dispatch="blocked",
                                 peer_capacity_factor=factor)
        layer = MoeMlp(cfg, M, "gelu")
        with jax.set_mesh(mesh):
            params = jax.jit(layer.init)(jax.random.key(1), x)
            dropped[factor] = float(jax.jit(layer.apply)(params, x)[1]["dropped_fraction"])
    assert dropped[0.0] == 0.0 and dropped[0.25] > 0.0, dropped
