"""Mixture-of-Experts: routers (routers.py), shared dispatch (dispatch.py), expert
parallel all-to-all (parallel.py) and the layer (layer.py)."""
from m6jax.model.moe.layer import DISPATCHES, MoeMlp, moe_config  # noqa: F401
from m6jax.model.moe.routers import ROUTERS, Routing  # noqa: F401
