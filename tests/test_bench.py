"""lgd-fast bench (lgd_fast.bench): every candidate and pass measured, targets checked, files written."""

from __future__ import annotations

import json

import pytest
import torch

from lgd_fast import bench
from lgd_fast.cli import main


def test_run_bench_measures_every_candidate_and_pass():
    payload = bench.run_bench("lgd3d_tiny", batch=2, frames=4, size=32, num_classes=5, repeats=3,
                              candidates=("reference", "fast"), progress=False)  # fmt: skip
    assert payload["device"] == "cpu" and payload["input"] == [2, 3, 4, 32, 32]
    assert payload["machine"]["torch"] == torch.__version__ and "commit" in payload["machine"]
    for pass_ in bench.PASSES:
        rows = payload["results"][pass_]
        assert set(rows) == {"reference", "fast"}
        for row in rows.values():
            assert row["calls"] == 3 and 0 < row["min_s"] <= row["p25_s"] <= row["median_s"] <= row["p95_s"]
            assert row["clips_per_s"] == pytest.approx(2 / row["median_s"])
            assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
    metrics = {(c["pass"], c["metric"]) for c in payload["target_check"]}
    assert ("inference", "speedup_vs_reference") in metrics and ("training", "speedup_vs_reference") in metrics
    assert not any(c["target_applies_to_this_setting"] for c in payload["target_check"])  # tiny, not R50
    assert all(c["met"] is None for c in payload["target_check"])  # and so not judged
    json.dumps(payload)


def test_target_check_on_a_hand_made_result():
    rows = {
        "fast": {"median_s": 1.0, "peak_memory_bytes": 70},
        "reference": {"median_s": 3.5, "peak_memory_bytes": 100},
        "reference_compiled": {"median_s": 1.1, "peak_memory_bytes": 90},
    }
    results = {"inference": rows, "training": rows}
    checks = bench.check_targets(results, "lgd3d_r50", [4, 3, 16, 112, 112], "fp32", "cpu")
    got = {(c["pass"], c["metric"]): (round(c["measured"], 3), c["met"]) for c in checks}
    assert got == {
        ("inference", "speedup_vs_reference"): (3.5, True),
        ("inference", "speedup_vs_reference_compiled"): (1.1, False),
        ("training", "speedup_vs_reference"): (3.5, True),
        ("training", "peak_memory_vs_reference"): (0.7, True),
    }
    assert all(c["target_applies_to_this_setting"] for c in checks)


def test_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "lgd3d_tiny", "--batch", "2", "--frames", "4", "--size", "32", "--repeats", "2",
            "--no-compile", "--passes", "inference", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"inference"} and set(payload["results"]["inference"]) == {"reference", "fast"}
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "NOT met" not in printed and "not judged" in printed


def test_cli_default_output_is_a_named_folder_where_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", "lgd3d_tiny", "--batch", "1", "--frames", "4", "--size", "32", "--repeats", "1",
            "--no-compile", "--passes", "inference", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    written = sorted(p.name for p in (tmp_path / "lgd_bench").iterdir())
    assert written == ["bench_lgd3d_tiny_fp32_cpu.json", "bench_lgd3d_tiny_fp32_cpu.png"]
    assert not (tmp_path / "benchmarks").exists()
    assert "lgd_bench/bench_lgd3d_tiny_fp32_cpu.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,message",
    [({"passes": ("sideways",)}, "unknown candidates/passes"), ({"dtype": "fp8"}, "dtype must be fp32 or bf16"),
     ({"repeats": 0}, "repeats >= 1")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.run_bench("lgd3d_tiny", progress=False, **kwargs)
