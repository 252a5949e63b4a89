"""Pseudo-to-Real ablation (M6-10T) at a size this 2-core CPU affords.

Variants (`--config=experiments/configs/p2r_ablation.py:VARIANT`):
  scratch                 the Real model (NUM_LAYERS layers of their own weights) from step 0
  p2r_S                   the Pseudo model (one block's weights shared by every layer)
                          delinked at step S, then trained as the Real model; same steps,
                          data and schedule; optimizer handoff DEFAULT_HANDOFF
  p2r_S_MODE              the same with handoff MODE = copy | scaled | reinit
                          (`pseudo_to_real.optimizer`); reinit re-warms the learning rate
                          over REINIT_WARMUP steps after the switch, copy and scaled do not
  p2r_S_MODE_wW           the same with a W-step re-warmup (any mode; w0 = none)
  moe_<any of the above>  the same with every MOE_EVERY-th layer a top-1 MoE of
                          MOE_EXPERTS experts (the scanned unit is then MOE_EVERY layers)

Deep and narrow, so that sharing has something to share: NUM_LAYERS layers of width
EMB_DIM, TOTAL_STEPS steps of batch BATCH_SIZE (`experiments/p2r_ablation.py` says what
a run costs here). The knobs are module constants so the ablation script and a reader see
one place.
"""
import os
import re
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import m6  # noqa: E402

NUM_LAYERS = 12
EMB_DIM = 64
BATCH_SIZE = 8
TOTAL_STEPS = 1000
WARMUP_STEPS = 50
SWITCH_STEPS = (100, 300)  # 10% and 30% of the run (two: what the shared CPU affords)
HANDOFFS = ("copy", "scaled", "reinit")
DEFAULT_HANDOFF = "scaled"
REINIT_WARMUP = 50  # reinit's re-warmup: Adam restarts its bias correction at full lr otherwise
MOE_EXPERTS, MOE_EVERY = 4, 2

_VARIANT = re.compile(r"^(moe_)?(?:scratch|p2r_(\d+)(?:_(copy|scaled|reinit))?(?:_w(\d+))?)$")


def get_config(arg: str = "scratch") -> ml_collections.ConfigDict:
    arg = arg or "scratch"
    match = _VARIANT.match(arg)
    if not match:
        raise ValueError(f"unknown variant {arg!r} of experiments/configs/p2r_ablation.py; use "
                         "[moe_]scratch or [moe_]p2r_<switch step>[_copy|_scaled|_reinit][_w<steps>], "
                         "e.g. p2r_300_scaled or moe_p2r_100_reinit_w50")
    moe, switch, handoff, warmup = match.groups()
    c = m6.get_config("tiny")
    c.variant = arg
    c.model.update(emb_dim=EMB_DIM, num_heads=4, mlp_dim=4 * EMB_DIM, num_layers=NUM_LAYERS)
    if moe:
        from m6_moe import moe_section
        c.model.moe = moe_section(num_experts=MOE_EXPERTS, k=1, every=MOE_EVERY)
    c.batch_size = BATCH_SIZE
    c.total_steps = TOTAL_STEPS
    c.log_every = 5
    c.eval_every = 10 * TOTAL_STEPS  # the final eval only: evals would cost every run alike
    c.checkpoint_every = 0  # checkpoint at the end only
    c.optimizer.warmup_steps = WARMUP_STEPS
    c.num_caption_samples = 0
    if switch is None:
        return c
    c.model.share_layers = True
    c.pseudo_to_real.switch_step = int(switch)
    c.pseudo_to_real.optimizer = handoff or DEFAULT_HANDOFF
    if warmup is not None:
        c.pseudo_to_real.switch_warmup_steps = int(warmup)
    elif c.pseudo_to_real.optimizer == "reinit":
        c.pseudo_to_real.switch_warmup_steps = REINIT_WARMUP
    c.pseudo_to_real.lr_schedule = "continue"  # the same learning rates as scratch
    return c
