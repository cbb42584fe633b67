"""Issue 14's end-to-end comparisons with each candidate in a process of its own (one model per process, as deployed).

``lgd-fast bench`` times every candidate in one process; what else a process holds (oneDNN's primitive and weight
caches, other compiled graphs, the heap) can move a candidate's time (run_convert.py --isolated: 0.65x-1.17x for
one model's ratio in one process). Here each candidate is built by lgd_fast.bench's own recipe (the same
trained-like weights, layouts and compile settings) in a spawned process, and the processes take turns
(benchmarks/_harness.py: time_isolated). Passes: fp32 ``inference`` at ``--batch``, ``latency`` (inference at batch
1) and the ``training`` step (forward, cross-entropy of both heads, backward, SGD with momentum: lgd-fast bench's).
Every inference candidate's logits are checked against the channels-last reference's, from their own processes.

    python benchmarks/run_isolated_bench.py                      # R50, 16x112x112: inference, latency, training
    python benchmarks/run_isolated_bench.py --passes inference --repeats 6

Writes benchmarks/results/isolated_bench_<model>_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast.bench import write_json  # noqa: E402

CANDIDATES = {
    "inference": ("reference_channels_last", "reference_compiled_freezing", "fast"),
    "latency": ("reference_channels_last", "reference_compiled_freezing", "fast"),
    "training": ("reference_channels_last", "reference_channels_last_compiled", "fast"),
}
# What issue 14's targets set the fast model against, per pass.
YARDSTICK = {"inference": "reference_compiled_freezing", "latency": "reference_compiled_freezing",
             "training": "reference_channels_last_compiled"}  # fmt: skip
NUM_CLASSES = 400


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _build(model: str, candidate: str, pass_: str, shape: tuple[int, ...]):
    """One candidate of one pass in this (spawned) process, made and called as lgd_fast.bench.run_bench does (its
    _models and pass_call), fp32."""
    from lgd_fast.bench import _models, pass_call

    module, runner, layout = _models(model, NUM_CLASSES, torch.device("cpu"), [candidate], None)[candidate]
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(shape, generator=gen).contiguous(memory_format=layout) for _ in range(2)]  # not zeros
    labels = torch.randint(0, NUM_CLASSES, (shape[0],), generator=gen)
    call = pass_call(pass_, module, runner, clips, labels, torch.autocast("cpu", enabled=False))
    if pass_ == "training":
        return call, {}
    out = call()  # clip 1's logits (in eval the two heads' combined), compared across processes, sent by value
    return call, {"logits": [t.tolist() for t in (out if isinstance(out, (tuple, list)) else (out,))]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lgd3d_r50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--passes", default="inference,latency,training", help=f"comma-separated: {list(CANDIDATES)}")
    h.add_common_arguments(parser, default_out=None, repeats=(10, 4))
    args = parser.parse_args(argv)
    passes = [p for p in args.passes.split(",") if p]
    unknown = [p for p in passes if p not in CANDIDATES]
    if unknown:
        parser.error(f"unknown passes {unknown}; choose from {', '.join(CANDIDATES)}")
    args.out = args.out or h.RESULTS_DIR / f"isolated_bench_{args.model}_cpu.json"
    setup = h.prepare_run(args)
    results = {}
    for pass_ in passes:
        batch = 1 if pass_ == "latency" else args.batch
        shape = (batch, 3, args.frames, args.size, args.size)
        builders = {c: (_build, (args.model, c, pass_, shape)) for c in CANDIDATES[pass_]}
        repeats = args.repeats if pass_ != "training" else max(2, args.repeats // 2)
        samples, infos = h.time_isolated(builders, repeats=repeats, warmup=args.warmup,
                                         steady=setup["steady_malloc"],
                                         progress=lambda what, p=pass_: print(p, what, flush=True))  # fmt: skip
        timings = {c: h.Timing.from_samples(s).to_dict() for c, s in samples.items()}
        median = {c: t["median_s"] for c, t in timings.items()}
        row = {"input": list(shape), "timings": timings,
               "fast_speedup": {c: median[c] / median["fast"] for c in median if c != "fast"},
               "yardstick": YARDSTICK[pass_]}  # fmt: skip
        if pass_ != "training":
            want = infos["reference_channels_last"]["logits"]
            row["logits_rel_error_vs_reference_channels_last"] = {
                c: max(_rel(torch.tensor(a), torch.tensor(b)) for a, b in zip(info["logits"], want, strict=True))
                for c, info in infos.items()
            }  # fmt: skip
            bad = {c: e for c, e in row["logits_rel_error_vs_reference_channels_last"].items() if e > 1e-3}
            if bad:
                raise RuntimeError(f"{pass_}: candidates' logits differ from the reference's: {bad}")
        results[pass_] = row
        print(pass_, " ".join(f"{c} {1e3 * m:.1f} ms" for c, m in median.items()),
              f"fast x{row['fast_speedup'][YARDSTICK[pass_]]:.3f} vs {YARDSTICK[pass_]}", flush=True)  # fmt: skip
    payload = {
        "benchmark": "isolated_bench",
        "command": "python benchmarks/run_isolated_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "machine": h.machine_info(),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "steady_malloc": setup["steady_malloc"],
                     "threads": torch.get_num_threads()},  # fmt: skip
        "notes": [
            "each candidate built by lgd_fast.bench's recipe (_models: trained-like weights, its layouts and "
            "compile settings) and timed in a process of its own; the processes take turns of 2 back-to-back "
            "calls, the first left out, 50 ms apart (benchmarks/_harness.py: time_isolated)",
            "fast_speedup = candidate's median / fast's median; yardstick = the candidate issue 14's target names",
        ],
        "results": results,
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
