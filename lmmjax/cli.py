"""Command line: ``python -m lmmjax.fit config.yaml [--check] [--output PATH]``.

Reads a YAML config (see :mod:`lmmjax.config`), loads the data, builds the
model and fits it with the configured method, printing a summary and writing
the result as JSON when an output path is given. ``--check`` stops after
building the model and prints its structure.

Exit status: 0 on success; 2 on bad input (config, data, formula) or a
method that is not built yet, with one ``lmmjax: error: ...`` line on stderr;
1 with a traceback for anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmmjax
from lmmjax import api
from lmmjax.config import FitConfig, load_config
from lmmjax.datasets import load_data
from lmmjax.errors import LmmInputError, NotBuiltError
from lmmjax.memory import collector_paused
from lmmjax.methods import get_method
from lmmjax.output import write_json

__all__ = ["main"]

_USER_ERRORS = (LmmInputError, NotBuiltError, FileNotFoundError)


def _parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m lmmjax.fit",
        description="Fit a linear mixed model described by a YAML config.",
    )
    parser.add_argument("config", help="path of the YAML config file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config, build the model and print its structure without fitting",
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        default=None,
        help="write the JSON result here (overrides the config's 'output')",
    )
    return parser


def _build_model(cfg: FitConfig) -> Any:
    """Load the data and build the structured model the config describes."""
    # Imported here so that `--help` and config errors do not pay for the
    # formula and design machinery.
    with collector_paused():  # formulaic, SciPy: many objects (lmmjax.memory)
        from lmmjax.design import build_model
        from lmmjax.stream import load_streamed

    streamed = load_streamed(
        cfg.data, cfg.formula, cfg.method, stream=cfg.stream, categorical=cfg.categorical,
        weights=cfg.weights, offset=cfg.offset, batch_rows=cfg.batch_rows,
        devices=cfg.devices, base_dir=cfg.base_dir, contrasts=cfg.contrasts,
        options=cfg.options(),
    )  # fmt: skip
    if streamed is not None:
        return streamed
    df = load_data(cfg.data, base_dir=cfg.base_dir)
    opts = cfg.options()
    subs = opts.submodels() if opts is not None else {}
    drop = opts.drop_aliased() if opts is not None else True
    return build_model(
        df, cfg.formula, categorical=cfg.categorical, submodels=subs, drop_aliased=drop,
        weights=cfg.weights, offset=cfg.offset, contrasts=cfg.contrasts,
    )  # fmt: skip


def run(config: str | Path, check: bool = False, output: str | None = None) -> int:
    """Carry out one CLI invocation; user errors propagate as exceptions.

    Parameters
    ----------
    config : str or path-like
        The YAML config file.
    check : bool
        Stop after building the model and print its structure.
    output : str, optional
        JSON output path overriding the config's ``output``.

    Returns
    -------
    int
        Exit status (0).
    """
    if os.environ.get("LMMJAX_COORDINATOR"):  # one of several processes (lmmjax.distributed)
        from lmmjax.distributed import initialize

        initialize()
    cfg = load_config(config)
    if output is not None:
        cfg = cfg.model_copy(update={"output": output})
    lmmjax.set_precision(cfg.precision)
    model = _build_model(cfg)
    if check:
        print(model.describe())
        get_method(cfg.method).check(model, cfg.options())
        print("config OK (no fit: --check)")
        return 0
    result = api.fit_model(model, cfg)
    written = None
    if cfg.output and _first_process():  # before printing: a closed pipe must not lose it
        written = write_json(result.to_dict(), cfg.output)
    print(result.summary())
    if written is not None:
        print(f"results written to {written}")
    return 0


def _first_process() -> bool:
    """Whether this is process 0 (the only one that writes files when several fit together)."""
    import jax

    return jax.process_index() == 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Print a warning as one ``lmmjax: warning: ...`` line, without source lines."""
    print(f"lmmjax: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def _one_line(exc: BaseException) -> str:
    """Collapse an exception's message onto a single line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line interface.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on bad input or an unbuilt method, 120 when
        standard output was closed by its reader (the JSON result, if asked
        for, is written before anything is printed).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse usage error (status 2)
        return exc.code if isinstance(exc.code, int) else 2
    warnings.showwarning = _show_warning
    try:
        return run(args.config, check=args.check, output=args.output)
    except _USER_ERRORS as exc:
        print(f"lmmjax: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (``| head``): stop quietly, as Python exits 120
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 120


if __name__ == "__main__":
    sys.exit(main())
