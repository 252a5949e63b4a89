"""Named remat policies (`model.remat_policy`): what a scanned layer keeps for the
backward pass; activation offload is two of them."""
from __future__ import annotations

from typing import Callable

import jax

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Activation offload: what a policy would save is parked in host memory instead and
    # brought back for the backward pass (JAX's offload policies).
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
    "offload_layer_input": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}
