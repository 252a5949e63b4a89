"""config.profile_steps and model.image_encoder are refused early, naming the field; the
profiler traces exactly its window."""
import os

import jax
import jax.numpy as jnp
import pytest

from helpers import tiny_config
from m6jax.config_checks import validate_config
from m6jax.train.profile import StepProfiler, parse_profile_steps


@pytest.mark.parametrize("spec, message", [
    ("10", "config.profile_steps='10' is not 'FIRST,LAST'"),
    ("5,3", "needs 1 <= FIRST <= LAST"),
    ("8,20", "ends after total_steps=10"),
])
def test_bad_profile_steps_name_the_field(spec, message):
    c = tiny_config()
    c.profile_steps = spec
    with pytest.raises(ValueError, match=message):
        validate_config(c, 1)


@pytest.mark.parametrize("overrides, message", [
    (dict(image_encoder="vit"), "model.image_encoder='vit' is not one of patches, resnet"),
    (dict(image_encoder="resnet", resnet_width=12), "model.resnet_width=12 must be positive and divisible by mesh.fsdp=8"),
])
def test_bad_image_encoder_fields_name_the_field(overrides, message):
    c = tiny_config(fsdp=8)
    c.model.update(overrides)
    with pytest.raises(ValueError, match=message):
        validate_config(c, 8)


def test_resnet_needs_a_power_of_two_patch():
    c = tiny_config()
    c.model.image_encoder = "resnet"
    c.data.update(image_size=12, patch_size=6)
    with pytest.raises(ValueError, match="data.patch_size=6 must be a power of 2"):
        validate_config(c, 1)


def test_profiler_traces_its_window_into_the_tensorboard_dir(tmp_path):
    c = tiny_config()
    c.profile_steps = "2,3"
    assert parse_profile_steps(c.profile_steps) == (2, 3)
    prof = StepProfiler(c, str(tmp_path), start_step=0)
    f = jax.jit(lambda x: x * 2)
    for done in range(1, 5):
        out = f(jnp.ones(4))
        prof.after_step(done, out)
        assert prof.active == (done in (1, 2)), done  # started after step 1, stopped after 3
    traces = [n for _, _, files in os.walk(tmp_path / "tensorboard") for n in files
              if n.endswith(".xplane.pb")]
    assert len(traces) == 1
