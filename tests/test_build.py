"""The build and install surface: setup.py without torch, pyproject metadata, the kernel-library interface."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lossops
from lossops import _cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_without_torch_stops_with_one_clear_sentence():
    # torch made unimportable the way a fresh environment has it: the import fails.
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', 'build_ext']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "install torch first" in result.stderr and "--no-build-isolation" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_pyproject_build_requirements_do_not_pull_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert not any(r.lower().startswith("torch") for r in meta["build-system"]["requires"])
    assert any(r.startswith("setuptools") for r in meta["build-system"]["requires"])
    assert meta["project"]["dependencies"] == ["torch>=2.11"]
    assert "version" in meta["project"]["dynamic"]


def test_every_isa_library_is_built_and_reports_its_capability():
    for isa in _cpp.ISAS:
        path = _cpp.kernel_library(isa)
        assert path is not None, f"no kernel library for {isa}"


def test_a_library_without_the_kernel_table_is_refused():
    """A stale or foreign library is refused by name, never called with a guessed layout."""
    host = _cpp.module()
    with pytest.raises(RuntimeError, match=r"lossops_kernel_table_v\d"):
        host.load_kernels(host.__file__)
    _cpp.module.cache_clear()  # load_kernels failed before switching: the serving library is unchanged
    assert _cpp.capability() in ("DEFAULT", "AVX2", "AVX512")


def test_missing_isa_names_what_was_built(monkeypatch):
    monkeypatch.setenv("LOSSOPS_CPU_CAPABILITY", "sse9")
    _cpp.module.cache_clear()
    try:
        with pytest.raises(ImportError, match="no _kernels_sse9 library was built"):
            _cpp.module()
    finally:
        monkeypatch.delenv("LOSSOPS_CPU_CAPABILITY")
        _cpp.module.cache_clear()


def test_show_config_names_version_build_and_backends():
    text = lossops.show_config()
    assert lossops.__version__ in text
    assert f"{_cpp.capability()} build in use" in text
    assert "backends usable here: cpp" in text
    assert "Triton:" in text
