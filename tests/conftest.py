"""Test set-up: float64 on the CPU, every random number generator seeded."""

import importlib.util
import os
import random

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
    """ArviZ 0.23 switches to numba when it is importable (the optional ``.[bambi]`` extra
    brings it), and that path of ``az.mcse(method="sd")`` fails on NumPy 2.4: keep NumPy's."""
    if importlib.util.find_spec("numba") is not None:
        import arviz

        arviz.Numba.disable_numba()


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(20261121)
    np.random.seed(20261121)  # noqa: NPY002  (legacy global RNG used by some libraries)
    yield


@pytest.fixture
def rng():
    """A seeded NumPy generator for tests that draw random designs."""
    return np.random.default_rng(20261121)
