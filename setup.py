"""Builds lossops' C++ CPU kernels; the package metadata lives in pyproject.toml.

Two kinds of shared object (csrc/kernel_abi.h explains why):
  lossops._C                     the host module: Python bindings and gradient buffers, compiled once
  lossops/_kernels_<isa>.so      the loss kernels, once per instruction set (default, avx2, avx512), each with
                                 ATen's CPU_CAPABILITY macros so at::vec uses real intrinsics; no
                                 -march=native, so a wheel built here runs on older CPUs
Only the kernel files are compiled per ISA, as one translation unit per ISA that includes every family's .cpp
(generated under build/unity/): the ATen headers are then parsed three times instead of fifteen. None of them
includes torch/extension.h.

Environment:
  DEBUG=1     -O0 -g
  SANITIZE=1  AddressSanitizer + UndefinedBehaviourSanitizer (see .ci/sanitize.sh)
  LOSSOPS_ISAS=default,avx2,avx512   restrict the variants built (default: all the platform supports)
  MAX_JOBS    parallel compile jobs (ninja); ccache is used when it is installed and CXX is not set
"""
import copy
import os
import platform
import shutil
import sys
import tempfile

from setuptools import setup

try:
    import torch  # noqa: F401  (the extension is compiled against the installed torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("lossops: building needs torch importable; install torch first (e.g. pip install torch==2.13.0 for the "
             "CPU wheel), then pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
HOST_SOURCES = ["bindings.cpp", "allocation.cpp", "eager_path.cpp"]
KERNEL_SOURCES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cpp") and f not in HOST_SOURCES)

# ATen's own per-ISA flags (cmake/Codegen.cmake): CPU_CAPABILITY names at::vec's inline namespace and the
# CPU_CAPABILITY_* macro switches at::vec from its scalar fallback to the intrinsics.
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
}


def isas():
    requested = os.environ.get("LOSSOPS_ISAS")
    if requested:
        return [s.strip() for s in requested.split(",") if s.strip()]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["default", "avx2", "avx512"]
    return ["default"]


def build_order(variants):
    """The baseline first, then the widest ISA first (see ext_modules below)."""
    width = list(ISA_FLAGS)
    return sorted(variants, key=lambda isa: (isa != "default", -width.index(isa)))


def flags():
    # -g0 / -g1 below override the -g that Python's own CFLAGS put first: full debug info costs compile time
    # that a release or sanitizer build does not need.
    cflags = ["-fopenmp", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wall", "-Wno-unknown-pragmas",
              "-Wno-maybe-uninitialized"]
    if os.environ.get("DEBUG") == "1":
        cflags += ["-O0", "-g"]
    elif os.environ.get("SANITIZE") == "1":
        # -O0 and line tables only: instrumenting the optimiser's output is what makes a sanitized build slow, the
        # sanitized tests use small shapes, at -O0 every access is checked as written, and reports name file and line.
        cflags += ["-O0", "-g1"]
    else:
        cflags += ["-O3", "-g0"]
    ldflags = ["-fopenmp"]
    if os.environ.get("SANITIZE") == "1":
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        ldflags += ["-fsanitize=address,undefined"]
    return cflags, ldflags


def extension(name, sources, isa):
    cflags, ldflags = flags()
    cflags += ["-DCPU_CAPABILITY=" + isa.upper(), "-DCPU_CAPABILITY_" + isa.upper()] + ISA_FLAGS[isa]
    return CppExtension(name, sources, include_dirs=[CSRC], extra_compile_args={"cxx": cflags},
                        extra_link_args=ldflags)


def unity_source(isa):
    """One file that includes every kernel source; rewritten only when its contents change, so ninja's
    dependency files (not this file's timestamp) decide what to rebuild."""
    relative = os.path.join("build", "unity", f"kernels_{isa}.cpp")  # setuptools < 69 refuses absolute sources
    path = os.path.join(ROOT, relative)
    text = "".join(f'#include "{os.path.join(CSRC, f)}"\n' for f in KERNEL_SOURCES)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as out:
            out.write(text)
    return relative


class PerExtensionBuild(BuildExtension):
    """Builds the extensions side by side, each in an object directory of its own (the ISA variants compile the
    same sources with other flags).

    Each extension is one or two translation units, so ninja alone (MAX_JOBS within one extension) would leave
    the other core idle while the next ISA waits: the extensions themselves run in MAX_JOBS threads.
    pip hands every build a fresh temporary directory, which would make each `pip install -e .` a full rebuild,
    and `pip wheel .` another directory of its own (build/temp.*); objects go to build/obj instead, so ninja
    recompiles only what changed and a wheel built after the editable install links the same objects (a
    --build-temp of another name, as the sanitizer build passes, is kept)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))

    def build_extension(self, ext):
        given_abs = os.path.abspath(self.build_temp)
        pip_temporary = given_abs.startswith(tempfile.gettempdir() + os.sep) and not given_abs.startswith(ROOT + os.sep)
        setuptools_default = os.path.basename(given_abs).startswith("temp.")
        shared = os.path.join(ROOT, "build", "obj") if pip_temporary or setuptools_default else self.build_temp
        # A shallow copy per extension: the threads must not share a mutated build_temp.
        own = copy.copy(self)
        own.build_temp = os.path.join(shared, ext.name.replace(".", "_"))
        super(PerExtensionBuild, own).build_extension(ext)


def use_ccache():
    # /usr/lib/ccache/g++ is ccache posing as the compiler: torch's compiler checks see a plain g++.
    masquerade = "/usr/lib/ccache/g++"
    if "CXX" not in os.environ and shutil.which("ccache") and os.path.exists(masquerade):
        os.environ["CXX"] = masquerade


use_ccache()
setup(
    # Longest first: the extensions are built MAX_JOBS at a time in this order. Each kernel library is one
    # translation unit; the baseline one (at::vec's emulated vectors: loops the optimiser works through) takes
    # longest, then the wider the ISA the longer. The host module's three small files come last, beside the last
    # library: in any other order one library was left compiling alone at the end.
    ext_modules=[extension("lossops._kernels_" + isa, [unity_source(isa)], isa) for isa in build_order(isas())]
    + [extension("lossops._C", [os.path.join("csrc", f) for f in HOST_SOURCES], "default")],
    cmdclass={"build_ext": PerExtensionBuild},  # ninja by default when it is installed
)
