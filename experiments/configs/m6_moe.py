"""M6 with Mixture-of-Experts feed-forward layers (M6-MoE / M6-T).

Built on experiments/configs/m6.py (same data, optimizer, variants), plus `model.moe`.
Variants (`--config=experiments/configs/m6_moe.py:VARIANT`):
  tiny, small, base     m6.py's variant with 8 experts, Switch top-1, MoE every 2nd layer.
  ablation_ROUTING[_noaux]   the routing ablation (experiments/routing_ablation.py) on
                        the tiny model: ROUTING in top1, top2, 2top1, 4top1, hash; `_noaux`
                        sets the load-balancing loss weight to 0.

model.moe fields:
  num_experts           E (0 = dense: the model is exactly m6.py's)
  router                topk | prototype (M6-T "k top-1") | hash | domain (image/text)
  k                     choices per token (topk) or prototypes (prototype); 1 otherwise
  every                 an MoE FFN every N layers (the last of each N); num_layers % N == 0
  capacity_factor       slots per expert = ceil(tokens * k * factor / E) per example;
                        0 = dropless (sort + jax.lax.ragged_dot)
  eval_capacity_factor  the same for evaluation
  aux_loss_weight       Switch load-balancing loss weight (0 allowed)
  z_loss_weight         router z-loss weight (0 allowed)
  jitter                multiplicative router-input noise in [1-j, 1+j] while training
  dispatch              capacity paths (the same choices drop in all four):
                          capacity the backend's (m6jax/kernels.py): grouped on
                                   CPU, gather on GPU/TPU (tiny's default)
                          gather   [G, E, C, D] slots by index gathers (the default;
                                   shards experts over mesh.expert)
                          einsum   the same slots by one-hot matmuls
                          grouped  the kept choices through the grouped matmuls, no
                                   slot buffer (tiny and the routing ablations: the
                                   fastest on this CPU, BENCHMARKS.md; mesh.expert=1)
                        dropless paths: dropless (the backend's: blocked on CPU,
                        mgpu on a Hopper GPU in 16-bit, megablox on TPU) | blocked
                        (sort + a block per expert, grouped matmuls) | ragged_dot
                        (jax.lax.ragged_dot) | megablox | mgpu
  group_size            tokens per routing group: consecutive tokens of consecutive
                        examples; must divide the tokens per device and microbatch;
                        0 = one example per group (tiny/small/base: 4 examples)
  priority              order (first choices, then token order) | score (first
                        choices, then highest router probability: V-MoE's BPR)
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import m6  # noqa: E402
from m6jax import schema  # noqa: E402

# name -> (router, k): equal expert count, M6-T's comparison.
ABLATION_ROUTINGS = {"top1": ("topk", 1), "top2": ("topk", 2), "2top1": ("prototype", 2),
                     "4top1": ("prototype", 4), "hash": ("hash", 1)}


def moe_section(**overrides) -> ml_collections.ConfigDict:
    """`model.moe` with `overrides` (every field and its default: m6jax/schema.py MOE)."""
    return schema.moe_section(**overrides)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg.startswith("ablation_"):
        name = arg[len("ablation_"):]
        noaux = name.endswith("_noaux")
        name = name[: -len("_noaux")] if noaux else name
        if name not in ABLATION_ROUTINGS:
            raise ValueError(f"unknown ablation routing {name!r} in m6_moe.py:{arg}; use one "
                             f"of {', '.join(ABLATION_ROUTINGS)} (optionally + '_noaux')")
        router, k = ABLATION_ROUTINGS[name]
        c = m6.get_config("tiny")
        c.model.moe = moe_section(router=router, k=k, dispatch="capacity",
                                  aux_loss_weight=0.0 if noaux else 0.01)
        c.variant = arg
        return c
    c = m6.get_config(arg)
    # Groups of 4 examples (tiny: 256 tokens, C = 40 per expert, 0.5% dropped under
    # uniform routing instead of 4.5% with one example per group), slots by score.
    seq = (c.data.image_size // c.data.patch_size) ** 2 + c.data.text_len
    c.model.moe = moe_section(group_size=4 * seq, priority="score")
    if arg == "tiny":  # grouped on CPU (measured fastest here, BENCHMARKS.md), gather on GPU/TPU
        c.model.moe.dispatch = "capacity"
    return c
