"""Bad configs are refused before anything compiles, naming the field to fix."""
import pytest

from helpers import tiny_config
from m6jax.config_checks import validate_config


def test_valid_tiny_config_passes():
    assert validate_config(tiny_config(data=-1), 8) == (8, 1, 1, 1)


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
])
def test_bad_config_names_the_field(edit, message):
    c = tiny_config()
    c.mesh.update(data=8)
    edit(c)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        validate_config(c, 8)
