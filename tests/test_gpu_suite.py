"""The GPU suite's own plumbing, checked here without a GPU: it must work the first time a GPU is lent.

- The CUDA tests are collected on a machine without PyAV and DALI (the GPU machine has neither).
- Autotuning is bounded by ``$LGD_FAST_AUTOTUNE_CONFIGS`` in the pruning every autotuned kernel runs.
- ``benchmarks/gpu_suite.py --quick --smoke`` runs every step on the CPU and writes its few files to the folder
  asked for; without ``--smoke`` and without a GPU it says so and exits 2.
- A step that does not pass runs its fallback (``--prebuilt``'s import check falls back to the build).
- ``--prebuilt`` refuses extensions built from other sources than the tree's (``gpu_prebuild.sh``'s stamp).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the suite where there is no GPU")


@pytest.fixture
def gpu_suite(monkeypatch):
    """benchmarks/gpu_suite.py as a module, for tests that replace its steps."""
    monkeypatch.syspath_prepend(str(SUITE.parent))
    import gpu_suite

    return gpu_suite


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_cuda_tests_are_collected_without_pyav_and_dali():
    """``pytest -m cuda --collect-only`` with ``av`` and ``nvidia.dali`` unimportable: no collection error, and the
    CUDA tests are there (a module-level ``import av`` anywhere under tests/ or in lgd_fast fails this)."""
    code = (
        "import sys\n"
        "for name in ('av', 'nvidia.dali'):\n"
        "    sys.modules[name] = None  # import fails, importlib.util.find_spec gives None\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-m', 'cuda', '--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("test_fast_model_on_gpu_matches_reference" in line for line in collected), done.stdout[-2000:]
    assert "error" not in done.stdout.splitlines()[-1].lower(), done.stdout[-2000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_autotuning_is_bounded_by_the_environment(monkeypatch):
    from lgd_fast.kernels import _common, diffusion_epilogue, global_update, p3d_conv

    x = torch.ones(2, dtype=torch.bfloat16)
    every = p3d_conv._prune("x_ptr")["early_config_prune"](p3d_conv._CONFIGS, {"x_ptr": x})
    assert len(every) >= 2 and all(c.kwargs["TILES"] == "16bit" for c in every)
    monkeypatch.setenv("LGD_FAST_AUTOTUNE_CONFIGS", "1")
    assert p3d_conv._prune("x_ptr")["early_config_prune"](p3d_conv._CONFIGS, {"x_ptr": x}) == every[:1]
    for tuner in (p3d_conv._forward, p3d_conv._dgrad, p3d_conv._wgrad, global_update._global_update,
                  diffusion_epilogue._forward_cl, diffusion_epilogue._backward_rows):  # fmt: skip
        assert len(tuner.early_config_prune(tuner.configs, {"x_ptr": x, "g_ptr": x})) == 1, tuner
    monkeypatch.setenv("LGD_FAST_AUTOTUNE_CONFIGS", "0")
    with pytest.raises(ValueError, match="LGD_FAST_AUTOTUNE_CONFIGS must be a positive integer"):
        _common.bounded(every)


@needs_no_gpu
def test_the_suite_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no GPU here" in done.stderr and "--smoke" in done.stderr
    assert not list(tmp_path.iterdir())


@needs_no_gpu
def test_quick_suite_smoke_mode_runs_every_step_and_writes_few_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench_bf16.json").write_text("{}")  # an earlier run's file: must not pass for this run's
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=_env(OUT=str(out)))  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "no GPU figure was measured" in done.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files  # what the device tool brings back
    summary = json.loads((out / "gpu_suite.json").read_text())
    assert summary["mode"] == "smoke" and summary["measured"] is False and summary["complete"]
    assert summary["doctor"]["torch"] == torch.__version__
    steps = {row["step"]: row for row in summary["steps"]}
    assert list(steps) == ["build", "doctor", "cuda-tests", "bench-bf16", "bench-fp32", "ops-p3d", "ops-diffusion"]
    assert all(row["status"] == "passed" for row in steps.values()), steps
    assert summary["autotune_configs"] == "2"
    for name in ("bench_bf16.json", "bench_fp32.json", "ops_p3d_units.json", "ops_diffusion.json"):
        assert steps[next(s for s, r in steps.items() if r.get("result") == name)]["status"] == "passed"
        payload = json.loads((out / name).read_text())
        assert payload["settings"]["smoke"] is True, name
    bench = json.loads((out / "bench_bf16.json").read_text())
    assert bench["dtype"] == "bf16" and bench["settings"]["channels_last"]
    assert set(bench["results"]) == {"inference", "training"}
    assert "CUDA tests:" in summary["headlines"][0]
    log = (out / "gpu_suite.log").read_text()
    assert all(f"=== {step}: passed" in log for step in steps)


@needs_no_gpu
def test_a_step_past_the_budget_is_skipped_and_named(tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--smoke", "--budget", "8", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    skipped = [row for row in summary["steps"] if row["status"] == "skipped"]
    assert skipped and all("budget left" in row["why"] for row in skipped)
    assert "not passed" in done.stderr and skipped[0]["step"] in done.stderr


@needs_no_gpu
def test_a_step_that_fails_runs_its_fallback_and_both_are_recorded(gpu_suite, tmp_path, monkeypatch, capsys):
    """--prebuilt's check falls back to the build: the failed check stays in the summary and the log, and the
    fallback's own outcome decides the suite's exit code."""
    py = sys.executable

    def steps(args, out, scratch):
        build = gpu_suite.Step("build", [py, "-c", "print('built')"])
        return [gpu_suite.Step("prebuilt", [py, "-c", "raise SystemExit('no _C_cuda here')"], fallback=build)]

    monkeypatch.setattr(gpu_suite, "_steps", steps)
    assert gpu_suite.main(["--quick", "--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [(r["step"], r["status"]) for r in summary["steps"]] == [("prebuilt", "failed"), ("build", "passed")]
    log = (tmp_path / "gpu_suite.log").read_text()
    assert "no _C_cuda here" in log and "built" in log
    assert "no _C_cuda here" in capsys.readouterr().out  # the reason is printed, not only logged


@needs_no_gpu
def test_a_slow_step_is_stopped_where_the_next_would_lose_its_minimum(gpu_suite, tmp_path, monkeypatch):
    """Under a budget a step is stopped at its own cap, and before the steps after it lose their ``min_s`` (plus
    gpu_suite.STEP_SLACK_S each, and one INTERRUPT_GRACE_S): in a 30 s budget a sleeping step, followed by steps
    that keep 3 and 9 s, is interrupted after about 8 s, the next at its 1 s cap, and the last still runs."""
    py = sys.executable

    def steps(args, out, scratch):
        slow = gpu_suite.Step("slow", [py, "-c", "import time; time.sleep(60)"], min_s=1.0)
        capped = gpu_suite.Step("capped", [py, "-c", "import time; time.sleep(60)"], min_s=1.0, max_s=1.0)
        last = gpu_suite.Step("last", [py, "-c", "print('ran')"], min_s=7.0)
        return [slow, capped, last]

    monkeypatch.setattr(gpu_suite, "_steps", steps)
    assert gpu_suite.STEP_SLACK_S == 2.0 and gpu_suite.INTERRUPT_GRACE_S == 10.0  # the figures below assume them
    assert gpu_suite.main(["--quick", "--smoke", "--budget", "30", "--out", str(tmp_path)]) == 1
    rows = {r["step"]: r for r in json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]}
    # the caps decided (to within the suite's start-up), and each step stopped at its cap: after it, and before
    # the kill would come (how long a loaded machine takes to deliver the interrupt and reap it is not tested)
    assert rows["slow"]["status"] == "timed out" and rows["slow"]["cap_s"] == pytest.approx(8.0, abs=0.5), rows["slow"]
    assert rows["capped"]["status"] == "timed out" and rows["capped"]["cap_s"] == 1.0, rows["capped"]
    for row in (rows["slow"], rows["capped"]):
        assert row["cap_s"] <= row["seconds"] < row["cap_s"] + gpu_suite.INTERRUPT_GRACE_S, row
    assert rows["last"]["status"] == "passed"


@needs_no_gpu
def test_a_pytest_step_stopped_at_its_cap_still_writes_its_junit_file(gpu_suite, tmp_path, monkeypatch):
    """The stop is an interrupt first: pytest reports what ran (the suite's cuda_tests.xml) before it ends."""
    tests = tmp_path / "sleepy"
    tests.mkdir()
    (tests / "test_sleepy.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                          "def test_slow():\n    time.sleep(120)\n")  # fmt: skip
    xml = tmp_path / "out" / "cuda_tests.xml"
    py = sys.executable

    def steps(args, out, scratch):
        argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", str(tests)]
        return [gpu_suite.Step("cuda-tests", argv, min_s=1.0, max_s=8.0)]

    monkeypatch.setattr(gpu_suite, "_steps", steps)
    assert gpu_suite.main(["--quick", "--smoke", "--out", str(tmp_path / "out")]) == 1
    row = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["steps"][0]
    assert row["status"] == "timed out" and row["seconds"] < 8.0 + gpu_suite.INTERRUPT_GRACE_S, row
    report = xml.read_text()
    assert 'name="test_quick"' in report and "KeyboardInterrupt" in (tmp_path / "out" / "gpu_suite.log").read_text()


def test_prebuilt_check_refuses_extensions_built_from_other_sources(gpu_suite, tmp_path):
    """The --prebuilt step first compares gpu_prebuild.sh's stamp with the digest of the tree's csrc/ and setup.py:
    missing or different, it exits naming both (and the suite builds); equal, it goes on to import the extensions
    (here that import fails, with no CUDA extension: the stamp is not what stops it). The digest follows every
    source file's contents and names."""
    root = tmp_path / "tree"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "lgd_fast").mkdir()
    (root / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 1; }\n")
    (root / "setup.py").write_text("# setup\n")
    digest = gpu_suite.extension_sources_digest(root)

    def check() -> subprocess.CompletedProcess:
        code = gpu_suite.prebuilt_check(root)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT)

    missing = check()
    assert missing.returncode != 0 and "is missing" in missing.stderr and digest[:12] in missing.stderr
    stamp = root / gpu_suite.SOURCES_STAMP
    stamp.write_text("0" * 64 + "\n")
    stale = check()
    assert stale.returncode != 0 and "says 000000000000" in stale.stderr and digest[:12] in stale.stderr
    stamp.write_text(digest + "\n")
    assert "not built from this tree" not in check().stderr
    (root / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 2; }\n")
    assert gpu_suite.extension_sources_digest(root) != digest
    (root / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 1; }\n")
    (root / "csrc" / "cpu" / "kernel.cpp").rename(root / "csrc" / "cpu" / "other.cpp")
    assert gpu_suite.extension_sources_digest(root) != digest
