"""The stem's clip conversion by lgd_fast.ops.to_channels_last_3d against ATen's (``x.contiguous(memory_format=
channels_last_3d)``), measured as a fast model runs inference: two fast models of the same weights and the same plan
(the second takes the first's measured choices from the plan's cache), the second made to convert with ATen's copy
while it records its program, then their calls (``lgd_fast.bench.pass_call``'s inference, as ``lgd-fast bench``
times it, on contiguous clips) alternating, order flipped every round; medians.

    PYTHONPATH=. python benchmarks/run_to_channels_last_ab.py --model lgd3d_tiny --batch 16 --size 32 \\
        --out benchmarks/results/to_channels_last_ab_tiny_cpu.json
    PYTHONPATH=. python benchmarks/run_to_channels_last_ab.py --control ...   # A/A: both convert with the op
"""

import functools
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import plan as planning  # noqa: E402
from lgd_fast.bench import git_commit, machine_info  # noqa: E402
from lgd_fast.ops import to_channels_last_3d_reference  # noqa: E402


def main() -> None:
    control = "an A/A control: both models convert with the op (how much two instances differ)"
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=16, size=32, rounds=200, control=control)
    args = parser.parse_args()
    reference, clips = h.ab_reference_and_clips(args)
    aten = functools.partial(mock.patch.object, planning, "to_channels_last_3d",
                             lambda x, backend=None: to_channels_last_3d_reference(x))  # fmt: skip
    calls, _ = h.ab_fast_calls(args, reference, clips, ("op", "aten"), plan="measure", second=aten)
    times, median = h.ab_medians(calls, args.rounds)
    payload = {
        "benchmark": "to_channels_last_ab",
        "model": args.model,
        "input": [args.batch, 3, 16, args.size, args.size],
        "rounds": args.rounds,
        "control": args.control,  # (then "aten" names the second model, which converts with the op too)
        "machine": machine_info(torch.device("cpu")),
        "git": git_commit(),
        "median_ms": median,
        "speedup_op_over_aten": median["aten"] / median["op"],
        "samples_s": times,
    }
    second = "the second model, also by the op (A/A control)" if args.control else "by ATen"
    print(f"{args.model} inference, batch {args.batch}: clip converted by the op {median['op']:.3f} ms, {second} "
          f"{median['aten']:.3f} ms ({payload['speedup_op_over_aten']:.3f}x)")  # fmt: skip
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
