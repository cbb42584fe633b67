"""Every GPU check and figure in one command, sized for a short GPU lease: `bash benchmarks/gpu_suite.sh --quick`.

On a machine with an NVIDIA GPU and a CUDA build of torch, in this order (most wanted first, so that a lease cut
short still brings back the figures that matter most):

1. ``wheels``: installs ``.whl/*.whl`` where present (the GPU machine has no network); ``build``: the package with
   its CUDA extension (``pip install -e .``, nvcc); ``doctor``: what runs there, and torch's tf32 switches.
2. ``cuda-tests``: every CUDA test (``pytest -m cuda``), a JUnit file of them.
3. ``bench-bf16``, ``bench-fp32``: LGD-3D R50 (batch 16 quick, 32 full; 16x112x112) inference and a training step,
   bf16 autocast and fp32 (tf32 as torch's switch says, recorded): the fast model against the reference in eager
   channels-last (eager AMP channels-last is what a GPU user writes) and ``torch.compile`` of it, each compiled
   once (the full suite adds the compiled fast model).
4. ``ops-p3d``: the fused Triton P3D units against eager cuDNN conv + BN + ReLU (two R50 units quick, all full).
5. ``ops-diffusion``: the diffusion epilogue (CUDA and Triton) against eager, compile and the copy bandwidth.

``--quick`` bounds the whole run to ``--budget`` seconds (default 480: 8 minutes): a step starts only while enough
time is left and is stopped at the deadline, at its own cap (CUDA tests 150 s, the bf16 bench 160 s, fp32 130 s,
the P3D units 100 s) or where the steps after it would lose the least time each needs to start (one step's compiles
cannot starve the rest); autotuning is bounded to 2 configs per kernel
(``$LGD_FAST_AUTOTUNE_CONFIGS``) and the fast model runs its default plan (``$LGD_FAST_PLAN=default``: on CUDA the
fused Triton path; measuring every block's candidates on the first call does not fit). Results go to ``--out``,
else ``$OUT`` where set (the device tool's folder),
else ``benchmarks/results/gpu_suite_<gpu name>/``: at most 7 files (``gpu_suite.log``, ``gpu_suite.json``,
``cuda_tests.xml``, ``bench_bf16.json``, ``bench_fp32.json``, ``ops_p3d_units.json``, ``ops_diffusion.json``),
and a short table is printed last.

Without a GPU the suite says so and exits 2. ``--smoke`` runs every step here on the CPU instead, on tiny shapes
and without ``torch.compile`` (the build step checks the installed extension instead of rebuilding; the CUDA tests
are collected and skip): it checks the suite's own plumbing and measures nothing.

    bash benchmarks/gpu_suite.sh --quick             # on a lent GPU: at most 8 minutes, results in $OUT
    bash benchmarks/gpu_suite.sh --quick --prebuilt  # the same, lgd_fast/_C*.so built here and carried
    python benchmarks/gpu_suite.py --quick --smoke   # here, no GPU: a minute, every step's code path

The GPU machine's copy of the tree has no ``.git``: set ``LGD_FAST_COMMIT`` to the commit it was made from, which
every result file then records (``machine.commit``, with ``commit_from``); ``gpu_prebuild.sh`` prints the line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_BUDGET_S = 480.0
AUTOTUNE_CONFIGS_QUICK = "2"
INTERRUPT_GRACE_S = 10.0  # from a step's interrupt at its timeout to its kill
STEP_SLACK_S = 2.0  # kept per later step beyond its min_s: a process's start and stop, so that it is not skipped
# --prebuilt: lgd_fast._C and lgd_fast._C_cuda already in lgd_fast/ (built elsewhere against the same torch and
# Python by benchmarks/gpu_prebuild.sh, and carried): they must have been built from this tree's extension sources
# (the stamp gpu_prebuild.sh writes beside them: SOURCES_STAMP, the digest of csrc/ and setup.py), import here, and
# the CUDA one must run a kernel (the diffusion epilogue on a small tensor, against float64), else the suite builds
# as usual: binaries of older sources would miss ops that newer Python calls, and a missing sm_90 image or a runtime
# mismatch shows at that launch, not at the import.
SOURCES_STAMP = Path("lgd_fast") / "_C.sources-sha256"


def extension_sources_digest(root: Path = ROOT) -> str:
    """sha256 of the extensions' sources: every file under csrc/ and setup.py, paths and contents, in path order."""
    digest = hashlib.sha256()
    paths = sorted(p for p in (root / "csrc").rglob("*") if p.is_file()) + [root / "setup.py"]
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


