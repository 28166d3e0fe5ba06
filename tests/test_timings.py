"""sentcomp.results.timings: per-part wall time and XLA compilation counts, the persistent compilation cache's settings,
and the timings section of Table 1's results."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from sentcomp.results import timings


def test_parts_count_their_compilations_and_accumulate():
    double = jax.jit(lambda x: 2 * x + 1)  # a new function: its first call compiles, the second does not
    three, five = jnp.arange(3.0), jnp.arange(5.0)  # (making arrays compiles programs too: not in the parts)
    with timings.recording() as record:
        with timings.part("first"):
            double(three).block_until_ready()
        with timings.part("again"):
            double(three).block_until_ready()
        with timings.part("again"):  # same shape: no compilation; another shape: one more
            double(five).block_until_ready()
    result = record.to_json()
    parts = {entry["part"]: entry for entry in result["parts"]}
    assert list(parts) == ["first", "again"]
    assert parts["first"]["compilations"] == 1 and parts["again"]["compilations"] == 1
    assert result["total"]["compilations"] >= 2 and result["total"]["seconds"] >= parts["first"]["seconds"]
    assert len(result["load_average"]) == 3 and "float32_matmul_gflops" not in result


def test_part_outside_a_recording_does_nothing():
    with timings.part("nowhere"):
        value = 1
    assert value == 1


def test_compilation_cache_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert timings.default_cache_dir() == tmp_path / "sentcomp" / "xla"
    monkeypatch.setenv(timings.CACHE_ENV, "off")
    assert timings.enable_compilation_cache() is None
    monkeypatch.setenv(timings.CACHE_ENV, str(tmp_path / "elsewhere"))
    already = jax.config.jax_compilation_cache_dir  # the suite's own (conftest): kept, not replaced
    assert already and timings.enable_compilation_cache() == already


def test_table1_results_time_every_part(smoke_workdir):
    results = json.loads((smoke_workdir("table1") / "results.json").read_text())
    parts = {entry["part"]: entry for entry in results["timings"]["parts"]}
    assert {"load", "features rotten_tomatoes", "features rotten_tomatoes*", "probes rotten_tomatoes",
            "probes rotten_tomatoes*"} <= set(parts)
    zero_shot = [name for name in parts if name.startswith("zero-shot rotten_tomatoes*")]
    assert any(name.endswith("k=0") for name in zero_shot) and any(not name.endswith("k=0") for name in zero_shot)
    seconds = [entry["seconds"] for entry in parts.values()]
    assert np.all(np.array(seconds) >= 0) and sum(seconds) <= results["timings"]["total"]["seconds"] + 0.1
    assert results["timings"]["float32_matmul_gflops"] > 0
    assert "## Timings" in (smoke_workdir("table1") / "results.md").read_text()


def test_one_cpu_device_per_core_up_to_the_cap(monkeypatch):
    for cores, devices in [(1, 1), (2, 2), (64, timings.MAX_CPU_DEVICES)]:
        monkeypatch.setattr(timings.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert timings.cpu_device_count() == devices
