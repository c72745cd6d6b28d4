"""Several processes or hosts on JAX's own distributed runtime.

:func:`initialize` is a thin wrapper over :func:`jax.distributed.initialize`.
After it, a streamed fit (:mod:`lmmjax.stream`: ``lmmjax.lmm(formula,
"data/", stream=True)`` or ``stream: true`` in a config) reads in each process
only its contiguous share of the Parquet row groups, and the sufficient
statistics are summed across processes with JAX's collectives
(``process_allgather``), so that every process holds the same totals; the fit
then runs unchanged (and identically) in each of them. Launch one process per
host (or several on one host), each with the same script::

    LMMJAX_COORDINATOR=10.0.0.1:9876 LMMJAX_NUM_PROCESSES=2 LMMJAX_PROCESS_ID=0 python fit.py
    LMMJAX_COORDINATOR=10.0.0.1:9876 LMMJAX_NUM_PROCESSES=2 LMMJAX_PROCESS_ID=1 python fit.py

where ``fit.py`` calls ``lmmjax.distributed.initialize()`` before anything
else touches JAX.
"""

from __future__ import annotations

import os

import jax

from lmmjax.errors import LmmInputError

__all__ = ["initialize"]

_ENV = ("LMMJAX_COORDINATOR", "LMMJAX_NUM_PROCESSES", "LMMJAX_PROCESS_ID")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> None:
    """Join this process to a JAX distributed run (a thin wrapper over JAX's own).

    Parameters
    ----------
    coordinator_address : str, optional
        ``host:port`` of process 0; default ``$LMMJAX_COORDINATOR``.
    num_processes : int, optional
        Default ``$LMMJAX_NUM_PROCESSES``.
    process_id : int, optional
        This process's index, 0 to ``num_processes - 1``; default ``$LMMJAX_PROCESS_ID``.
    **kwargs
        Passed to :func:`jax.distributed.initialize` (``local_device_ids``,
        ``initialization_timeout``, ...). With neither arguments nor the
        environment variables, JAX detects the cluster itself (SLURM, Open MPI,
        Cloud TPU).

    Raises
    ------
    LmmInputError
        When an environment variable that should hold a number does not.
    """
    env = {name: os.environ.get(name) for name in _ENV}
    coordinator_address = coordinator_address or env["LMMJAX_COORDINATOR"]
    try:
        if num_processes is None and env["LMMJAX_NUM_PROCESSES"] is not None:
            num_processes = int(env["LMMJAX_NUM_PROCESSES"])
        if process_id is None and env["LMMJAX_PROCESS_ID"] is not None:
            process_id = int(env["LMMJAX_PROCESS_ID"])
    except ValueError:
        bad = next(n for n in _ENV[1:] if env[n] is not None and not env[n].strip().isdigit())
        raise LmmInputError(
            f"environment variable {bad} must be an integer, got {env[bad]!r}"
        ) from None
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )
