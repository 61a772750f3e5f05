"""The benchmark CLI (bench/): a tiny end-to-end run, its memory measurement and its targets verdict."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report
from bench.measure import PeakMemory, Stats
from bench.runner import Row

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def run_bench(tmp_path_factory, name, *args, timeout=600):
    """`python -m bench ARGS --out <fresh folder>`, which must succeed; returns the folder and the process."""
    out = tmp_path_factory.mktemp(name)
    result = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return out, result


# Session-scoped: the suite runs its slowest tests first, so this file's tests are not adjacent, and a module-scoped
# fixture would be made again each time the worker comes back to the module.
@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    return run_bench(tmp_path_factory, "bench", "--quick", "--op", "cross_entropy", "--dtype", "float32",
                     "--shape", "64x128", "--shape", "64x512", "--repeats", "2", "--threads", "1")


def test_cli_writes_stamped_csv_png_and_markdown(quick_run):
    out, result = quick_run
    (csv_path,) = out.glob("*.csv")
    for name in ("cpu", f"torch-{torch.__version__}", "1threads"):
        assert name in csv_path.name
    stem = str(csv_path)[:-len(".csv")]
    assert Path(stem + ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(stem + ".md").read_text().strip() == result.stdout.strip()
    assert "0/" in result.stderr and "floor copy_" in result.stderr  # the progress bar went to stderr


def test_cli_measures_every_implementation_of_each_case(quick_run):
    out, _ = quick_run
    with open(next(out.glob("*.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == report.CSV_COLUMNS
    expected = {"eager", "compile", "lossops-cpp", "lossops-cpp inplace", "floor clone", "floor copy_"}
    for cols in ("128", "512"):
        case = {r["impl"]: r for r in rows if r["cols"] == cols}
        assert set(case) == expected
        assert not any(r["error"] for r in case.values()), [r["error"] for r in case.values()]
        for impl in expected - {"floor clone", "floor copy_"}:
            assert all(float(case[impl][c]) > 0 for c in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "speedup_vs_eager",
                                                           "speedup_vs_compile", "pct_of_floor"))
        assert case["lossops-cpp inplace"]["floor"] == "copy_" and case["lossops-cpp"]["floor"] == "clone"
        assert float(case["eager"]["speedup_vs_eager"]) == 1.0


def test_cli_prints_the_markdown_table_and_the_targets(quick_run):
    _, result = quick_run
    assert "| dtype | shape | impl | fwd ms | bwd ms | fwd+bwd ms (IQR) |" in result.stdout
    assert "| float32 | 64x512 | lossops-cpp inplace |" in result.stdout
    assert "## Targets" in result.stdout and "not run" in result.stdout  # the target shapes were not run


def test_peak_memory_sees_pages_malloc_had_cached():
    memory = PeakMemory(torch.device("cpu"))
    if not memory.available:
        pytest.skip(memory.method)
    # Freeing a 16 MiB mmap raises glibc's mmap threshold, so the 4 MiB block comes from the heap and stays
    # resident after it is freed: without trimming, the measured allocation below would reuse it and read 0.
    # The smallest of three: a process-wide figure also counts whatever else the process allocated meanwhile.
    fresh = []
    for _ in range(3):
        torch.ones(16 * MiB // 4)
        torch.ones(4 * MiB // 4)
        fresh.append(memory.measure(lambda: None, lambda _: torch.ones(4 * MiB // 4)))
    assert 3.9 * MiB <= min(fresh) <= 5 * MiB
    buffer = torch.zeros(4 * MiB // 4)
    assert memory.measure(lambda: buffer, lambda b: b.fill_(1)) < 1 * MiB


def _row(impl, ms, shape=(4096, 32000), op="cross_entropy", floor="clone"):
    return Row(op, "float32", shape, impl, fwdbwd=Stats(ms, 0.0, 3), floor=None if impl.startswith("floor") else floor)


def test_targets_compare_ratios_from_the_same_run():
    stamp = report.Stamp("cpu", "test machine", "0", 1, "none")
    rows = [_row("eager", 400), _row("compile", 200), _row("lossops-cpp", 100), _row("floor clone", 90),
            _row("lossops-cpp inplace", 40, floor="copy_"), _row("floor copy_", 30)]
    text = report.targets(report.records(rows, stamp), "lossops-cpp", "cpu")
    lines = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in text.splitlines()}
    assert "| 4.00× | met |" in lines[("CE fp32 N=4096 V=32000", "≥ 3× vs eager")]
    assert "| 2.00× | met |" in lines[("CE fp32 N=4096 V=32000", "≥ 1.5× vs compile")]
    assert "| 1.11× | met |" in lines[("CE fp32 N=4096 V=32000", "≤ 1.25× clone floor")]
    assert "| 1.33× | met |" in lines[("same, inplace_backward=True", "≤ 1.5× copy_ floor")]
    assert "| – | not run |" in lines[("CE bf16 N=4096 V=32000", "≥ 8× vs eager")]
    slower = [_row("eager", 250)] + rows[1:]
    text = report.targets(report.records(slower, stamp), "lossops-cpp", "cpu")
    assert "| 2.50× | missed |" in text


def test_grid_runs_only_the_implementations_named(tmp_path_factory):
    out, result = run_bench(tmp_path_factory, "grid-impl", "--grid", "--quick", "--op", "mse_loss", "--dtype",
                            "float32", "--shape", "32x10", "--impl", "eager", "--repeats", "1", "--warmup", "1",
                            timeout=600)
    (csv_path,) = out.glob("grid_*.csv")
    with csv_path.open() as f:
        cells = list(csv.DictReader(f))
    assert cells and all(float(c["eager_ms"]) > 0 and float(c["lossops_ms"]) > 0 and not c["compile_ms"]
                         for c in cells), cells
    assert all(c["verdict"] != "n/a" for c in cells)


def test_grid_refuses_an_unknown_implementation():
    import argparse
    from bench import grid
    assert grid.main(argparse.Namespace(impl=["lossops-cpp"])) == 2


@pytest.fixture(scope="session")
def grid_run(tmp_path_factory):
    return run_bench(tmp_path_factory, "grid", "--grid", "--quick", "--op", "cross_entropy", "--op", "mse_loss",
                     "--dtype", "float32", "--repeats", "1", "--warmup", "1", timeout=900)


def test_grid_measures_every_cell_against_eager_and_compile(grid_run):
    from bench import grid
    out, result = grid_run
    (csv_path,) = out.glob("grid_*.csv")
    with csv_path.open() as f:
        cells = list(csv.DictReader(f))
    threads = {"1"} | ({str(os.cpu_count())} if (os.cpu_count() or 1) > 1 else set())
    expected = {(op, "x".join(map(str, shape)), mode, t) for op in ("cross_entropy", "mse_loss")
                for shape in grid.QUICK_SHAPES[op] for mode in grid.MODES for t in threads}
    assert {(c["op"], c["shape"], c["mode"], c["threads"]) for c in cells} == expected
    for c in cells:
        assert not c["error"], c
        for impl in ("eager", "compile", "lossops"):
            assert float(c[f"{impl}_ms"]) > 0, c
        assert c["verdict"] in ("ok", "target met", "SLOWER than eager") or c["verdict"].startswith("target "), c
        assert "CPU capability" in c["isa"] and torch.backends.cpu.get_cpu_capability() in c["isa"]
    assert any(c["shape"] == "2x5x4x4" for c in cells)  # a class-dim-1 layout runs through the grid
    stem = str(csv_path)[:-len(".csv")]
    assert Path(stem + ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = Path(stem + ".md").read_text()
    assert text.strip() == result.stdout.strip()
    assert "lossops kernels in use" in text and text.count("\n| cross_entropy |") == sum(
        c["op"] == "cross_entropy" for c in cells)


def test_grid_verdicts_hold_each_cell_to_eager_and_its_target():
    from bench.grid import Cell, target_for
    assert target_for("cross_entropy", (65536, 10), "float32", "1", "fwd+bwd") == 3.0
    assert target_for("cross_entropy", (65536, 10), "float32", "1", "no_grad fwd") == 1.0
    assert target_for("sigmoid_focal_loss", (65536, 80), "float32", "all", "fwd+bwd") == 5.0
    assert target_for("sigmoid_focal_loss", (65536, 80), "float32", "1", "fwd+bwd") == 1.0
    assert target_for("cross_entropy", (4096, 32000), "bfloat16", "1", "fwd+bwd") == 8.0
    assert target_for("cross_entropy", (4096, 32000), "float32", "1", "fwd+bwd") == 1.0

    def cell(eager, ours, target=1.0):
        return Cell("cross_entropy", "float32", (32, 10), "fwd+bwd", 1, "1",
                    {"eager": eager, "compile": 2.0, "lossops": ours}, target)
    assert cell(1.0, 1.0).verdict == "ok"
    assert cell(1.0, 1.25).verdict == "SLOWER than eager"
    assert cell(3.0, 1.0, target=3.0).verdict == "target met"
    assert cell(2.0, 1.0, target=3.0).verdict == "target 3x missed"
    assert cell(2.0, 1.0).speedup("compile") == 2.0


def test_grid_holds_a_fused_linear_loss_to_its_matrix_products():
    from bench.grid import Cell, floor_bound_for
    shape = (2048, 512, 32000)
    assert floor_bound_for("linear_distillation_loss", shape, "bfloat16", "all", "fwd+bwd") == 1.3
    assert floor_bound_for("linear_distillation_loss", shape, "float32", "1", "no_grad fwd") is None

    def cell(ours, floor):
        return Cell("linear_distillation_loss", "float32", shape, "fwd+bwd", 1, "1",
                    {"eager": 3.0, "compile": 2.0, "lossops": ours, "floor": floor}, 1.0, floor_bound=1.3)
    assert cell(1.25, 1.0).verdict == "target met"
    assert cell(1.35, 1.0).verdict == "1.3x floor missed"
    assert cell(1.25, 1.0).of_floor == 1.25


def test_bench_differentiates_every_input_that_requires_grad(tmp_path_factory):
    """linear_distillation_loss (hidden and weight gradients, a matmuls floor) through the CLI's tiny case."""
    out, result = run_bench(tmp_path_factory, "linear_distillation", "--quick", "--op", "linear_distillation_loss",
                            "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--threads", "1")
    assert "floor matmuls" in result.stdout and "lossops-cpp" in result.stdout
    from bench.cases import FAMILIES, differentiable
    x, rest = FAMILIES["linear_distillation_loss"].inputs((8, 4, 16), torch.float32, torch.device("cpu"))
    assert len(differentiable(x, rest)) == 2  # the student's input and weight


def test_linear_ce_benchmark_runs_every_method(capsys):
    from bench import linear_ce
    linear_ce.main(["--tokens", "64", "--hidden", "16", "--vocab", "96", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for name in linear_ce.METHODS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), (name, out)
    assert "torch-chunked" in linear_ce.METHODS  # torch 2.13's own chunked linear cross-entropy is compared
