"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, with no GPU present.

The interpreter (which runs the Triton tests on CPU) never lowers a kernel, so type and layout errors only
show when compiling to PTX/cubin. That must happen in a process where TRITON_INTERPRET was never set:
under the interpreter @triton.jit functions are replaced by interpreted ones.
"""
import json
import pkgutil

import pytest

import lossops.triton_kernels
from lossops._family import FAMILIES
from _cases import run_python

TARGETS = (80, 90)
# The Triton module of every registered loss family; helper modules (common.py, elementwise.py) only hold jit pieces.
EXPECTED_MODULES = {family.kernel.module for family in FAMILIES.values()}
MODULES = sorted(m.name for m in pkgutil.iter_modules(lossops.triton_kernels.__path__))

_COMPILE_ALL = """
import importlib, json, pkgutil, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
import lossops.triton_kernels as package

for info in pkgutil.iter_modules(package.__path__):
    module = importlib.import_module(package.__name__ + "." + info.name)
    kernels = getattr(module, "AOT_KERNELS", None)
    print(json.dumps({"module": info.name, "exports": kernels is not None}))
    for index, (fn, signature, constexprs) in enumerate(kernels or []):
        for cc in map(int, sys.argv[1:]):
            record = {"module": info.name, "index": index, "cc": cc, "kernel": fn.__name__}
            try:
                source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                asm = triton.compile(source, target=GPUTarget("cuda", cc, 32)).asm
                record.update(ptx=asm.get("ptx", ""), cubin_bytes=len(asm.get("cubin", b"")))
            except Exception:
                record["error"] = traceback.format_exc()
            print(json.dumps(record))
"""


@pytest.fixture(scope="module")
def compiled():
    result = run_python(_COMPILE_ALL, {"TRITON_DEFAULT_FP_FUSION": "1"}, *map(str, TARGETS), timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    exports = {r["module"] for r in records if r.get("exports")}
    return exports, [r for r in records if "cc" in r]


def test_loss_families_export_aot_kernels(compiled):
    exports, _ = compiled
    assert EXPECTED_MODULES <= exports, f"no AOT_KERNELS in {sorted(EXPECTED_MODULES - exports)}"


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_to_ptx_and_cubin(compiled, module, cc):
    exports, records = compiled
    mine = [r for r in records if r["module"] == module and r["cc"] == cc]
    assert bool(mine) == (module in exports), "a module that exports AOT_KERNELS must list at least one"
    for r in mine:
        name = f"{module}.AOT_KERNELS[{r['index']}] ({r['kernel']}, sm_{cc})"
        assert "error" not in r, f"{name} failed to compile:\n{r.get('error')}"
        assert f".target sm_{cc}" in r["ptx"], name
        assert f".entry {r['kernel']}" in r["ptx"], name
        assert r["cubin_bytes"] > 0, name
