"""The kernel variants the Triton route launches, taken from its own host functions, for ahead-of-time compiles.

A kernel module lists the calls of its host functions that cover what the route can pass (`aot_calls()`:
(host function, keyword arguments) pairs, the tensors on the meta device so that any size costs nothing). Each
call runs its host code unchanged up to the kernel launch, which is captured instead of run; the launch's
arguments are then specialised exactly as Triton's JIT specialises them at run time (integers below 2^31 as i32,
the integer 1 as a constant, multiples of 16 and aligned pointers as divisible by 16) and compiled with the
num_warps the launch asked for. So the compile list follows `launch_config` and the host's flag logic by
construction, and two calls that reach the same specialisation compile once.

Needs a process in which TRITON_INTERPRET was never set (the kernels must be JITFunctions).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.runtime.jit import JITFunction


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def key(self):
        def plain(value):
            return getattr(value, "cache_key", None) or repr(value)
        return (self.kernel.__name__, tuple(self.signature.items()),
                tuple((k, plain(v)) for k, v in self.constexprs.items()), repr(sorted(self.attrs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        """The launch-relevant facts, for tables and failure messages."""
        flags = [k for k, v in self.constexprs.items() if v is True]
        sizes = {k: getattr(v, "__name__", v) for k, v in self.constexprs.items()
                 if not isinstance(v, bool) and not isinstance(v, JITFunction)}
        ints = sorted({t for t in self.signature.values() if t in ("i32", "i64")})
        pointers = [t for k, t in self.signature.items() if t.startswith("*")]
        return (f"{self.kernel.__name__} {pointers[0][1:]} {'/'.join(ints)} {sizes} "
                f"num_warps={self.options.get('num_warps')} {'+'.join(flags) or '-'}")

    def compile(self, cc: int):
        from triton.backends.compiler import GPUTarget
        source = triton.compiler.ASTSource(fn=self.kernel, signature=self.signature, constexprs=self.constexprs,
                                           attrs=self.attrs)
        return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=self.options)


class _Captured(Exception):
    def __init__(self, kernel, args, kwargs):
        super().__init__(kernel.__name__)
        self.kernel, self.args, self.kwargs = kernel, args, kwargs


def _fake_data_ptr(tensor):
    # Meta tensors all report address 0; the host code compares addresses to detect an in-place gradient, so each
    # storage gets a distinct, 256-byte aligned stand-in (views keep their byte offset).
    if tensor.device.type != "meta":
        return _real_data_ptr(tensor)
    return (tensor.untyped_storage()._cdata << 8) + tensor.storage_offset() * tensor.element_size()


_real_data_ptr = torch.Tensor.data_ptr


@contextlib.contextmanager
def _capturing():
    def capture(self, *args, grid, warmup, **kwargs):
        raise _Captured(self, args, kwargs)

    run = JITFunction.run
    JITFunction.run = capture
    torch.Tensor.data_ptr = _fake_data_ptr
    try:
        yield
    finally:
        JITFunction.run = run
        torch.Tensor.data_ptr = _real_data_ptr


def specialise(kernel: JITFunction, args: tuple, kwargs: dict) -> Variant:
    """The signature, constants and attributes Triton's JIT derives from these launch arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    names = [p.name for p in kernel.params]
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for param in kernel.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif isinstance(key, str) and CUDABackend.parse_attr(key):
            attrs[(param.num,)] = CUDABackend.parse_attr(key)
    options.setdefault("num_warps", 4)
    return Variant(kernel, signature, constexprs, attrs, options)


def capture(host, **arguments) -> Variant:
    """The variant `host(**arguments)` launches (its host code runs up to the launch)."""
    with _capturing():
        try:
            host(**arguments)
        except _Captured as launch:
            return specialise(launch.kernel, launch.args, launch.kwargs)
    raise AssertionError(f"{host.__name__} launched no kernel for {sorted(arguments)}")


def variants(calls) -> list[Variant]:
    """The distinct variants of (host, arguments) calls, in first-seen order."""
    seen = {}
    for host, arguments in calls:
        variant = capture(host, **arguments)
        seen.setdefault(variant.key, variant)
    return list(seen.values())


def meta(*shape, dtype=torch.float32, order=None):
    """An uninitialised meta tensor; order: the dimensions from outermost to innermost in memory (a permuted
    layout such as a class-dim-1 view), default row-major."""
    if order is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    stored = torch.empty([shape[d] for d in order], dtype=dtype, device="meta")
    return stored.permute([order.index(d) for d in range(len(shape))])


