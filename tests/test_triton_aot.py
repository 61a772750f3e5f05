"""Ahead-of-time compilation, for sm_80 and sm_90 with no GPU present, of every Triton kernel variant the route
launches.

The interpreter (which runs the Triton tests on CPU) never lowers a kernel, so type and layout errors, 32-bit
address arithmetic and register spills only show when compiling to PTX/cubin. The variants come from each kernel
module's `aot_calls()` through triton_kernels/aot.py: the host functions themselves pick block sizes, warps and
flags (`launch_config`), and the arguments are specialised the way the JIT does at run time. Compiling must happen
in a process where TRITON_INTERPRET was never set: under the interpreter @triton.jit functions are replaced.

LOSSOPS_WRITE_KERNEL_TABLE=1 rewrites the register table in docs/triton-kernels.md from this run.
"""
import collections
import json
import os
import pathlib
import pkgutil
import re
import warnings

import pytest
from filelock import FileLock

import lossops.triton_kernels
from lossops._family import FAMILIES
from lossops.triton_kernels import aot
from lossops.triton_kernels.common import launch_config
from lossops.triton_kernels.cross_entropy import AOT_CLASSES
from _cases import run_python

TARGETS = (80, 90)
# The Triton module of every registered loss family; helper modules (common.py, elementwise.py) only hold jit pieces.
EXPECTED_MODULES = {family.kernel.module for family in FAMILIES.values()}
MODULES = sorted(m.name for m in pkgutil.iter_modules(lossops.triton_kernels.__path__))
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "triton-kernels.md"
TABLE_BEGIN, TABLE_END = "<!-- register table: begin -->", "<!-- register table: end -->"

_COMPILE_ALL = r"""
import concurrent.futures, importlib, json, multiprocessing, pkgutil, re, sys, traceback
import lossops.triton_kernels as package
from lossops.triton_kernels import aot

def narrow_stride_products(ptx, variant):
    # A 32-bit multiply that reads a stride argument (or a copy of one): its product is an address offset that can
    # wrap. Also returns how many stride arguments the PTX loads, so that a PTX this no longer parses fails.
    names = [n for n, t in variant.signature.items() if t != "constexpr"]
    loaded = {m.group(1) for m in re.finditer(r"ld\.param\.\w+\s+(%\w+), \[\w+_param_(\d+)\]", ptx)
              if int(m.group(2)) < len(names) and names[int(m.group(2))].startswith("stride")}
    strides = set(loaded)
    for m in re.finditer(r"(?:mov|cvt)\.[\w.]+\s+(%\w+), (%\w+);", ptx):
        if m.group(2) in strides:
            strides.add(m.group(1))
    narrow = [line.strip() for line in ptx.splitlines()
              if re.match(r"\s*(mul|mad)\.lo\.[su]32\b", line) and set(re.findall(r"%\w+", line)[1:]) & strides]
    return narrow, len(loaded)

def compile_one(job):
    module, index, variant, cc = JOBS[job]
    record = {"module": module, "index": index, "cc": cc, "kernel": variant.kernel.__name__,
              "variant": variant.describe()}
    try:
        compiled = variant.compile(cc)
        ptx = compiled.asm["ptx"]
        narrow, stride_loads = narrow_stride_products(ptx, variant)
        record.update(target_ok=f".target sm_{cc}" in ptx, entry_ok=f".entry {variant.kernel.__name__}" in ptx,
                      narrow=narrow, stride_loads=stride_loads,
                      stride_arguments=sum(name.startswith("stride") and kind != "constexpr"
                                           for name, kind in variant.signature.items()),
                      **aot.resources(compiled, cc))
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
    return record

JOBS = []
for info in pkgutil.iter_modules(package.__path__):
    module = importlib.import_module(package.__name__ + "." + info.name)
    calls = getattr(module, "aot_calls", None)
    print(json.dumps({"module": info.name, "exports": calls is not None}), flush=True)
    for index, variant in enumerate(aot.variants(calls()) if calls else []):
        JOBS += [(info.name, index, variant, int(cc)) for cc in sys.argv[1:]]
# Two workers (forked: they find the variants in JOBS): the suite runs on two cores, and compiling is most of
# this test's time.
with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
    for record in pool.map(compile_one, range(len(JOBS)), chunksize=4):
        print(json.dumps(record), flush=True)
"""


