"""The benchmarks' shared measuring and checking helpers (benchmarks/timing.py), and their equality checks on
tiny sizes: a ratio is computed right whatever the times, and a wrong output stops a benchmark before it
prints one."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kernels as kernel_benchmark  # noqa: E402  benchmarks/kernels.py
import layer_stack as layer_stack_benchmark  # noqa: E402
import probe as probe_benchmark  # noqa: E402
import timing  # noqa: E402
import train_step  # noqa: E402


def test_speedup_is_the_plain_ratio_whatever_the_times():
    assert timing.speedup(0.5, 0.3) == pytest.approx(5 / 3)  # under a second: the old max(seconds, 1) gave 0.5
    assert timing.speedup(12.0, 4.0) == pytest.approx(3.0)
    assert timing.speedup(1e-4, 2e-4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        timing.speedup(1.0, 0.0)
    assert timing.format_ratio(5 / 3) == "1.7×" and timing.format_ratio(0.42) == "0.42×"


def test_kernel_table_row_prints_the_sub_second_speed_up():
    ours = {"seconds": 0.3, "peak_bytes": 2**20, "scratch_bytes": 2**19}
    reference = {"seconds": 0.51, "peak_bytes": 4 * 2**20, "scratch_bytes": 2**21}
    cells = [cell.strip() for cell in kernel_benchmark.row("128", ours, reference).strip("|").split("|")]
    assert cells[1:4] == ["300", "510", "1.7×"] and cells[6] == "4.0×" and cells[9] == "4.0×"


def test_time_calls_warms_up_then_takes_the_median(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0, 30.0, 30.5])  # calls of 5 (warm-up), 1, 3 and 0.5 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    result = timing.time_calls(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4 and result == timing.Timing(first=5.0, median=1.0)
    with pytest.raises(ValueError, match="repeats"):
        timing.time_calls(lambda: None, repeats=0)


def test_assert_same_output_holds_each_output_to_its_scale():
    reference = {"value": np.float32(70.0), "grad": np.array([1e-3, -2e-3, 0.0])}
    close = {"value": np.float32(70.001), "grad": np.array([1e-3, -2e-3, 1e-8])}
    assert timing.assert_same_output("close", close, reference, rtol=1e-4) < 1e-4
    for name, wrong in [("scaled gradient", {**close, "grad": 1.01 * reference["grad"]}),
                        ("NaN", {**close, "value": np.float32(np.nan)}),
                        ("shape", {**close, "grad": reference["grad"][:2]})]:
        with pytest.raises(AssertionError, match="differs|shape"):
            timing.assert_same_output(name, wrong, reference, rtol=1e-4)
    with pytest.raises(AssertionError, match="2 outputs vs the reference's 1"):
        timing.assert_same_output("count", [1.0, 2.0], [1.0], rtol=0)


def test_probe_benchmark_compares_at_the_same_regularisation():
    ours = SimpleNamespace(grid=[0.1, 1.0, 10.0], test_accuracy_per_regularisation=np.array([0.80, 0.90, 0.85]),
                           regularisation_name="alpha", folds=np.arange(100) % 5, cv_mean=np.array([0.7, 0.8, 0.75]))
    # the fields of a probe.ProbeResult the check reads
    same = {"test_accuracy": 0.90, "regularisation": 1.0, "cv_mean": np.array([0.7, 0.8, 0.76])}
    probe_benchmark.check_same_probe("same", ours, same, n_test=200, tolerance_points=0.5)
    with pytest.raises(AssertionError, match="at alpha = 10 our probe's test accuracy 85.00"):
        probe_benchmark.check_same_probe("other", ours, {**same, "regularisation": 10.0, "test_accuracy": 0.9},
                                         n_test=200, tolerance_points=0.5)
    with pytest.raises(AssertionError, match="CV mean accuracy"):
        probe_benchmark.check_same_probe("cv", ours, {**same, "cv_mean": np.array([0.7, 0.9, 0.75])},
                                         n_test=200, tolerance_points=0.5)


def test_kernel_and_loss_head_benchmarks_check_their_outputs_on_tiny_sizes():
    quad = kernel_benchmark.compare_quad(24, repeats=1, dim=8, vocab=50)
    mean = kernel_benchmark.compare_mean(6, repeats=1, dim=8, vocab=50)
    chunks = kernel_benchmark.compare_chunks(3, repeats=1, dim=8, vocab=3000)
    assert chunks["chunk"] == 3000  # 3 rows' logits fit the budget: one chunk, against 2,048-word ones
    for result in (quad, mean, chunks):
        assert "output" not in result["ours"] and result["ours"]["seconds"] > 0 and result["reference"]["peak_bytes"]
    train_step.check_loss_heads(24, dim=8, vocab=50)


@pytest.mark.slow
def test_layer_stack_benchmark_checks_executions_and_attention_on_tiny_sizes():
    config = layer_stack_benchmark.gpt2.gpt2_config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    executions = {name: layer_stack_benchmark.EXECUTIONS[name] for name in ("scanned", "unrolled + remat dots")}
    rows = layer_stack_benchmark.layer_stack_rows(config, batch=2, seq=8, repeats=1, executions=executions)
    assert [row["name"] for row in rows] == list(executions) and all(row["step"] > 0 for row in rows)
    layer_stack_benchmark.check_attention(length=37, heads=2, head_dim=8, chunk=16)