def covering(factors: dict, valid, heaviest: dict, corners: tuple) -> list[dict]:
    """Valid cases in which every pair of values of any two factors appears together (a greedy pairwise covering),
    plus, for every combination of the `corners` factors' values, the case with the options in `heaviest` and
    every other factor at its last value (factors list their values lightest first: the last class count, the
    wide integers). The full product would take far longer to compile than a test may run; LOSSOPS_AOT_EXHAUSTIVE=1
    returns it all the same, for a one-off check."""
    names = list(factors)
    product = [case for values in itertools.product(*factors.values())
               if valid(case := dict(zip(names, values)))]
    if os.environ.get("LOSSOPS_AOT_EXHAUSTIVE") == "1":
        return product
    pairs = [{(a, repr(case[a]), b, repr(case[b])) for a, b in itertools.combinations(names, 2)} for case in product]
    uncovered = set().union(*pairs)
    chosen = []
    while uncovered:
        best = max(range(len(product)), key=lambda i: len(pairs[i] & uncovered))
        chosen.append(product[best])
        uncovered -= pairs[best]
    for values in itertools.product(*(factors[name] for name in corners)):
        case = {name: factor[-1] for name, factor in factors.items()}
        case.update(heaviest)
        case.update(zip(corners, values))
        if case not in chosen:
            chosen.append(case)
    return chosen


# --- resources of a compiled variant --------------------------------------------------------------------------

# Per-SM limits (CUDA occupancy calculator, compute capability 8.0 and 9.0): registers, warps, resident blocks,
# shared memory (the driver reserves 1 KB per block).
_SM = {80: dict(registers=65536, warps=64, blocks=32, shared=167936),
       90: dict(registers=65536, warps=64, blocks=32, shared=233472)}
_RESERVED_SHARED = 1024
_REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256


def resources(compiled, cc: int) -> dict:
    """Registers per thread, spill and stack-save bytes (`local_memory`), shared memory, and the blocks and warps
    that fit on one SM, from `cuobjdump -res-usage` on the cubin (and its SASS where it uses local memory)."""
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(compiled, "-res-usage")))
    registers, stack, local = int(usage["REG"]), int(usage["STACK"]), int(usage["LOCAL"])
    # Disassembling takes about half a second a variant (most of a compile again); only one with local memory needs it.
    memory = dict(spill=0, stack_save=0)
    if stack or local:
        memory = local_memory(_cuobjdump(compiled, "-sass"), stack, local)
    shared = int(usage["SHARED"]) + compiled.metadata.shared
    warps = compiled.metadata.num_warps
    sm = _SM[cc]
    per_warp = -(-registers * 32 // _REGISTER_GRANULE) * _REGISTER_GRANULE
    blocks = min(sm["blocks"], sm["warps"] // warps, sm["registers"] // per_warp // warps,
                 sm["shared"] // (shared + _RESERVED_SHARED))
    return dict(registers=registers, **memory, shared=shared, num_warps=warps, blocks_per_sm=blocks,
                warps_per_sm=blocks * warps)


def _cuobjdump(compiled, option: str) -> str:
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, option, f.name], check=True, capture_output=True,
                              text=True).stdout


# --- local memory inside and outside loops ---------------------------------------------------------------------
#
# ptxas sometimes parks a value that is live across a loop but unused inside it on the stack: one store before the
# loop, one load after it, once per thread. That costs nothing measurable; a load or store of local memory inside a
# loop runs every iteration and costs bandwidth in a memory-bound kernel. cuobjdump's STACK and LOCAL counts cannot
# tell the two apart, the SASS can: an instruction is inside a loop when it lies on a cycle of the control flow
# (which covers the range [target, branch] of a backward branch and any out-of-line part of the loop body), or in
# a subroutine called from inside one.

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_SASS_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_SASS_TARGET = re.compile(r"(?:^|[\s,])(0x[0-9a-f]+|`\(([^)]+)\))\s*$")
_STACK_ADDRESS = re.compile(r"\[R1(?:\+(0x[0-9a-f]+|\d+))?\]")
_LOCAL_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
# Control flow that is not a direct branch, call, return or exit: the analysis cannot follow it.
_INDIRECT = {"BRX", "BRXU", "JMX", "JMXU", "JMP", "RTT", "BPT"}


