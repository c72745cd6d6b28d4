"""``python -m lmmjax.fit config.yaml``: the command line as a process (see :mod:`lmmjax.cli`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lmmjax.memory import collector_paused, freeze_for_exit, freeze_imports

__all__ = ["run_process"]


def run_process(argv: Sequence[str] | None = None) -> int:
    """Run :func:`lmmjax.cli.main` as a whole process; the ``lmmjax-fit`` script.

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


if __name__ == "__main__":
    sys.exit(run_process())
