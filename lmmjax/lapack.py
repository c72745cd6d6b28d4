"""LAPACK's ``potri`` on the CPU, as an XLA foreign function.

The gradient of ``log|A|`` is ``A^{-1}``. XLA's CPU backend factors with
LAPACK's ``potrf`` but has no ``potri`` (the inverse from the Cholesky
factor, ``2 n^3 / 3`` flops), so the inverse took two triangular solves
against the identity (``2 n^3`` flops): 54-69 ms for InstEval's
1156 x 1156 Schur block on the 2-core CPU, against 21 ms here.

The routine is SciPy's ``dpotri`` / ``spotri`` (the LAPACK that jaxlib
itself is initialised from), called through XLA's typed FFI: a C handler
written with :mod:`ctypes` against the ABI of ``xla/ffi/api/c_api.h``
(shipped with jaxlib, ``jax.ffi.include_dir()``). The target is registered by
name, so compiled programs that call it are kept by the persistent
compilation cache, which programs with host callbacks are not. The handler
holds the interpreter lock for a few microseconds per call; ``ctypes``
releases it while LAPACK runs.

Other platforms, other dtypes and matrices below :data:`POTRI_MIN` take
``L^{-1}`` by one triangular solve against the identity and the inverse as
the product ``L^{-T} L^{-1}``: dillonE1's 80 x 80 Schur block in the NUTS
gradient took 242-263 us per value and gradient that way against 260-317 us
with a second solve (one chain, LAPACK on one thread).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["POTRI_MIN", "TARGET", "register", "spd_inverse"]

# From this order up potri beat two triangular solves on the 2-core CPU: 1.2 against
# 1.8 ms at 256, 0.66 against 0.72 ms at 200, slower below (SciPy's potri alone takes
# 80 us at order 80, where the solves take all of 75-160 us). Below it, one solve and a
# product now give the inverse; the order was not measured again against them
POTRI_MIN = 256
TARGET = "lmmjax_potri"

_F32, _F64 = 11, 12  # XLA_FFI_DataType
_METADATA = 1  # XLA_FFI_Extension_Metadata
_API_MAJOR, _API_MINOR = 0, 3  # XLA_FFI_API_MAJOR / _MINOR of the header this follows


class _Extension(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                ("next", ctypes.c_void_p)]  # fmt: skip


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]  # fmt: skip


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p),
                ("items", ctypes.POINTER(ctypes.POINTER(_Buffer)))]  # fmt: skip


class _CallFrame(ctypes.Structure):  # attrs and future follow, unused
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_Extension)),
                ("api", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _List), ("rets", _List)]  # fmt: skip


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]  # fmt: skip


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32)]  # fmt: skip


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _Extension), ("metadata", ctypes.POINTER(_Metadata))]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]  # fmt: skip


_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # the leading fields of XLA_FFI_Api
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ERROR_CREATE)]  # fmt: skip


_INVALID_ARGUMENT, _INTERNAL = 3, 13  # XLA_FFI_Error_Code


_INT = ctypes.POINTER(ctypes.c_int)
_POTRI = ctypes.CFUNCTYPE(None, ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, _INT)
_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


def _lapack(name: str):
    """SciPy's Cython-exported LAPACK routine ``name`` as a ctypes function."""
    import scipy.linalg.cython_lapack as cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return _POTRI(get_pointer(capsule, get_name(capsule)))


def _handle(frame_ptr) -> int | None:
    """The FFI handler: report metadata, or invert each matrix of the batch in place.

    Never raises: ctypes would drop the exception and hand XLA an undefined
    pointer. Failures go back to XLA as errors, which JAX raises.
    """
    frame = frame_ptr.contents
    try:
        if frame.extension_start and frame.extension_start.contents.type == _METADATA:
            ext = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension)).contents
            ext.metadata.contents.api_version = _ApiVersion(
                ctypes.sizeof(_ApiVersion), None, _API_MAJOR, _API_MINOR
            )
            ext.metadata.contents.traits = 0
            return None
        if frame.args.size != 1 or frame.rets.size != 1:
            return _error(frame, _INVALID_ARGUMENT, f"{TARGET} takes one array, returns one")
        if frame.rets.items[0].contents.dtype not in _ROUTINES:
            return _error(frame, _INVALID_ARGUMENT, f"{TARGET} takes float32 or float64")
        _invert(frame.args.items[0].contents, frame.rets.items[0].contents)
    except Exception as err:  # noqa: BLE001  (reported to XLA, which raises it)
        return _error(frame, _INTERNAL, f"{TARGET}: {type(err).__name__}: {err}")
    return None


