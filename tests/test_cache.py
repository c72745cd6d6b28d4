"""The compile caches: in memory, and serialized exports that a fresh process reads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmmjax import cache


def _program(x, y, *, power):
    return {"sum": jnp.sum(x**power) + y, "parts": (x * y, jnp.cumsum(x))}


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    cache.enable_compilation_cache(tmp_path)
    cache.clear()
    yield tmp_path
    cache.clear()
    jax.config.update("jax_compilation_cache_dir", before)


def test_program_is_exported_and_read_back(cache_dir):
    x, y = jnp.arange(5.0), jnp.asarray(2.0)
    run, seconds = cache.compiled(_program, x, y, power=3)
    assert seconds > 0
    exports = list((cache_dir / "export").glob("*.bin"))
    assert len(exports) == 1
    first = run(x, y)
    cache.clear()  # as a fresh process: only the disk holds the program
    run2, _ = cache.compiled(_program, x, y, power=3)
    again = run2(x + 1.0, y)
    expected = _program(x + 1.0, y, power=3)
    assert jax.tree.structure(again) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(first["sum"]) == float(_program(x, y, power=3)["sum"])
    assert len(list((cache_dir / "export").glob("*.bin"))) == 1  # read, not written again


def test_another_option_or_source_is_another_export(cache_dir, monkeypatch):
    x, y = jnp.arange(5.0), jnp.asarray(2.0)
    cache.compiled(_program, x, y, power=3)
    cache.compiled(_program, x, y, power=2)
    assert len(list((cache_dir / "export").glob("*.bin"))) == 2
    cache.clear()
    monkeypatch.setitem(cache._SOURCE, "hash", "edited source")
    cache.compiled(_program, x, y, power=2)
    assert len(list((cache_dir / "export").glob("*.bin"))) == 3


def test_no_exports_without_a_cache_directory(cache_dir):
    jax.config.update("jax_compilation_cache_dir", None)
    cache.clear()
    run, _ = cache.compiled(_program, jnp.arange(3.0), jnp.asarray(1.0), power=2)
    assert float(run(jnp.arange(3.0), jnp.asarray(1.0))["sum"]) == 6.0
    assert not (cache_dir / "export").exists()


def test_quick_options_name_ynn_only_where_jaxlib_knows_it():
    # jaxlib before 0.9 rejects the option, and every quick compile would fail
    assert cache.YNN_OPTION not in cache.quick_compile_options((0, 8))
    assert cache.YNN_OPTION not in cache.quick_compile_options((0, 4, 30))
    assert cache.quick_compile_options((0, 10, 2))[cache.YNN_OPTION] == ""
    assert cache.QUICK_COMPILE == cache.quick_compile_options(cache._jaxlib_version())


def test_legacy_emitters_only_where_jaxlib_knows_the_option():
    # before 0.7 the option is not asked for: a jaxlib that rejects it would fail every compile
    assert cache.legacy_emitter_options((0, 6)) == {}
    assert cache.legacy_emitter_options((0, 4, 30)) == {}
    assert cache.legacy_emitter_options((0, 10, 2)) == {cache.EMITTER_OPTION: False}
    assert cache.legacy_emitter_options((0, 11, 2)) == {}  # its CPU client refuses the option
    assert cache.DEFAULT_COMPILE == cache.default_compile_options(cache._jaxlib_version())
    assert cache.default_compile_options((0, 6)) == {"xla_backend_optimization_level": 1}
    assert cache.QUICK_COMPILE.items() >= cache.legacy_emitter_options(
        cache._jaxlib_version()).items()  # fmt: skip
    assert cache.QUICK_COMPILE["xla_backend_optimization_level"] == 0


@pytest.mark.parametrize("quick", [True, False])
def test_the_options_compile_here_and_give_the_same_numbers(quick):
    # a scatter (segment sums, as the kernels have) and a product, against NumPy
    x = np.random.default_rng(0).normal(size=(8, 8))
    seg = np.array([0, 1, 1, 2, 2, 2, 3, 3])

    def f(a):
        return a @ a, jax.ops.segment_sum(a, seg, 4)

    run = jax.jit(f).lower(x).compile(cache.compile_options(quick))
    prod, sums = run(x)
    np.testing.assert_allclose(np.asarray(prod), x @ x, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(sums), np.add.reduceat(x, [0, 1, 3, 6]), rtol=1e-12)


def test_cpu_options_only_on_the_cpu(monkeypatch):
    # a CUDA client refuses XLA's CPU options ("No such compile option"): every
    # program failed to compile on a GPU until the options followed the backend
    assert cache.compile_options(True) == (
        cache.QUICK_COMPILE if jax.default_backend() == "cpu" else {})  # fmt: skip
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cache.compile_options(True) == {} and cache.compile_options(False) == {}
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert cache.compile_options(True) == cache.QUICK_COMPILE
    assert cache.compile_options(False) == cache.DEFAULT_COMPILE


def test_an_option_the_client_refuses_falls_back_to_xla_defaults(monkeypatch):
    # a jaxlib outside the versions the options were written for must still compile
    monkeypatch.setattr(cache, "QUICK_COMPILE", {"xla_no_such_option_for_lmmjax": 1})
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    cache.clear()
    run, _ = cache.compiled(_program, jnp.arange(3.0), jnp.asarray(1.0), quick=True, power=2)
    assert float(run(jnp.arange(3.0), jnp.asarray(1.0))["sum"]) == 6.0
    assert (("xla_no_such_option_for_lmmjax", 1),) in cache._REFUSED
    with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
        jax.jit(lambda x: x).lower(jnp.ones(2)).compile(cache.QUICK_COMPILE)


def test_a_program_traced_at_another_product_precision_is_compiled_anew():
    # float32 products are fixed at tracing: the in-memory key holds the precision
    cache.clear()
    x = jnp.ones((2, 2), jnp.float32)
    run, _ = cache.compiled(_program, x, jnp.asarray(1.0, jnp.float32), power=2)
    with jax.default_matmul_precision("highest"):
        other, _ = cache.compiled(_program, x, jnp.asarray(1.0, jnp.float32), power=2)
    assert other is not run


def test_the_collector_is_held_off_while_a_program_traces_and_back_on_after(cache_dir):
    import gc  # (an empty cache directory: a program read from its export is not traced)

    seen = []

    def fn(x):
        seen.append(gc.isenabled())  # runs while tracing
        return x * 3.0

    assert gc.isenabled()
    run, _ = cache.compiled(fn, np.ones(3))
    assert seen == [False]
    assert gc.isenabled()
    np.testing.assert_allclose(run(np.ones(3)), 3.0)
