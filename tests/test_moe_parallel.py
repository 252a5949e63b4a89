"""Routing groups and dropless under expert parallelism: the train step's loss, MoE
metrics and gradients on a (data 2, expert 4) mesh equal one device's, and the compiled
step never all-gathers an expert weight (the dropless path used to let GSPMD replicate
every expert onto every device)."""
import re

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
