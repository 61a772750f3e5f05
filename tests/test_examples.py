"""The training examples, each run at a tiny size: examples/train_amp.py, examples/compare_losses.py,
examples/train_hf_causal_lm.py and examples/distill_causal_lm.py."""
import importlib.util
import io
import json
import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import _common  # noqa: E402
import compare_losses  # noqa: E402
import distill_causal_lm  # noqa: E402
import train_amp  # noqa: E402
import train_hf_causal_lm  # noqa: E402

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
TINY_AMP = "--steps 60 --hidden 32 --samples 2000 --batch-size 64 --quiet".split()
TINY_COMPARE = "--epochs 3 --limit 400 --width 8 --quiet".split()
TINY_DISTILL = ("--vocab 300 --teacher-hidden 32 --student-hidden 16 --heads 2 --seq 16 --batch-size 2 "
                "--teacher-steps 3 --steps 4 --quiet").split()
TINY_HF = "--steps 4 --hidden 32 --layers 1 --heads 2 --vocab 2000 --seq 32 --batch-size 2 --quiet".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def mean(values):
    return sum(values) / len(values)


def test_amp_training_loss_falls_with_no_unhandled_inf_or_nan():
    result = train_amp.train(train_amp.parse_args(TINY_AMP + ["--dtype", "bf16"]))
    assert all(math.isfinite(v) for v in result.losses)
    assert mean(result.losses[-10:]) < 0.8 * mean(result.losses[:10])
    assert result.unhandled_steps == [] and result.params_finite
    # bf16 has fp32's exponent range: at the default scale nothing overflows, so no step may be skipped.
    assert result.skipped_steps == 0 and result.accuracy > 0.3


def test_huge_initial_scale_makes_the_scaler_skip_and_back_off():
    # fp16 (which CPU autocast also runs) is the dtype GradScaler exists for: 1e10 x its gradients overflow.
    result = train_amp.train(train_amp.parse_args(TINY_AMP[:-1] + ["--steps", "30", "--dtype", "fp16",
                                                                   "--init-scale", "1e10", "--quiet"]))
    assert result.dtype == "float16"
    assert result.skipped[0] and result.skipped_steps >= 5
    previous = [1e10] + result.scales[:-1]
    for skipped, before, after in zip(result.skipped, previous, result.scales):
        assert after == pytest.approx(before / 2 if skipped else before, rel=1e-6)
    assert not all(result.skipped), "the scale never came down far enough for a step to be taken"
    assert result.unhandled_steps == [] and result.params_finite


def test_train_amp_cli_prints_progress_and_the_loss_curve(tmp_path, capsys):
    result = train_amp.main(TINY_AMP[:-1] + ["--steps", "20", "--monitor-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "train [" in err and "20/20" in err
    assert "loss per step" in out and f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}" in out
    assert os.listdir(tmp_path), "--monitor-dir wrote nothing"


def test_weight_decay_applies_to_weight_matrices_only():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, no_decay = _common.decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model[0].weight), id(model[4].weight)}
    assert ids(no_decay) == {id(p) for p in model.parameters()} - ids(decay)


def test_text_curve_draws_a_falling_series_from_top_left_to_bottom_right():
    rows = _common.text_curve([5.0, 4.0, float("nan"), 3.0, 2.0, 1.0], height=5).splitlines()
    plot = [row.split("|", 1)[1] for row in rows if "|" in row]
    assert len(plot) == 5 and plot[0].startswith("*") and plot[-1].endswith("*")
    assert rows[0].startswith("5") and rows[4].lstrip().startswith("1")


def test_progress_prints_about_ten_lines_outside_a_terminal():
    stream = io.StringIO()
    progress = _common.Progress(100, "x", stream=stream)
    for i in range(1, 101):
        progress.update(i, loss=1.0 / i)
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and "100/100" in lines[-1] and "[" + "#" * 30 + "]" in lines[-1]


def check_compare_outputs(out_dir, summary):
    keys = [r["key"] for r in summary["results"]]
    assert keys == ["ce", "mse", "l1", "focal"]
    for r in summary["results"]:
        assert len(r["curve"]) == 3 and all(0.0 <= a <= 100.0 for a in r["curve"])
    table = (out_dir / "results.md").read_text()
    for label, guide in [("Cross-entropy", "92.3"), ("MSE", "78.5"), ("L1", "75.2"), ("Focal", "93.1")]:
        assert any(line.startswith(f"| {label}") and f"| {guide} |" in line for line in table.splitlines())
    assert "CIFAR-10" in table and summary["data"] in table
    assert json.loads((out_dir / "results.json").read_text())["results"][0]["curve"] == summary["results"][0]["curve"]
    assert (out_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_losses_on_synthetic_glyphs(tmp_path):
    summary = compare_losses.main(TINY_COMPARE + ["--data", "synthetic", "--out", str(tmp_path)])
    assert summary["data"].startswith("synthetic")
    check_compare_outputs(tmp_path, summary)
    assert summary["results"][0]["accuracy"] > 25.0  # 10 classes: chance is 10%


@pytest.mark.skipif(not HAS_SKLEARN, reason="the digits data set ships with scikit-learn (CI installs it)")
def test_compare_losses_on_sklearn_digits(tmp_path):
    summary = compare_losses.main(TINY_COMPARE + ["--data", "digits", "--out", str(tmp_path)])
    assert summary["data"] == "scikit-learn 8x8 digits"
    check_compare_outputs(tmp_path, summary)
    assert summary["results"][0]["accuracy"] > 60.0


def test_without_sklearn_auto_uses_generated_images(monkeypatch):
    # None in sys.modules makes the import raise ImportError, as when scikit-learn is not installed.
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    images, labels, name = compare_losses.load_images("auto", torch.Generator().manual_seed(0), 50)
    assert name.startswith("synthetic") and images.shape == (50, 1, 8, 8) and labels.max() < 10
    with pytest.raises(ImportError, match="scikit-learn"):
        compare_losses.load_images("digits", torch.Generator())


def test_without_matplotlib_the_plot_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results = [{"loss": "CE", "curve": [50.0, 60.0]}]
    with pytest.warns(RuntimeWarning, match="matplotlib"):
        assert compare_losses.save_plot(results, "x", str(tmp_path / "a.png")) is False
    assert not (tmp_path / "a.png").exists()


def test_hf_causal_lm_patched_run_has_the_same_losses_in_less_memory(capsys):
    results = train_hf_causal_lm.main(TINY_HF)
    out = capsys.readouterr().out
    unpatched, patched = results["unpatched"], results["patched"]
    assert len(patched.losses) == 4 and patched.losses == pytest.approx(unpatched.losses, rel=1e-5)
    logits_bytes = 2 * 32 * 2000 * 4
    assert patched.peak_bytes + logits_bytes < unpatched.peak_bytes
    assert "| peak tensor memory, fwd+bwd (MiB)" in out and f"{patched.losses[-1]:.4f}" in out


def test_distillation_example_fused_and_unfused_agree(capsys):
    out = distill_causal_lm.main(TINY_DISTILL + ["--divergence", "jsd"])
    fused, unfused = out["results"]["fused (lossops)"], out["results"]["unfused (torch)"]
    assert all(math.isfinite(v) for v in fused["losses"] + out["teacher_losses"])
    # the same student, batches and loss: the same losses to float32 rounding, step after step
    for a, b in zip(fused["losses"], unfused["losses"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    printed = capsys.readouterr().out
    assert "median ms/step" in printed and "fused (lossops)" in printed and "unfused (torch)" in printed
