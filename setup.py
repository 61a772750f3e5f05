"""Builds lossops' C++ CPU kernels once per instruction set and installs the Triton kernels inside the package.

Each ISA variant is its own extension module (lossops._C, lossops._C_avx2, lossops._C_avx512) rather than
three object sets linked into one library: inline functions from the torch headers compiled with AVX-512
flags would otherwise be merged with the baseline copies by the linker, and the baseline module could end
up calling an AVX-512 instruction on an older CPU. lossops._cpp picks the best module the CPU supports.

Environment:
  DEBUG=1     -O0 -g
  SANITIZE=1  AddressSanitizer + UndefinedBehaviourSanitizer (see .ci/run)
  LOSSOPS_ISAS=default,avx2,avx512   restrict the variants built (default: all the platform supports)
"""
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cpp"))

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


def extension(isa):
    debug = os.environ.get("DEBUG") == "1"
    sanitize = os.environ.get("SANITIZE") == "1"
    cflags = ["-fopenmp", "-fvisibility=hidden", "-DCPU_CAPABILITY=" + isa.upper(),
              "-DCPU_CAPABILITY_" + isa.upper(), "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    cflags += ["-O0", "-g"] if debug else ["-O3"]
    ldflags = ["-fopenmp"]
    if sanitize:
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
        ldflags += ["-fsanitize=address,undefined"]
    name = "lossops._C" if isa == "default" else "lossops._C_" + isa
    return CppExtension(name, SOURCES, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": cflags + ISA_FLAGS[isa]}, extra_link_args=ldflags)


class PerExtensionBuild(BuildExtension):
    """Gives each ISA variant its own object directory: they compile the same sources with other flags."""

    def build_extension(self, ext):
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.replace(".", "_"))
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp


setup(
    name="lossops",
    version="0.1.0",
    description="Fused forward+backward loss kernels for PyTorch (C++ on CPU, Triton on GPU)",
    packages=["lossops", "lossops.triton_kernels"],
    package_dir={"lossops": "lossops", "lossops.triton_kernels": "triton_kernels"},
    ext_modules=[extension(isa) for isa in isas()],
    cmdclass={"build_ext": PerExtensionBuild.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"gpu": ["triton>=3.0"], "test": ["pytest", "hypothesis", "expecttest", "numpy", "triton"]},
)