STAMP_CHECK = """
import pathlib, sys
stamp = pathlib.Path(STAMP)
got = stamp.read_text().strip() if stamp.exists() else None
if got != WANT:
    found = "is missing" if got is None else "says " + got[:12]
    sys.exit(f"the prebuilt extensions were not built from this tree's csrc/ and setup.py: {stamp} {found}, the "
             f"sources hash to {WANT[:12]} (run benchmarks/gpu_prebuild.sh again and carry its three files)")
"""


def prebuilt_check(root: Path = ROOT) -> str:
    """The --prebuilt step's Python: the stamp against ``root``'s sources (STAMP_CHECK), then PREBUILT_CHECK."""
    stamp = f"STAMP, WANT = {str(root / SOURCES_STAMP)!r}, {extension_sources_digest(root)!r}"
    return stamp + STAMP_CHECK + PREBUILT_CHECK


PREBUILT_CHECK = """
import torch
from lgd_fast import _C, _C_cuda
from lgd_fast.ops import _backend, diffusion_epilogue, diffusion_epilogue_reference
assert _backend.cuda_extension_available(), _backend.cuda_extension_error()
g = torch.Generator().manual_seed(0)
r, s = (torch.randn(2, 24, 3, 5, 7, generator=g) for _ in range(2))
d, scale, shift = torch.randn(2, 24, generator=g), torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
out, mean = diffusion_epilogue(*(t.cuda() for t in (r, s, d, scale, shift)), backend="cuda")
want, want_mean = diffusion_epilogue_reference(*(t.double() for t in (r, s, d, scale, shift)))
errors = [((a.cpu().double() - b).norm() / b.norm()).item() for a, b in ((out, want), (mean, want_mean))]
assert max(errors) < 1e-6, f"the prebuilt CUDA kernel is wrong: relative errors {errors}"
print("prebuilt extensions import and run:", _C.__file__, _C_cuda.__file__, "errors", errors)
"""
FILES = ("gpu_suite.log", "gpu_suite.json", "cuda_tests.xml", "bench_bf16.json", "bench_fp32.json",
         "ops_p3d_units.json", "ops_diffusion.json")  # fmt: skip


@dataclass
class Step:
    """One command of the suite: ``min_s`` is the least time left for it to be worth starting; ``max_s`` (with a
    budget) the most it may take. Under a budget a step also stops where the steps after it would lose their
    ``min_s`` (but it gets its own ``min_s``), so that one slow step (compiles, autotuning) cannot starve them."""

    name: str
    argv: list[str]
    min_s: float = 20.0
    max_s: float = float("inf")
    fallback: Step | None = None  # run in its place when this one does not pass (the log says why)
    result: str | None = None  # the JSON file it writes, under the output folder
    env: dict[str, str] = field(default_factory=dict)


def _bench_one(args: argparse.Namespace) -> int:
    """``--bench-one``: ``lgd_fast.bench.run_bench`` once per pass (inference, then training), the JSON rewritten
    after each (no PNG: the file count is bounded). Each pass builds its models and measures the conv peak anew."""
    from lgd_fast import bench

    if args.smoke:
        sizes = dict(model="lgd3d_tiny", batch=1, frames=4, size=32, num_classes=10, device="cpu", repeats=1)
        candidates = ["reference", "fast"]
    else:
        sizes = dict(model="lgd3d_r50", batch=16 if args.quick else 32, frames=16, size=112, num_classes=400,
                     device="cuda", repeats=5 if args.quick else 20)  # fmt: skip
        candidates = ["reference", "reference_compiled", "fast"] + ([] if args.quick else ["fast_compiled"])
    payload = None
    for pass_ in ("inference", "training"):  # one call and one write per pass: a step stopped at its cap during
        # training (compiles, autotuning) still brings back the inference figures
        part = bench.run_bench(**sizes, dtype=args.bench_one, candidates=candidates, warmup=1, channels_last=True,
                               passes=(pass_,), progress=False)  # fmt: skip
        payload = part if payload is None else _merge_passes(payload, part)
        payload["settings"]["smoke"] = args.smoke
        payload["settings"]["plan"] = os.environ.get("LGD_FAST_PLAN", "measure")  # the fast model's plan mode
        payload["settings"]["autotune_configs"] = os.environ.get("LGD_FAST_AUTOTUNE_CONFIGS", "all")
        print("wrote", bench.write_json(args.out, payload))
        rows = part["results"][pass_]
        print(f"{pass_}: " + ", ".join(f"{name} {row['median_s'] * 1e3:.2f} ms" for name, row in rows.items()))
    return 0


