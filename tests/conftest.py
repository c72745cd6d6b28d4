"""Test set-up: float64 on the CPU, every random number generator seeded."""

import os
import random

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(20261121)
    np.random.seed(20261121)  # noqa: NPY002  (legacy global RNG used by some libraries)
    yield


@pytest.fixture
def rng():
    """A seeded NumPy generator for tests that draw random designs."""
    return np.random.default_rng(20261121)
