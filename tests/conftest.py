"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most of the suite's time is XLA compiling the same few steps again: in each test that
# rebuilds a step, in a kill and its resume, in a run and its reference, in the slow set
# after the default suite. jax's persistent cache is keyed by the program, the compile
# options and XLA_FLAGS, so a hit is the executable a fresh compile would give; the
# subprocesses the tests start inherit it. M6JAX_TEST_CACHE=0 compiles everything afresh.
if os.environ.get("M6JAX_TEST_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax-test-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    # A size bound turns on jax's file lock: two pytest workers write the same entries.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    if len(devs) < 8:
        pytest.fail(f"tests need 8 devices, got {len(devs)}: XLA_FLAGS was set too late")
    return devs
