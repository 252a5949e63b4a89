"""Bad configs are refused before anything compiles, naming the field to fix."""
import pytest

from helpers import tiny_config
from m6jax.config_checks import validate_config


def test_valid_tiny_config_passes():
    assert validate_config(tiny_config(data=-1), 8) == (8, 1, 1, 1, 1)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.model.update(num_heads=6), "model.num_heads=6 does not divide model.emb_dim=32"),
    (lambda c: c.mesh.update(data=3), "multiply to 3 but there are 8 devices"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), "only one mesh axis may be -1"),
    (lambda c: c.mesh.update(data=-1, fsdp=3), "does not divide the 8 devices"),
    (lambda c: c.mesh.update(data=2, tensor=4) or c.model.update(num_heads=8, mlp_dim=63),
     "mesh.tensor=4 does not divide model.mlp_dim=63"),
    (lambda c: c.update(batch_size=12) or c.mesh.update(data=8), "batch_size=12 is not divisible"),
    (lambda c: c.model.update(remat_policy="some"), "model.remat_policy='some'"),
    (lambda c: c.model.update(dtype="float8"), "model.dtype='float8'"),
    (lambda c: c.optimizer.update(warmup_steps=10), "optimizer.warmup_steps=10"),
    (lambda c: c.update(batch_size=0), "batch_size=0 must be positive"),
    (lambda c: c.update(seed=-3), "seed=-3 must be >= 0"),
    (lambda c: c.model.update(dtype="float16") or c.optimizer.update(loss_scale="none"),
     "model.dtype='float16' with optimizer.loss_scale='none'"),
    (lambda c: c.optimizer.update(loss_scale="static"), "optimizer.loss_scale='static' is not "
     "one of auto, dynamic, none"),
    (lambda c: c.optimizer.update(b1=1.0), r"optimizer.b1=1.0 must be in \[0, 1\)"),
    (lambda c: c.optimizer.update(weight_decay=-0.1), "optimizer.weight_decay=-0.1 must be >= 0"),
    (lambda c: c.optimizer.update(grad_clip_norm=0.0), "optimizer.grad_clip_norm=0.0 must be positive"),
    (lambda c: c.model.update(kernels="attention=cudnn"), "model.kernels='attention=cudnn'"),
])
def test_bad_config_names_the_field(edit, message):
    c = tiny_config()
    c.mesh.update(data=8)
    edit(c)
    pattern = message if "\\" in message or ".*" in message else (
        message.replace("(", r"\(").replace("*", r"\*"))
    with pytest.raises(ValueError, match=pattern):
        validate_config(c, 8)


def _moe_config():
    from configs.m6_moe import moe_section
    c = tiny_config()
    c.mesh.update(data=8)
    c.model.moe = moe_section(num_experts=8, every=2)
    return c


def test_valid_moe_config_passes():
    assert validate_config(_moe_config(), 8) == (8, 1, 1, 1, 1)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(router="prototype", num_experts=6, k=4),
     "model.moe.num_experts=6 is not divisible by model.moe.k=4"),
    (lambda m: m.update(every=3), "model.moe.every=3 must be >= 1 and divide model.num_layers=2"),
    (lambda m: m.update(router="expert_choice"), "model.moe.router='expert_choice'"),
    (lambda m: m.update(dispatch="magic"), "model.moe.dispatch='magic'"),
    (lambda m: m.update(router="hash", k=2), "model.moe.k=2 must be 1"),
    (lambda m: m.update(k=9), r"model.moe.k=9 must be in \[1, model.moe.num_experts=8\]"),
    (lambda m: m.update(aux_loss_weight=-1.0), "model.moe.aux_loss_weight=-1.0"),
    (lambda m: m.update(num_experts=7, router="domain"), "model.moe.num_experts=7 must be even"),
])
def test_bad_moe_config_names_the_field(edit, message):
    c = _moe_config()
    edit(c.model.moe)
    with pytest.raises(ValueError, match=message):
        validate_config(c, 8)


def test_expert_axis_must_divide_num_experts():
    c = _moe_config()
    c.model.moe.num_experts = 6
    c.mesh.update(data=2, expert=4)
    with pytest.raises(ValueError, match="mesh.expert=4 does not divide model.moe.num_experts=6"):
        validate_config(c, 8)
