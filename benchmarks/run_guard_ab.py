"""The recorded program's guard packed by the extension (``lgd_fast._C.module_state``, bytes) against the Python
function it implements (``lgd_fast.recorded.module_state``, a tuple), as a fast model runs inference: two fast models
of the same weights, the second guarded by the Python function, recorded; then their calls
(``lgd_fast.bench.pass_call``'s inference, on contiguous clips) alternate, the order flipped every round; medians.
``--control`` is the A/A run: both guarded by the extension. Also times each guard alone on the first model.

    PYTHONPATH=. python benchmarks/run_guard_ab.py --model lgd3d_tiny --batch 1 --size 32 \\
        --out benchmarks/results/guard_ab_tiny_b1_cpu.json
    PYTHONPATH=. python benchmarks/run_guard_ab.py --control ...   # A/A: both packed
"""

import contextlib
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import _C  # noqa: E402
from lgd_fast import recorded as rec  # noqa: E402
from lgd_fast.bench import pass_call  # noqa: E402
from lgd_fast.models import create_model  # noqa: E402


def main() -> None:
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=1, size=32, rounds=1000,
                            control="an A/A control: both models guarded by the extension")  # fmt: skip
    args = parser.parse_args()
    reference, clips = h.ab_reference_and_clips(args)
    models = {}
    for name in ("packed", "python"):
        models[name] = create_model(args.model, 400, classifier="two_heads", fast=True, plan="default")
        models[name].load_state_dict(reference.state_dict())
    packed_state = rec._state
    tuple_model = None if args.control else models["python"]

    def guard(module):
        return rec.module_state(module) if module is tuple_model else packed_state(module)

    rec._state = guard
    try:
        calls = {k: pass_call("inference", m, m, clips, None, contextlib.nullcontext()) for k, m in models.items()}
        for call in calls.values():
            for _ in range(4):  # plans, records (second call), runs the program
                call()
        kinds = {k: type(rec._state(m)).__name__ for k, m in models.items()}
        _, median = h.ab_medians(calls, args.rounds)
    finally:
        rec._state = packed_state
    first = models["packed"]
    guards_us = {
        "python": timeit.timeit(lambda: rec.module_state(first), number=300) / 300 * 1e6,
        "packed": timeit.timeit(lambda: _C.module_state(first), number=3000) / 3000 * 1e6,
    }
    payload = h.ab_payload("guard_ab", "run_guard_ab.py", args, median, ("packed", "python"), guard_types=kinds,
                           modules=sum(1 for _ in first.modules()),
                           tensors=sum(1 for _ in first.parameters()) + sum(1 for _ in first.buffers()),
                           guard_alone_us=guards_us)  # fmt: skip
    print(f"guards {kinds}; alone: python {guards_us['python']:.1f} us, packed {guards_us['packed']:.1f} us")
    print(f"packed {median['packed']:.3f} ms, python {median['python']:.3f} ms: "
          f"{payload['speedup_packed_vs_python']:.3f}x")  # fmt: skip
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