def _error(frame, code: int, message: str) -> int:
    """An ``XLA_FFI_Error`` made by XLA's own API, carrying ``message``."""
    api = ctypes.cast(frame.api, ctypes.POINTER(_Api)).contents
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), code)
    return api.error_create(ctypes.byref(args))


def _invert(src: _Buffer, dst: _Buffer) -> None:
    """``dst`` = the inverses from the Cholesky factors in ``src``, matrix by matrix."""
    n = int(dst.dims[dst.rank - 1])
    batch = int(np.prod([dst.dims[i] for i in range(dst.rank - 2)], dtype=np.int64))
    itemsize = 8 if dst.dtype == _F64 else 4
    routine = _ROUTINES[dst.dtype]
    size = n * n * itemsize
    ctypes.memmove(dst.data, src.data, batch * size)
    if n == 0:  # nothing to invert (and LAPACK would reject a leading dimension of 0)
        return
    order, info = ctypes.c_int(n), ctypes.c_int(0)
    for b in range(batch):
        # row-major lower L is column-major upper L': potri('U') gives inv(L L')
        address = dst.data + b * size
        routine(b"U", ctypes.byref(order), address, ctypes.byref(order), ctypes.byref(info))
        if info.value != 0:  # a zero pivot: no inverse, as a failed Cholesky gives NaN
            ctypes.memmove(address, _nan(n, dst.dtype).ctypes.data, size)


@lru_cache(maxsize=8)
def _nan(n: int, dtype: int) -> np.ndarray:
    return np.full((n, n), np.nan, np.float64 if dtype == _F64 else np.float32)


_ROUTINES: dict = {}
_KEEP: list = []  # the handler must outlive every program that calls it


@lru_cache(maxsize=1)
def register() -> bool:
    """Register :data:`TARGET` once per process; False where this jaxlib cannot take it.

    Tracing :func:`spd_inverse` registers it; a program compiled from a
    serialized export that calls it needs this first.
    """
    try:
        _ROUTINES.update({_F64: _lapack("dpotri"), _F32: _lapack("spotri")})
        handler = _HANDLER(_handle)
        _KEEP.append(handler)
        address = ctypes.cast(handler, ctypes.c_void_p).value
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(address), platform="cpu")
    except Exception:  # noqa: BLE001  (no SciPy LAPACK or no typed FFI: solves instead)
        return False
    return True


def _by_solves(L: jax.Array) -> jax.Array:
    eye = jnp.broadcast_to(jnp.eye(L.shape[-1], dtype=L.dtype), L.shape)
    inv_l = lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)
    # full precision: an accelerator's default float32 product may round its inputs (TF32)
    return jnp.matmul(jnp.swapaxes(inv_l, -1, -2), inv_l, precision=lax.Precision.HIGHEST)


def _by_potri(L: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(L.shape, L.dtype),
                            vmap_method="broadcast_all")  # fmt: skip
    upper = call(L)  # the lower triangle (row-major) holds the inverse
    return jnp.tril(upper) + jnp.swapaxes(jnp.tril(upper, -1), -1, -2)


@jax.custom_jvp
def spd_inverse(L: jax.Array) -> jax.Array:
    """``(L L')^{-1}`` from a lower Cholesky factor ``L`` (..., n, n).

    Through LAPACK's ``potri`` on the CPU in float32 and float64 from order
    :data:`POTRI_MIN`; by a triangular solve and a product elsewhere. Differentiable to
    any order (``d A^{-1} = -A^{-1} dA A^{-1}``).
    """
    n = L.shape[-1]
    if n < POTRI_MIN or L.dtype not in (jnp.float32, jnp.float64) or not register():
        return _by_solves(L)
    return lax.platform_dependent(L, cpu=_by_potri, default=_by_solves)


@spd_inverse.defjvp
def _spd_inverse_jvp(primals, tangents):
    (L,), (dL,) = primals, tangents
    inv = spd_inverse(L)
    dA = jnp.tril(dL) @ jnp.swapaxes(jnp.tril(L), -1, -2)  # L's upper triangle is never read
    dA = dA + jnp.swapaxes(dA, -1, -2)
    return inv, -inv @ dA @ inv