def local_memory(sass: str, stack: int, local: int) -> dict:
    """`spill`: bytes of stack accessed inside a loop, or LOCAL if larger (it is not stack, and is counted whole);
    `stack_save`: the rest of STACK, bytes of stack only touched outside loops. `sass` is the output of
    `cuobjdump -sass` for a one-kernel cubin. Raises ValueError on SASS it does not recognise."""
    if sass.count("Function :") != 1:
        raise ValueError(f"expected one function in the SASS, found {sass.count('Function :')}")
    instructions, labels = [], {}
    for line in sass.splitlines():
        if m := _SASS_LINE.search(line):
            address, guard, opcode, operands = m.groups()
            unconditional = guard is None or guard.strip() == "@PT"
            instructions.append((int(address, 16), unconditional, opcode, operands.strip(), line.strip()))
        elif m := _SASS_LABEL.match(line):
            labels[m.group(1)] = len(instructions)
    if not instructions or not any(op == "EXIT" for _, _, op, _, _ in instructions):
        raise ValueError(f"no SASS instructions (or no EXIT) parsed from {len(sass)} characters of cuobjdump output")
    index = {address: i for i, (address, *_) in enumerate(instructions)}

    def target(i):
        operands, text = instructions[i][3], instructions[i][4]
        m = _SASS_TARGET.search(operands)
        if m is None:
            raise ValueError(f"no branch target in {text!r}")
        if m.group(2) is not None:
            if m.group(2) not in labels:
                raise ValueError(f"unknown label in {text!r}")
            return labels[m.group(2)]
        if int(m.group(1), 16) not in index:
            raise ValueError(f"branch target is no instruction: {text!r}")
        return index[int(m.group(1), 16)]

    def kind(i):
        opcode = instructions[i][2].split(".")[0]
        if opcode in _INDIRECT:
            raise ValueError(f"indirect control flow: {instructions[i][4]!r}")
        return opcode

    returning = {}

    def returns(entry):
        # Whether the code from `entry` reaches a RET: a CALL.REL.NOINC to a subroutine, which comes back, rather
        # than the loop exit ptxas also writes as one.
        if entry not in returning:
            returning[entry] = False
            returning[entry] = any(kind(i) == "RET" for i in _reachable([entry], successors))
        return returning[entry]

    def successors(i):
        opcode, unconditional = kind(i), instructions[i][1]
        following = [i + 1] if i + 1 < len(instructions) else []
        if opcode == "RET" or (opcode == "EXIT" and unconditional):
            return []
        if opcode == "CALL":
            return following if returns(target(i)) else [target(i)] + ([] if unconditional else following)
        if opcode == "BRA":
            alone = unconditional and _SASS_TARGET.match(instructions[i][3]) is not None
            return [target(i)] + ([] if alone else following)
        return following

    graph = [successors(i) for i in range(len(instructions))]
    in_loop = _on_cycles(graph)
    calls = [(i, target(i)) for i in range(len(instructions)) if kind(i) == "CALL" and returns(target(i))]
    changed = True
    while changed:
        changed = False
        for site, entry in calls:
            if in_loop[site]:
                for i in _reachable([entry], lambda j: graph[j]):
                    changed |= not in_loop[i]
                    in_loop[i] = True

    accesses = [i for i, (*_, opcode, _, _) in enumerate(instructions) if re.match(r"(STL|LDL)\b", opcode)]
    if (stack or local) and not accesses:
        raise ValueError(f"STACK:{stack} LOCAL:{local} but no STL/LDL found in the SASS")
    looped = set()
    for i in accesses:
        if not in_loop[i]:
            continue
        text = instructions[i][4]
        m = _STACK_ADDRESS.search(instructions[i][3])
        if m is None:
            looped = set(range(stack))  # an address not on the stack pointer: count the whole stack
            break
        offset = int(m.group(1) or "0", 0)
        width = next((w for suffix, w in _LOCAL_WIDTH.items() if suffix in instructions[i][2].split(".")), 4)
        if offset + width > stack:
            raise ValueError(f"{text!r} reaches past STACK:{stack}")
        looped.update(range(offset, offset + width))
    return dict(spill=max(local, len(looped)), stack_save=stack - len(looped))


def _reachable(starts, successors):
    seen, todo = set(starts), list(starts)
    while todo:
        for j in successors(todo.pop()):
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def _on_cycles(graph: list) -> list:
    """Per node of a directed graph (successor lists): whether it lies on a cycle (Kosaraju's strongly connected
    components, iterative: a kernel has thousands of instructions)."""
    order, seen = [], [False] * len(graph)
    for root in range(len(graph)):
        if seen[root]:
            continue
        seen[root] = True
        stack = [(root, iter(graph[root]))]
        while stack:
            node, rest = stack[-1]
            for following in rest:
                if not seen[following]:
                    seen[following] = True
                    stack.append((following, iter(graph[following])))
                    break
            else:
                stack.pop()
                order.append(node)
    predecessors = [[] for _ in graph]
    for node, following in enumerate(graph):
        for j in following:
            predecessors[j].append(node)
    component = [-1] * len(graph)
    for root in reversed(order):
        if component[root] >= 0:
            continue
        component[root], todo = root, [root]
        while todo:
            for j in predecessors[todo.pop()]:
                if component[j] < 0:
                    component[j] = root
                    todo.append(j)
    size = collections.Counter(component)
    return [size[component[i]] > 1 or i in graph[i] for i in range(len(graph))]
