"""M6-10T: 10 trillion parameters on 512 GPUs in about 10 days, trained with
Pseudo-to-Real (sharing-delinking) and granular CPU offload.

NOTE: the Pseudo-to-Real and host-offload config fields do not exist yet (that issue
has not landed); this file fixes only the Real Giant's shapes and mesh. The dry run
therefore reports all state on the device (host bytes 0) and that it does not fit.

Variants: `paper` (default) and `tiny` (same structure, 8 experts; runs here).
Shapes are ours (the paper's exact widths are not at hand): 4096 wide, 48 layers,
every layer MoE with 512 Switch top-1 experts of mlp_dim 49664: 10.0T parameters.
Mesh: the expert axis spans all 512 GPUs (one expert each). GPU type not stated; we
plan for 32 GB devices (ours).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_scale as ps  # noqa: E402

MOE = dict(router="topk", k=1, every=1, capacity_factor=1.25, dispatch="gather")


def get_config(arg: str = "paper"):
    arg = arg or "paper"
    if arg == "paper":
        return ps.paper_base(
            arg, mesh=dict(data=1, fsdp=1, tensor=1, expert=512),
            model=dict(emb_dim=4096, num_heads=32, mlp_dim=49664, num_layers=48,
                       dtype="bfloat16", remat_policy="full"),
            batch_size=512, hw=ps.hardware(512, "GPU-32GB", 32),
            moe=dict(MOE, num_experts=512))
    if arg == "tiny":
        return ps.tiny_base(arg, moe=dict(MOE, num_experts=8), remat_policy="full")
    raise ps.unknown_variant(arg, "m6_10t.py")
