"""The benchmark CLI (bench/): a tiny end-to-end run, its memory measurement and its targets verdict."""
import csv
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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--op", "cross_entropy", "--dtype", "float32",
         "--shape", "64x128", "--shape", "64x512", "--repeats", "2", "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out, result


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
    torch.ones(16 * MiB // 4)
    torch.ones(4 * MiB // 4)
    fresh = memory.measure(lambda: None, lambda _: torch.ones(4 * MiB // 4))
    assert 3.9 * MiB <= fresh <= 5 * MiB
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
