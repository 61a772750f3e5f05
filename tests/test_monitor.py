"""lossops.monitor: gradient norms through hooks, NaN/Inf flagged at the right step and layer, CSV/TensorBoard."""
import csv
import importlib.util
import math
import sys
import warnings

import pytest
import torch
from torch import nn

from lossops.monitor import GradientMonitor, NonFiniteGradientError

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def mlp():
    # Layers are named "0", "2", "4" by nn.Sequential.
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def run_steps(model, monitor, steps, poison_steps=(), layer="2", value=float("nan")):
    """Runs forward/backward/monitor.step; on poison_steps the gradient leaving `layer`'s output becomes `value`,
    so that layer and every layer before it get non-finite gradients while the layers after it stay finite."""
    poison = {"on": False}

    def attach(module, inputs, output):
        if poison["on"]:
            output.register_hook(lambda grad: torch.full_like(grad, value))

    handle = dict(model.named_modules())[layer].register_forward_hook(attach)
    for step in range(steps):
        poison["on"] = step in poison_steps
        model.zero_grad(set_to_none=True)
        loss = model(torch.randn(5, 4)).square().mean()
        loss.backward()
        monitor.step(loss)
    handle.remove()


def test_nan_is_flagged_on_the_step_it_appears_naming_the_layer_it_entered():
    model = mlp()
    monitor = GradientMonitor(model)
    with pytest.warns(RuntimeWarning) as caught:
        run_steps(model, monitor, 9, poison_steps={3, 4, 7})
    event = monitor.first_nonfinite
    assert (event.step, event.layer, event.kind) == (3, "2", "nan")
    assert event.parameter in ("2.weight", "2.bias")
    # Layer "0" is poisoned too (upstream), but "2" is where the NaN entered; layer "4" stays finite.
    assert set(event.parameters) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert [e.step for e in monitor.events] == [3, 4, 7]
    assert [r.event is not None for r in monitor.history] == [s in (3, 4, 7) for s in range(9)]
    assert math.isfinite(monitor.history[3].layer_grad_norms["4"])
    # One warning per onset: step 4 continues the run that began at step 3.
    messages = [str(w.message) for w in caught if "lossops.monitor" in str(w.message)]
    assert len(messages) == 2 and "step 3" in messages[0] and "step 7" in messages[1]
    assert "2.weight" in messages[0] or "2.bias" in messages[0]


def one_parameter_model(size):
    model = nn.Module()
    model.weight = nn.Parameter(torch.ones(size))
    return model


def test_inf_gradient_and_nonfinite_loss_are_told_apart():
    model = one_parameter_model(3)
    monitor = GradientMonitor(model)
    model.weight.register_hook(lambda grad: grad * float("inf"))
    loss = model.weight.sum()
    loss.backward()
    with pytest.warns(RuntimeWarning, match="INF in gradient of weight"):
        record = monitor.step(loss)
    assert (record.event.kind, record.event.parameter, record.event.layer) == ("inf", "weight", "")

    model = mlp()
    monitor = GradientMonitor(model)
    loss = model(torch.full((2, 4), float("nan"))).sum()
    loss.backward()
    # The gradients are NaN as well, but a non-finite loss came from the forward pass: the loss is named.
    with pytest.warns(RuntimeWarning, match="NAN in the loss"):
        record = monitor.step(loss)
    assert (record.event.layer, record.event.parameter) == ("loss", None)
    assert "0.weight" in record.event.parameters


def test_raise_on_nonfinite_raises_after_recording():
    model = mlp()
    monitor = GradientMonitor(model, raise_on_nonfinite=True)
    with pytest.raises(NonFiniteGradientError, match=r"step 2: NAN in gradient of 2\.(weight|bias)"):
        run_steps(model, monitor, 4, poison_steps={2})
    assert len(monitor.history) == 3 and monitor.first_nonfinite.step == 2


def test_norms_are_those_of_the_accumulated_unscaled_gradients():
    model = mlp()
    monitor = GradientMonitor(model)
    x = torch.randn(6, 4)
    # Two backward passes before step(): gradient accumulation, where the hook must see the summed gradient.
    for half in (x[:3], x[3:]):
        (model(half).square().mean() * 1024).backward()
    record = monitor.step(torch.tensor(1.0), grad_scale=1024)
    for layer in ("0", "2", "4"):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(layer + ".")]
        expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads)) / 1024
        assert record.layer_grad_norms[layer] == pytest.approx(expected, rel=1e-6)
    total = math.sqrt(sum(v * v for v in record.layer_grad_norms.values()))
    assert record.total_grad_norm == pytest.approx(total, rel=1e-9)


def test_large_finite_gradients_are_not_reported_as_overflow():
    # Squares of 1e30 overflow an fp32 sum; GradScaler-scaled gradients reach such sizes and are finite.
    model = one_parameter_model(1000)
    monitor = GradientMonitor(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (model.weight * 1e30).sum().backward()
        record = monitor.step(torch.tensor(0.0))
    assert record.event is None and record.layer_grad_norms[""] == pytest.approx(1e30 * math.sqrt(1000), rel=1e-6)


def test_csv_has_one_row_per_step_with_the_recorded_values(tmp_path):
    model = mlp()
    with GradientMonitor(model, tmp_path, writer="csv") as monitor:
        with pytest.warns(RuntimeWarning):
            run_steps(model, monitor, 3, poison_steps={1})
    assert monitor.writer_kind == "csv"
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "grad_norm/total", "grad_norm/0", "grad_norm/2", "grad_norm/4",
                             "nonfinite"]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row, record in zip(rows, monitor.history):
        assert float(row["loss"]) == pytest.approx(record.loss)
        assert float(row["grad_norm/4"]) == pytest.approx(record.layer_grad_norms["4"])
    assert math.isnan(float(rows[1]["grad_norm/2"])) and "2." in rows[1]["nonfinite"]
    assert rows[0]["nonfinite"] == rows[2]["nonfinite"] == ""


def test_without_tensorboard_auto_falls_back_to_csv(tmp_path, monkeypatch):
    # None in sys.modules makes the import raise ImportError, as when `tensorboard` is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    model = mlp()
    with GradientMonitor(model, tmp_path) as monitor:
        run_steps(model, monitor, 2)
    assert monitor.writer_kind == "csv" and monitor.log_path == str(tmp_path / "metrics.csv")
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3
    with pytest.raises(ImportError, match="pip install tensorboard"):
        GradientMonitor(model, tmp_path / "tb", writer="tensorboard")


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the TensorBoard writer needs `tensorboard` (CI installs it)")
def test_tensorboard_receives_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = mlp()
    with GradientMonitor(model, tmp_path) as monitor:
        run_steps(model, monitor, 3)
    assert monitor.writer_kind == "tensorboard"
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"loss", "grad_norm/total", "grad_norm/0", "grad_norm/2", "grad_norm/4"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("grad_norm/2")] == pytest.approx(
        [r.layer_grad_norms["2"] for r in monitor.history], rel=1e-6)


def test_close_removes_the_hooks():
    model = mlp()
    monitor = GradientMonitor(model)
    monitor.close()
    model(torch.randn(2, 4)).sum().backward()
    assert monitor.step(torch.tensor(0.0)).layer_grad_norms == {}


def test_unknown_writer_is_rejected():
    with pytest.raises(ValueError, match="writer must be"):
        GradientMonitor(mlp(), writer="wandb")
