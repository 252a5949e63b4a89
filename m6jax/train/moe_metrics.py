"""MoE auxiliary losses and metrics: from the model's sown per-layer values to the step's
loss, the progress line, TensorBoard and summary.json. Dense models give zeros / nothing.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from m6jax.model.moe import moe_config

PREFIX = "moe/"


def aux_loss_and_metrics(model_cfg, intermediates):
    """(weighted aux loss scalar, metrics) from `intermediates['moe']`.

    The per-layer values are [L_moe, ...] (one row per MoE layer). Aux losses are
    averaged over MoE layers, so their weights do not depend on depth. Reported:
    `moe/balance_loss`, `moe/z_loss`, `moe/router_entropy` (layer means),
    `moe/dropped_fraction`, `moe/load_max_over_mean` (worst layer), `moe/load` [L, E].
    """
    moe = moe_config(model_cfg)
    if moe is None or "moe" not in intermediates:
        return jnp.zeros((), jnp.float32), {}
    (m,) = intermediates["moe"]
    balance, z = jnp.mean(m["balance_loss"]), jnp.mean(m["z_loss"])
    load = m["load"]                                                    # [L, E], rows sum to 1
    loss = moe.aux_loss_weight * balance + moe.z_loss_weight * z
    return loss, {
        PREFIX + "aux_loss": loss, PREFIX + "balance_loss": balance, PREFIX + "z_loss": z,
        PREFIX + "router_entropy": jnp.mean(m["router_entropy"]),
        PREFIX + "dropped_fraction": jnp.max(m["dropped_fraction"]),
        PREFIX + "load_max_over_mean": jnp.max(jnp.max(load, -1) * load.shape[-1]),
        PREFIX + "load": load}


def scalars(metrics) -> dict[str, float]:
    """Host-side scalar MoE metrics of one step (for metrics.jsonl / the progress line)."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()
            if k.startswith(PREFIX) and np.ndim(v) == 0}


def write_histograms(writer, step: int, metrics):
    """One TensorBoard histogram per MoE layer: each expert's load / mean load."""
    load = metrics.get(PREFIX + "load")
    if load is not None:
        load = np.asarray(load)
        for i, row in enumerate(load):
            writer.histogram(step, f"{PREFIX}load_over_mean/layer{i}", row * row.shape[0])


def summary(metrics, last_logged=None) -> dict[str, float]:
    """The summary.json fields: final values, worst MoE layer.

    `metrics` is the last step's metrics, or None when no step ran in this process (a
    rerun of a finished run); then `last_logged(key)` reads them from metrics.jsonl.
    """
    keys = dict(expert_load_max_over_mean="load_max_over_mean", dropped_fraction="dropped_fraction")
    if metrics is None:
        values = {k: last_logged(PREFIX + v) for k, v in keys.items()} if last_logged else {}
        return {k: v for k, v in values.items() if v == v}  # nan: a dense run logged none
    if PREFIX + "load" not in metrics:
        return {}
    return {k: float(metrics[PREFIX + v]) for k, v in keys.items()}
