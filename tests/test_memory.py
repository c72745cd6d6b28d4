"""glibc's mmap threshold; Python's collector around imports and at exit (``lmmjax.memory``)."""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
from pathlib import Path

import pytest

from lmmjax.memory import collector_paused, tune_allocator

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> list[str]:
    """The words a fresh interpreter prints running ``code`` in the repository root."""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return run.stdout.split()


def _glibc() -> bool:
    return hasattr(ctypes.CDLL(None), "mallopt")


@pytest.mark.skipif(not _glibc(), reason="not glibc: nothing to set")
def test_threshold_is_set_on_glibc(monkeypatch):
    monkeypatch.delenv("LMMJAX_MMAP_THRESHOLD", raising=False)
    assert tune_allocator()
    monkeypatch.setenv("LMMJAX_MMAP_THRESHOLD", str(32 << 20))
    assert tune_allocator()


def test_zero_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("LMMJAX_MMAP_THRESHOLD", "0")
    assert not tune_allocator()


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LMMJAX_MMAP_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="LMMJAX_MMAP_THRESHOLD"):
        tune_allocator()


@pytest.fixture
def collector_state():
    was = gc.isenabled()
    yield
    gc.enable() if was else gc.disable()


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_paused_restores_the_state_it_found(collector_state, enabled):
    gc.enable() if enabled else gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled() == enabled
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("inside")
    assert gc.isenabled() == enabled


def test_the_command_line_process_freezes_and_keeps_the_collector():
    # run_process imports with the collector paused, leaves it on, and freezes at the end
    code = (
        "import gc, sys; from lmmjax.fit import run_process; "
        "status = run_process(['configs/sleepstudy.yaml', '--check']); "
        "print(status, gc.isenabled(), gc.get_freeze_count() > 0)"
    )
    out = _python(code)
    assert out[-3:] == ["0", "True", "True"]


def test_overlapping_pauses_keep_the_collector_off_until_the_last_ends(collector_state):
    # two pauses (two threads') ending in the order they began: the first's end must
    # not turn the collector on while the second is still open
    gc.enable()
    first, second = collector_paused(), collector_paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_pauses_from_many_threads_leave_the_collector_on(collector_state):
    import threading

    gc.enable()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:

        def pause_often():
            for _ in range(20_000):
                with collector_paused():
                    pass

        threads = [threading.Thread(target=pause_often) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert gc.isenabled()


def test_a_library_pause_never_freezes(collector_state):
    before = gc.get_freeze_count()
    with collector_paused():
        import json  # noqa: F401
    assert gc.get_freeze_count() == before


def test_after_freeze_imports_each_pause_freezes_what_is_alive():
    # in a fresh process: freezing is for one-shot processes only
    code = (
        "import gc; from lmmjax.memory import collector_paused, freeze_imports; "
        "freeze_imports(); now = gc.get_freeze_count() > 0; "
        "gc.unfreeze(); before = gc.get_freeze_count(); "
        "keep = [[i] for i in range(10000)]; "
        "with_pause = collector_paused(); with_pause.__enter__(); "
        "import fractions; with_pause.__exit__(None, None, None); "
        "after = gc.get_freeze_count(); more = [[i] for i in range(1000)]\n"
        "with collector_paused(imports=False):\n    pass\n"
        "print(now, before, after >= before + 10000, gc.isenabled(), "
        "gc.get_freeze_count() == after)"
    )
    out = _python(code)
    assert out == ["True", "0", "True", "True", "True"]  # a trace's pause never freezes


def test_the_command_line_is_recognised_from_the_interpreters_arguments(monkeypatch):
    from lmmjax import memory

    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "lmmjax.fit", "c.yaml"])
    monkeypatch.setattr(sys, "argv", ["-m", "c.yaml"])
    assert memory.command_line_process()
    monkeypatch.setattr(sys, "orig_argv", ["python", "/venv/bin/lmmjax-fit", "c.yaml"])
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lmmjax-fit", "c.yaml"])
    assert memory.command_line_process()
    monkeypatch.setattr(sys, "orig_argv", ["python", "-X", "importtime", "-Im", "lmmjax.fit"])
    monkeypatch.setattr(sys, "argv", ["-m"])
    assert memory.command_line_process()
    monkeypatch.setattr(sys, "argv", ["script.py"])
    for argv in (["python", "-m", "pytest", "-m", "lmmjax.fit"],  # pytest's own -m option
                 ["python", "script.py", "-m", "lmmjax.fit"],  # a script's arguments
                 ["python", "-c", "import lmmjax", "-m", "lmmjax.fit"],
                 ["python", "-W", "ignore", "-m", "lmmjax.cli"]):  # fmt: skip
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert not memory.command_line_process(), argv


def test_a_library_process_freezes_as_it_exits():
    # not while it runs: a script's objects are collected as usual until the shutdown begins
    # (the 1,000 lists made after the import are frozen at exit, not before); an exit
    # handler registered before the import runs after lmmjax's (last in, first out)
    code = (
        "import atexit, gc; "
        "atexit.register(lambda: print(gc.get_freeze_count())); "
        "import lmmjax; made = [[] for _ in range(1000)]; print(gc.get_freeze_count())"
    )
    out = _python(code)
    running, at_exit = map(int, out[-2:])
    assert at_exit >= running + 1000
