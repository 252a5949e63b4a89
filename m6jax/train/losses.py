"""Token cross-entropy, overall and per task, normalised over the global batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def text_loss(logits, batch, num_tasks: int):
    """Mean cross-entropy over all target tokens of the global batch, and per task.

    Dividing summed losses by the global token count (not averaging per device) is what
    makes the loss identical on every mesh.

    Args:
      logits: f32 [B, T, V]; batch: `targets` i32 [B, T], `loss_mask` f32 [B, T],
        `task_id` i32 [B] (or, packed, `token_task_id` i32 [B, T]), `text_mask`,
        `image_mask` (for `real_tokens`, the non-pad slots the step computed on).
    Returns:
      (loss scalar, aux) with aux = {`loss_sum`, `tokens`, `real_tokens`,
      `task_loss_sum` [K], `task_tokens` [K]} where K = num_tasks.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    mask = batch["loss_mask"].astype(jnp.float32)
    per_example = (ce * mask).sum(-1)                                              # [B]
    tokens_per_example = mask.sum(-1)                                              # [B]
    aux = dict(loss_sum=per_example.sum(), tokens=tokens_per_example.sum(),
               real_tokens=batch["text_mask"].sum() + batch["image_mask"].sum())
    if "token_task_id" in batch:  # a packed row holds examples of several tasks
        onehot = jax.nn.one_hot(batch["token_task_id"], num_tasks, dtype=jnp.float32)  # [B, T, K]
        aux.update(task_loss_sum=jnp.einsum("btk,bt->k", onehot, ce * mask),
                   task_tokens=jnp.einsum("btk,bt->k", onehot, mask))
    else:
        onehot = jax.nn.one_hot(batch["task_id"], num_tasks, dtype=jnp.float32)    # [B, K]
        aux.update(task_loss_sum=onehot.T @ per_example, task_tokens=onehot.T @ tokens_per_example)
    return aux["loss_sum"] / jnp.maximum(aux["tokens"], 1.0), aux
