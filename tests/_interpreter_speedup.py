"""Triton's interpreter, minus a cost that changes nothing. The Triton backend's tests run the kernels on CPU tensors
through the interpreter, and half of that time went into re-patching triton.language at every call of a
@triton.jit helper from inside a kernel.

How the interpreter (triton/runtime/interpreter.py, Triton 3.x) works: a launch (GridExecutor.__call__) patches the
triton.language modules the kernel sees (`_patch_lang`: every builtin of tl, tl.tensor and tl.math replaced by an
interpreted wrapper, some tensor and language attributes set), runs every program of the grid, and restores them. A
device-function call (InterpretedFunction.__call__) calls `_patch_lang` too, at every call, and drops the result
unrestored. Once a module is patched that finds no builtin left to wrap (the wrappers are not builtins) and sets
the other attributes to equivalent fresh closures: no effect, but inspect.getmembers over tl each time.

Here a device-function call inside a launch skips `_patch_lang` when every language module it sees has been
patched in this launch already: by the launch, or by an earlier device-function call. The first call that sees a
module the kernel does not (triton.language.standard's tl.sum and tl.max see tl.core) is patched as before, and
that patching stays, as upstream. Launches are untouched. Measured on a cross-entropy forward+backward with token
statistics (3 launches, ~380 helper calls): 0.60 s -> 0.29 s, the same results to the bit.

LOSSOPS_TEST_PLAIN_INTERPRETER=1 runs the interpreter as shipped; a Triton without these names is left as it is.
"""
from __future__ import annotations

import inspect
import os
import threading


def install() -> bool:
    if os.environ.get("LOSSOPS_TEST_PLAIN_INTERPRETER") == "1" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")) \
            or getattr(interpreter._patch_lang, "_lossops_wrapped", False):
        return False
    original_patch, original_launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    state = threading.local()  # per thread, like the launch itself
    modules = {}  # function -> the language modules in its globals

    def languages(fn) -> frozenset:
        if fn not in modules:
            found = (v for v in fn.__globals__.values() if inspect.ismodule(v))
            modules[fn] = frozenset(id(v) for v in found if v in (tl, tl.core))
        return modules[fn]

    def patch_lang(fn):
        if getattr(state, "starting", False):  # the launch's own patching
            state.starting = False
            state.patched = languages(fn)
            return original_patch(fn)
        patched = getattr(state, "patched", None)
        if patched is None:  # outside a launch: as shipped
            return original_patch(fn)
        seen = languages(fn)
        if seen <= patched:
            return interpreter._LangPatchScope()  # nothing to patch, nothing to restore
        state.patched = patched | seen
        return original_patch(fn)

    def launch(self, *args, **kwargs):
        outer = getattr(state, "patched", None), getattr(state, "starting", False)
        state.starting, state.patched = True, None
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            state.patched, state.starting = outer

    patch_lang._lossops_wrapped = True
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch
    _numpy_dtypes_kept(interpreter, tl)
    return True


def _numpy_dtypes_kept(interpreter, tl) -> None:
    """The interpreter's `_get_np_dtype` builds its table of numpy dtypes anew at every call (for every tensor it
    makes: several per operation, per program). The answer depends only on the element type (a pointer, of a block
    or alone, is uint64; any other type maps through that table), so it is looked up once per element type here."""
    shipped = getattr(interpreter, "_get_np_dtype", None)
    if shipped is None or not hasattr(tl, "block_type") or not hasattr(tl, "pointer_type"):
        return
    kept = {}

    def get_np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):
            return shipped(element)
        found = kept.get(element)
        if found is None:
            found = kept[element] = shipped(element)
        return found

    interpreter._get_np_dtype = get_np_dtype
