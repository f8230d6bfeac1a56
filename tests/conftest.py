"""Test set-up: 8 fake CPU devices (so sharding runs on every test) and a compilation cache.

The XLA flag must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/ovd_jax/jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def seed(request):
    """A fresh random seed per test run; printed on failure so the case can be replayed.

    Set OVD_TEST_SEED to replay a failing case.
    """
    value = int(os.environ.get("OVD_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"[seed] {request.node.nodeid}: OVD_TEST_SEED={value}")
    return value


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)
