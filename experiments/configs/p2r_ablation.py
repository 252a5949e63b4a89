"""Pseudo-to-Real ablation (M6-10T) at a size this 2-core CPU affords.

Variants (`--config=experiments/configs/p2r_ablation.py:VARIANT`):
  scratch   the Real model (8 layers of its own weights) trained from step 0
  p2r_S     the Pseudo model (one block's weights shared by all 8 layers) delinked at
            step S, then trained as the Real model; same steps, data and schedule

A deeper-than-wide model, so that sharing has something to share: 8 layers of width 96.
`experiments/p2r_ablation.py` runs `scratch` and SWITCH_STEPS and compares them.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import m6  # noqa: E402

TOTAL_STEPS = 300
SWITCH_STEPS = (30, 75, 150)  # 10%, 25% and 50% of the run


def get_config(arg: str = "scratch") -> ml_collections.ConfigDict:
    arg = arg or "scratch"
    c = m6.get_config("tiny")
    c.variant = arg
    c.model.update(emb_dim=96, num_heads=4, mlp_dim=384, num_layers=8)
    c.batch_size = 16
    c.total_steps = TOTAL_STEPS
    c.log_every = 5
    c.eval_every = 10 * TOTAL_STEPS  # the final eval only: evals would cost every run alike
    c.checkpoint_every = 0  # checkpoint at the end only
    c.optimizer.warmup_steps = 30
    c.num_caption_samples = 0
    if arg == "scratch":
        return c
    if not arg.startswith("p2r_") or not arg[4:].isdigit():
        raise ValueError(f"unknown variant {arg!r} of experiments/configs/p2r_ablation.py; "
                         "use scratch or p2r_<switch step>, e.g. p2r_75")
    c.model.share_layers = True
    c.pseudo_to_real.switch_step = int(arg[4:])
    # The Real model starts with fresh moments (the paper does not say; `copy` is the
    # other choice) and the schedule goes on: the same learning rates as scratch.
    c.pseudo_to_real.optimizer = "reinit"
    c.pseudo_to_real.lr_schedule = "continue"
    return c
