"""``python -m lmmjax.fit config.yaml``: the command line as a process (see :mod:`lmmjax.cli`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lmmjax.memory import collector_paused, freeze_for_exit, freeze_imports

__all__ = ["exit_process", "run_process"]


def run_process(argv: Sequence[str] | None = None) -> int:
    """Run :func:`lmmjax.cli.main` as a whole process, and return its exit status.

    The command line's modules import with the cyclic collector held off,
    everything alive is frozen as each import ends (so that the collector's
    passes during the fit walk only the fit's objects) and again before
    returning (so that the interpreter's shutdown does not walk them; see
    :mod:`lmmjax.memory`). Only for a process
    that exits on return; in a session call :func:`lmmjax.cli.main`.
    """
    freeze_imports()
    with collector_paused():
        from lmmjax.cli import main
    status = main(argv)
    freeze_for_exit()
    return status


def exit_process(argv: Sequence[str] | None = None) -> NoReturn:
    """:func:`run_process`, then end the process at once; the ``lmmjax-fit`` script.

    Output is flushed and the process ends with ``os._exit``, skipping the
    interpreter's shutdown: tearing down the modules and XLA's CPU client took
    60-70 ms of a 1.3-1.5 s sleepstudy fit. Nothing is left to do by then:
    the JSON result and the compile caches are written before :func:`run_process`
    returns. A process of a distributed run (``LMMJAX_COORDINATOR``) shuts
    down normally, so that JAX's distributed runtime leaves in step with the others.
    Where the output cannot be flushed (a closed pipe) the status is 120, as
    Python's own shutdown makes it.
    """
    status = run_process(argv)
    if os.environ.get("LMMJAX_COORDINATOR"):
        sys.exit(status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # closed when the process started (">&-")
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: Python's own shutdown exits 120 then
            status = status or 120
    _flush_c_streams()
    os._exit(status)


def _flush_c_streams() -> None:
    """Flush the C library's buffered streams, which ``os._exit`` would drop."""
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not a POSIX system)
        pass


if __name__ == "__main__":
    exit_process()
