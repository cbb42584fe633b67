"""The fast LGD-2D against the reference at inference: eager, channels-last, torch.compile, compile + freezing.

LGD-2D R50 (TSN: 3 frames of 224x224 per video) at batch 2 and batch 16, fp32, same weights:

- ``reference``: eval on contiguous clips; ``reference_channels_last``: moved to channels_last and fed
  channels_last_3d clips (whose frames are then channels-last views: oneDNN's channels-last kernels);
- ``reference_compiled``: ``torch.compile`` of the contiguous reference; ``reference_channels_last_compiled``:
  of the channels-last one; ``reference_compiled_freezing``: the channels-last reference compiled with
  inductor's freezing (weights folded and packed as constants: the strongest inference baseline PyTorch offers,
  as in ``lgd-fast bench``);
- ``fast``: ``create_model(..., fast=True)`` with its measured plan on channels_last_3d clips, and the same
  model under ``torch.compile`` (``fast_compiled``) and compiled with freezing (``fast_compiled_freezing``): a
  user will compile it.

Outputs are checked against the reference first; timed in alternation (benchmarks/_harness.py). Writes
benchmarks/results/lgd2d_<model>_cpu.json.

    python benchmarks/run_lgd2d.py                 # lgd2d_r50, batch 2 and 16
    python benchmarks/run_lgd2d.py --quick         # batch 2 only, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as h  # noqa: E402

from lgd_fast import bench, create_model  # noqa: E402
from lgd_fast.bench import time_interleaved, write_json  # noqa: E402


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compiled(model, *, freezing: bool):
    # a backend of its own per candidate (lgd_fast.bench._compiled says why a global config patch is not enough)
    return bench._compiled(model, freezing=freezing, compile_mode=None)


def measure(model_name: str, batch: int, args) -> dict:
    torch.manual_seed(0)
    reference = create_model(model_name, 400, classifier="two_heads").eval()
    fast = create_model(model_name, 400, classifier="two_heads", fast=True, plan="measure").eval()
    fast.load_state_dict(reference.state_dict())
    reference_cl = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    shape = (batch, 3, 3, 224, 224)
    gen = torch.Generator().manual_seed(1)
    clips = [torch.randn(shape, generator=gen) for _ in range(2)]
    cl = [c.contiguous(memory_format=torch.channels_last_3d) for c in clips]
    candidates = {
        "reference": lambda i: reference(clips[i]),
        "reference_channels_last": lambda i: reference_cl(cl[i]),
        "fast": lambda i: fast(cl[i]),
    }
    if not args.no_compile:
        compiled = _compiled(copy.deepcopy(reference), freezing=False)
        compiled_cl = _compiled(copy.deepcopy(reference_cl), freezing=False)
        frozen_cl = _compiled(copy.deepcopy(reference_cl), freezing=True)
        fast_compiled = _compiled(copy.deepcopy(fast), freezing=False)
        fast_frozen = _compiled(copy.deepcopy(fast), freezing=True)
        candidates["reference_compiled"] = lambda i: compiled(clips[i])
        candidates["reference_channels_last_compiled"] = lambda i: compiled_cl(cl[i])
        candidates["reference_compiled_freezing"] = lambda i: frozen_cl(cl[i])
        candidates["fast_compiled"] = lambda i: fast_compiled(cl[i])
        candidates["fast_compiled_freezing"] = lambda i: fast_frozen(cl[i])
    with torch.inference_mode():
        want = reference(clips[0])
        errors = {name: _rel(fn(0), want) for name, fn in candidates.items() if name != "reference"}
        for name, err in errors.items():
            assert err < 1e-4, f"{name}: output differs from the reference by {err:.2e}"
        samples, _ = time_interleaved(candidates, inputs=[0, 1], warmup=args.warmup, repeats=args.repeats)
    timings = {k: h.Timing.from_samples(v).to_dict() for k, v in samples.items()}
    med = {k: t["median_s"] for k, t in timings.items()}
    speedup = {k: med[k] / med["fast"] for k in med if k != "fast"}
    print(f"{model_name} {'x'.join(map(str, shape))}:", " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()))
    print("   fast vs", " ".join(f"{k} x{v:.2f}" for k, v in speedup.items()))
    return {"input": list(shape), "output_rel_error": errors, "timings": timings, "fast_speedup": speedup,
            "plan": str(fast.execution_plan)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lgd2d_r50", choices=("lgd2d_r18", "lgd2d_r50", "lgd2d_r101"))
    h.add_common_arguments(parser, default_out=None, repeats=(8, 3))
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidates")
    args = parser.parse_args(argv)
    args.out = args.out or h.RESULTS_DIR / f"lgd2d_{args.model.removeprefix('lgd2d_')}_cpu.json"
    setup = h.prepare_run(args)
    batches = (2,) if args.quick else (2, 16)
    rows = {f"batch_{b}": measure(args.model, b, args) for b in batches}
    payload = {
        "benchmark": "lgd2d",
        "model": f"{args.model}, two_heads, eval, fp32",
        "machine": h.machine_info(),
        "settings": {"quick": args.quick, "warmup": args.warmup, "repeats": args.repeats,
                     "steady_malloc": setup["steady_malloc"]},  # fmt: skip
        "notes": [
            "reference: eval on contiguous clips; reference_channels_last: moved to channels_last, on "
            "channels_last_3d clips; reference_compiled / reference_channels_last_compiled: torch.compile (inductor, "
            "a backend of its own) of each; reference_compiled_freezing: the channels-last reference compiled with "
            "inductor's freezing; fast: create_model(fast=True, plan='measure') on channels_last_3d clips; "
            "fast_compiled / fast_compiled_freezing: that model compiled without and with freezing",
            "timings: median seconds per call over interleaved repeats; fast_speedup = other / fast",
        ],
        "results": rows,
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