def _compile_all():
    result = run_python(_COMPILE_ALL, {"TRITON_DEFAULT_FP_FUSION": "1"}, *map(str, TARGETS), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    # Under pytest-xdist this module's tests may land on several workers: the first compiles, the others read its
    # output (one file per test run, next to the workers' temporary directories).
    worker = getattr(request.config, "workerinput", None)
    if worker is None:
        stdout = _compile_all()
    else:
        shared = tmp_path_factory.getbasetemp().parent / f"triton-aot-{worker['testrunuid']}.out"
        with FileLock(str(shared) + ".lock"):
            if not shared.exists():
                shared.write_text(_compile_all())
            stdout = shared.read_text()
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    exports = {r["module"] for r in records if r.get("exports")}
    return exports, [r for r in records if "cc" in r]


def test_loss_families_export_aot_calls(compiled):
    exports, _ = compiled
    assert EXPECTED_MODULES <= exports, f"no aot_calls in {sorted(EXPECTED_MODULES - exports)}"


def _name(r):
    return f"{r['module']} variant {r['index']} ({r['variant']}, sm_{r['cc']})"


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_to_ptx_and_cubin(compiled, module, cc):
    exports, records = compiled
    mine = [r for r in records if r["module"] == module and r["cc"] == cc]
    assert bool(mine) == (module in exports), "a module that exports aot_calls must launch at least one kernel"
    for r in mine:
        assert "error" not in r, f"{_name(r)} failed to compile:\n{r.get('error')}"
        assert r["target_ok"] and r["entry_ok"], _name(r)


def test_variants_cover_the_launch_policy(compiled):
    """The variants include float64 and the half-precision dtypes, the largest block with the warps launch_config
    gives it, both integer widths, unit and non-unit class strides."""
    _, records = compiled
    ce = [r["variant"] for r in records if r["kernel"] == "cross_entropy_kernel" and r["cc"] == 90]
    assert any(" fp64 " in v for v in ce) and any(" bf16 " in v for v in ce) and any(" fp16 " in v for v in ce)
    widest = launch_config(max(AOT_CLASSES))
    assert any(f"'BLOCK': {widest['BLOCK']}" in v and f"num_warps={widest['num_warps']}" in v for v in ce)
    assert any("i64" in v for v in ce) and any("i64" not in v for v in ce)
    assert any("'stride_xc': 1" in v for v in ce) and any("'stride_xc': 1" not in v for v in ce)
    # Small class counts take several rows per program, large ones one, in the forward and the backward kernel.
    for kernel in ("cross_entropy_kernel", "cross_entropy_backward_kernel"):
        rows = {re.search(r"'ROWS': (\d+)", r["variant"]).group(1) for r in records
                if r["kernel"] == kernel and r["cc"] == 90}
        assert "1" in rows and rows - {"1"}, (kernel, rows)


def test_no_32bit_offset_products(compiled):
    """An index times a stride must be formed in 64 bits: for class-dim-1 layouts the class stride is the inner
    size, and 128256 classes x 16744 positions already pass 2^31 (the gradient would land at wrong addresses)."""
    _, records = compiled
    bad = [f"{_name(r)}: {r['narrow'][:3]}" for r in records if r.get("narrow")]
    assert not bad, "32-bit products of a stride:\n" + "\n".join(bad)


def test_offset_audit_reads_every_variant(compiled):
    """The 32-bit product audit above ran on the PTX of every variant: each one that takes stride arguments loads
    some of them where the audit looks (a PTX it no longer parses would otherwise pass it silently)."""
    _, records = compiled
    audited = [r for r in records if "error" not in r and r["stride_arguments"]]
    assert audited, "no variant with stride arguments"
    unread = [_name(r) for r in audited if not r["stride_loads"]]
    assert not unread, "no stride argument found in the PTX of:\n" + "\n".join(unread)


def _table(records):
    groups = collections.defaultdict(list)
    for r in records:
        if "error" in r:
            continue
        dtype = r["variant"].split()[1]
        groups[(r["kernel"], dtype, r["num_warps"], r["cc"])].append(r)
    lines = ["| kernel | dtype | num_warps | sm | variants | registers (max) | spill bytes (max) "
             "| stack save bytes (max) | shared bytes (max) | blocks / SM (min) | warps / SM (min) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (kernel, dtype, warps, cc), rs in sorted(groups.items()):
        lines.append(f"| {kernel} | {dtype} | {warps} | {cc} | {len(rs)} | {max(r['registers'] for r in rs)} | "
                     f"{max(r['spill'] for r in rs)} | {max(r['stack_save'] for r in rs)} | "
                     f"{max(r['shared'] for r in rs)} | {min(r['blocks_per_sm'] for r in rs)} | "
                     f"{min(r['warps_per_sm'] for r in rs)} |")
    return "\n".join(lines)


def test_no_register_spills(compiled):
    """Local memory read or written inside a loop costs bandwidth every iteration, more than it saves in a
    memory-bound kernel: ptxas must fit every variant without. A stack save (a value parked on the stack before a
    loop and read back after it, once per thread) is allowed, and listed in a warning (triton_kernels/aot.py)."""
    _, records = compiled
    if os.environ.get("LOSSOPS_WRITE_KERNEL_TABLE") == "1":
        text = DOCS.read_text()
        begin, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
        DOCS.write_text(text[:begin] + "\n" + _table(records) + "\n" + text[end:])
    saves = [f"{_name(r)}: {r['registers']} registers, {r['stack_save']} bytes" for r in records if r.get("stack_save")]
    if saves:
        warnings.warn(f"{len(saves)} variants save a value on the stack outside their loops:\n" + "\n".join(saves))
    spilled = [f"{_name(r)}: {r['registers']} registers, {r['spill']} bytes of local memory used inside a loop"
               for r in records if r.get("spill")]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def _sass(*instructions):
    """cuobjdump -sass output of a one-kernel cubin with these instructions, at addresses 0x0, 0x10, ..."""
    lines = ["", "\tcode for sm_90", "\t\tFunction : kernel",
             '\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"']
    for i, instruction in enumerate(instructions):
        lines.append(f"        /*{16 * i:04x}*/                   {instruction} ;{' ' * 20}/* 0x000000000000000 */")
        lines.append(f"{' ' * 70}/* 0x000fe20000000000 */")
    return "\n".join(lines + ["\t\t..........", ""])


# A store before the loop (0x20-0x40) and the load after it: a value held across the loop, on the stack.
_SAVED = _sass("LDC R1, c[0x0][0x28]", "STL.64 [R1], R10", "FADD R2, R2, R3", "ISETP.GE.AND P0, PT, R2, RZ, PT",
               "@!P0 BRA 0x20", "LDL.LU.64 R10, [R1]", "STG.E desc[UR4][R10.64], R2", "EXIT", "BRA 0x80")
# The same value read back at the head of the loop: every iteration.
_RELOADED = _sass("LDC R1, c[0x0][0x28]", "STL.64 [R1], R10", "LDL.64 R6, [R1]", "FADD R2, R2, R6",
                  "@!P0 BRA 0x20", "STG.E desc[UR4][R10.64], R2", "EXIT", "BRA 0x70")
# A loop left through the CALL.REL.NOINC ptxas also writes loop exits as (0x20-0x50, exit to 0x60), around a
# subroutine call (0x30 -> 0xa0, back through RET) whose body saves a register: inside the loop, out of its range.
_CALLED = _sass("LDC R1, c[0x0][0x28]", "STL [R1+0x8], R4", "FADD R2, R2, R3", "CALL.REL.NOINC 0xa0",
                "@P2 CALL.REL.NOINC 0x60", "BRA 0x20", "LDL R4, [R1+0x8]", "STG.E desc[UR4][R10.64], R4", "EXIT",
                "BRA 0x90", "STL [R1], R16", "LDL R16, [R1]", "RET.REL.NODEC R2 0x0")


@pytest.mark.parametrize("sass, stack, local, expected", [
    (_SAVED, 8, 0, dict(spill=0, stack_save=8)),
    (_RELOADED, 8, 0, dict(spill=8, stack_save=0)),
    (_CALLED, 12, 0, dict(spill=4, stack_save=8)),
    (_SAVED, 8, 16, dict(spill=16, stack_save=8)),  # LOCAL (not stack) counts whole, wherever it is used
], ids=["saved-outside-loop", "reloaded-inside-loop", "subroutine-in-loop", "local"])
def test_local_memory_inside_and_outside_loops(sass, stack, local, expected):
    assert aot.local_memory(sass, stack, local) == expected


@pytest.mark.parametrize("sass, stack, match", [
    ("Function : kernel\n  LDC R1, c[0x0][0x28] ;\n  EXIT ;", 8, "no SASS instructions"),
    (_sass("LDC R1, c[0x0][0x28]", "FADD R2, R2, R3", "EXIT"), 8, "no STL/LDL"),
    (_sass("STL [R1], R4", "BRX R2 -0x10", "LDL R4, [R1]", "EXIT"), 4, "indirect"),
    (_sass("STL [R1], R4", "@P0 BRA 0x18", "LDL R4, [R1]", "EXIT"), 4, "no instruction"),
    (_SAVED + _SAVED, 8, "one function"),
], ids=["no-addresses", "no-local-instructions", "indirect-branch", "bad-target", "two-functions"])
def test_local_memory_rejects_sass_it_does_not_recognise(sass, stack, match):
    with pytest.raises(ValueError, match=match):
        aot.local_memory(sass, stack, 0)