def _merge_passes(payload: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``part`` (one more pass of the same bench) folded into ``payload``: its results, target checks, FLOPs and conv
    floors; each pass's conv peak stays its own (``conv_peak_by_pass``: its rows' ``conv_peak_share`` and target
    checks were computed with it), ``conv_peak`` is the first's; the accuracy is the later one where both have it."""
    merged = {**payload, "results": {**payload["results"], **part["results"]}}
    merged["settings"] = {**payload["settings"], "passes": payload["settings"]["passes"] + part["settings"]["passes"]}
    merged["target_check"] = payload["target_check"] + part["target_check"]
    merged["model_gflops"] = {**payload["model_gflops"], **part["model_gflops"]}
    merged["conv_floor"] = {**payload["conv_floor"], **part["conv_floor"]}
    first = payload.get("conv_peak_by_pass") or {p: payload["conv_peak"] for p in payload["results"]}
    merged["conv_peak_by_pass"] = {**first, **{p: part["conv_peak"] for p in part["results"]}}
    merged["accuracy"] = part["accuracy"] or payload["accuracy"]
    return merged


def _steps(args: argparse.Namespace, out: Path, scratch: Path) -> list[Step]:
    py = sys.executable
    steps = []
    wheels = sorted(ROOT.glob(".whl/*.whl"))
    if wheels and not args.smoke:
        steps.append(Step("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels)]))
    if args.smoke:  # here the package is installed already; rebuilding would re-point the user's install
        steps.append(Step("build", [py, "-c", "import lgd_fast._C; print('smoke: lgd_fast._C imports (not rebuilt)')"]))
    else:
        build = Step("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                     min_s=60.0, env={"MAX_JOBS": str(os.cpu_count() or 4)})  # fmt: skip
        if args.prebuilt:  # extensions built elsewhere for this torch and Python: a lease's minute and a half saved
            steps.append(Step("prebuilt", [py, "-c", prebuilt_check()], min_s=5.0, max_s=60.0, fallback=build))
        else:
            steps.append(build)
    steps.append(Step("doctor", [py, "-m", "lgd_fast", "doctor"], min_s=5.0, max_s=60.0))
    # -v --durations: a step stopped at its max_s still leaves, in the log, which tests passed and what took long
    steps.append(Step("cuda-tests", [py, "-m", "pytest", "-m", "cuda", "-v", "--tb=short", "--durations=15", "-p",
                                     "no:cacheprovider", f"--junitxml={out / 'cuda_tests.xml'}", "tests"],
                      min_s=30.0, max_s=150.0))  # fmt: skip
    mode = ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
    for dtype in ("bf16", "fp32"):
        result = f"bench_{dtype}.json"
        argv = [py, __file__, "--bench-one", dtype, "--out", str(out / result), *mode]
        steps.append(Step(f"bench-{dtype}", argv, min_s=90.0, max_s=160.0 if dtype == "bf16" else 130.0,
                          result=result))  # fmt: skip
    device = ["--device", "cpu"] if args.smoke else []
    units = [*device, *(["--smoke", "--no-compile"] if args.smoke else ["--quick"] if args.quick else [])]
    argv = [py, str(ROOT / "benchmarks/run_p3d_gpu.py"), *units, "--out", str(out / "ops_p3d_units.json")]
    steps.append(Step("ops-p3d", argv, min_s=45.0, max_s=100.0, result="ops_p3d_units.json"))
    epilogue = ["--device", "cpu" if args.smoke else "cuda", "--no-wait", *mode]
    steps.append(Step("ops-diffusion", [py, str(ROOT / "benchmarks/run_diffusion_epilogue.py"), *epilogue, "--out",
                                        str(out / "ops_diffusion.json"), "--plot", str(scratch / "ops_diffusion.png")],
                      min_s=45.0, result="ops_diffusion.json"))  # fmt: skip
    return steps


def _run(step: Step, log, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs one step in its own process group, its output appended to ``log``; stopped at ``timeout``: first an
    interrupt (SIGINT: pytest then still writes its JUnit file and its summary of what ran), then, if it has not
    ended ``INTERRUPT_GRACE_S`` later, a kill."""
    log.write(f"\n=== {step.name}: {' '.join(step.argv)}\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env={**env, **step.env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        status = "timed out"
    seconds = time.perf_counter() - start
    log.write(f"\n=== {step.name}: {status} (exit {rc}) in {seconds:.1f} s\n")
    log.flush()
    return {"step": step.name, "status": status, "exit_code": rc, "seconds": round(seconds, 1),
            "cap_s": None if math.isinf(timeout) else round(max(timeout, 1.0), 1),  # None: no cap
            "command": step.argv}  # fmt: skip


def _log_tail(path: Path, step: str, lines: int = 25) -> str:
    """The end of a step's output in the log, with its closing status line."""
    parts = path.read_text(errors="replace").split(f"\n=== {step}: ")
    return "\n".join("\n".join(parts[-2:]).splitlines()[-lines:])


def _headlines(out: Path) -> list[str]:
    """A few lines of figures from the result files that exist."""
    lines = []
    path = out / "cuda_tests.xml"
    if path.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        lines.append("CUDA tests: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for dtype in ("bf16", "fp32"):
        path = out / f"bench_{dtype}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        tf32 = payload["machine"].get("tf32", {}).get("fp32_convs")
        label = f"{payload['model']} {'x'.join(map(str, payload['input']))} {dtype}" + (f" ({tf32})" if tf32 and
                                                                                         dtype == "fp32" else "")
        for pass_, rows in payload["results"].items():
            ref = rows["reference"]["median_s"]
            parts = [f"{name} {row['median_s'] * 1e3:.1f} ms" + ("" if name == "reference" else
                                                                  f" (x{ref / row['median_s']:.2f})")
                     for name, row in rows.items()]  # fmt: skip
            lines.append(f"{label} {pass_}: " + ", ".join(parts))
    path = out / "ops_p3d_units.json"
    if path.exists():
        for key, total in json.loads(path.read_text())["r50_totals"].items():
            lines.append(f"P3D units {key}: fast x{total['fast_vs_reference']:.2f} vs the eager unit")
    path = out / "ops_diffusion.json"
    if path.exists():
        for check in json.loads(path.read_text())["target_check"]:
            lines.append(f"diffusion epilogue {check['pass']} {check['memory_format']} {check['metric']}: "
                         f"{check['measured']:.2f} (target {check['target']})")  # fmt: skip
    return lines


def _output_folder(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    from lgd_fast.bench import device_slug

    return ROOT / "benchmarks/results" / ("gpu_suite_cpu-smoke" if args.smoke else f"gpu_suite_{device_slug('cuda')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats, bounded by --budget")
    parser.add_argument("--smoke", action="store_true", help="no GPU: every step on the CPU, tiny, nothing measured")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole suite (default {QUICK_BUDGET_S:.0f} with --quick, else none)")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else benchmarks/results/...)")
    parser.add_argument("--prebuilt", action="store_true",
                        help="use lgd_fast/_C*.so already built for this torch (built as usual if they do not import)")
    parser.add_argument("--bench-one", choices=("bf16", "fp32"), help=argparse.SUPPRESS)
    parser.add_argument("--sources-digest", action="store_true", help=argparse.SUPPRESS)  # gpu_prebuild.sh's stamp
    args = parser.parse_args(argv)
    if args.sources_digest:
        print(extension_sources_digest())
        return 0
    if args.bench_one:
        return _bench_one(args)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        print(f"gpu_suite: no GPU here ({why}; torch {torch.__version__}): nothing was run or measured. "
              "`--smoke` runs every step on the CPU on tiny shapes to check the suite itself.", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (QUICK_BUDGET_S if args.quick or args.smoke else None)
    deadline = None if budget is None else time.monotonic() + budget
    out = _output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a result from an earlier run must not pass for this one's
        (out / name).unlink(missing_ok=True)
        (out / f"{name}.tmp").unlink(missing_ok=True)  # bench.write_json's, where a step was stopped mid-write
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    if args.quick or args.smoke:
        env.setdefault("LGD_FAST_AUTOTUNE_CONFIGS", AUTOTUNE_CONFIGS_QUICK)
        # The fast model's default plan (on CUDA: the fused Triton path) rather than measuring every block's
        # candidates on its first call, which a short lease cannot afford; recorded in every result file.
        env.setdefault("LGD_FAST_PLAN", "default")
    scratch = Path(tempfile.mkdtemp(prefix="lgd_gpu_suite_"))
    log_path = out / "gpu_suite.log"
    rows = []
    started = time.time()
    from lgd_fast.bench import machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def write_summary(complete: bool) -> dict[str, Any]:
        """gpu_suite.json: rewritten after every step, so that a run cut short still says what it did."""
        from lgd_fast import doctor

        summary = {
            "benchmark": "gpu_suite",
            "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
            "measured": not args.smoke,
            "complete": complete,
            "budget_s": budget,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
            "autotune_configs": env.get("LGD_FAST_AUTOTUNE_CONFIGS", "all"),
            "plan": env.get("LGD_FAST_PLAN", "measure"),
            "machine": machine_info(device),
            "doctor": doctor.report() if complete else None,
            "steps": rows,
            "headlines": _headlines(out),
        }
        (out / "gpu_suite.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def attempt(step: Step, reserve: float, log) -> dict[str, Any] | None:
        """Runs ``step`` if its ``min_s`` is left, keeping ``reserve`` seconds for the steps after it; None if
        skipped (the row says why)."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < step.min_s:
            rows.append({"step": step.name, "status": "skipped", "exit_code": None, "seconds": 0.0, "cap_s": None,
                         "why": f"{left:.0f} s of the budget left, the step needs at least {step.min_s:.0f} s"})
            print(f"gpu_suite: {step.name:<14} skipped ({rows[-1]['why']})", flush=True)
            return None
        print(f"gpu_suite: {step.name:<14} ...", end=" ", flush=True)
        timeout = float("inf") if left is None else min(step.max_s, max(left - reserve, step.min_s))
        return _run(step, log, timeout, env)

    with open(log_path, "w") as log:
        steps = _steps(args, out, scratch)
        for i, step in enumerate(steps):
            later = steps[i + 1 :]  # their least times, and the grace a stopped step may take to end
            reserve = sum(s.min_s + STEP_SLACK_S for s in later) + (INTERRUPT_GRACE_S if later else 0.0)
            row = attempt(step, reserve, log)
            if row is not None and row["status"] != "passed" and step.fallback is not None:
                tail = _log_tail(log_path, step.name)
                print(f"{row['status']}, so {step.fallback.name} instead:\n{tail}", flush=True)
                rows.append({**row, "fell_back_to": step.fallback.name})
                step = step.fallback
                row = attempt(step, reserve, log)
            if row is None:
                write_summary(complete=False)
                continue
            if step.result and (out / step.result).exists():
                row["result"] = step.result
            rows.append(row)
            print(f"{row['status']} in {row['seconds']:.0f} s", flush=True)
            if row["status"] != "passed":
                print(_log_tail(log_path, step.name), flush=True)
            write_summary(complete=False)
    shutil.rmtree(scratch, ignore_errors=True)
    summary = write_summary(complete=True)
    print(f"\ngpu_suite ({summary['mode']}, {summary['seconds']:.0f} s): results in {out}")
    for row in rows:
        print(f"  {row['step']:<14} {row['status']:<10} {row['seconds']:>6.1f} s")
    if args.smoke:
        print("  (smoke: tiny shapes on the CPU; the times below only show that each step wrote its result)")
    for line in summary["headlines"]:
        print("  " + line)
    if args.smoke:
        print("gpu_suite: smoke mode on the CPU: every step's code ran; no GPU figure was measured")
    bad = [r["step"] for r in rows if r["status"] != "passed" and "fell_back_to" not in r]
    if bad:
        print(f"gpu_suite: not passed: {', '.join(bad)} (log: {log_path})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
