"""The eval stem as one stem_conv_pool kernel against the stem the plan ran before it (the clip to channels-last, one
oneDNN conv with bn1 folded and ReLU fused, ATen's max-pool), measured as a fast model runs inference: two fast models
of the same weights under the deterministic default plan, the second planned while the kernel is refused (so its stem
takes the fused oneDNN conv, every other layer the same choice), both recorded; then their calls
(``lgd_fast.bench.pass_call``'s inference, as ``lgd-fast bench`` times it, on contiguous clips) alternate, the
order flipped every round; medians. ``--control`` is the A/A run: both models run the kernel (how much two instances
of one plan differ).

    PYTHONPATH=. python benchmarks/run_stem_kernel_ab.py --model lgd3d_r50 --batch 4 --size 112 --dtype bf16 \\
        --out benchmarks/results/stem_kernel_ab_r50_bf16_cpu.json
    PYTHONPATH=. python benchmarks/run_stem_kernel_ab.py --control ...   # A/A: both run the kernel
"""

import contextlib
import functools
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import plan as planning  # noqa: E402
from lgd_fast.ops.stem_conv_pool import bf16_dot_products  # noqa: E402

DTYPES = ("fp32", "bf16", "bf16-weights")  # bf16: autocast on float32 models; bf16-weights: bfloat16 models, clips


def main() -> None:
    parser = h.ab_arguments(__doc__.splitlines()[0], batch=16, size=32, rounds=60,
                            control="an A/A control: both models run the kernel")  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16-weights" else torch.float32
    reference, clips = h.ab_reference_and_clips(args, dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    refused = functools.partial(mock.patch.object, planning, "_stem_kernel_takes", lambda *a, **k: False)
    calls, models = h.ab_fast_calls(args, reference, clips, ("kernel", "onednn"), plan="default", dtype=dtype,
                                    autocast=autocast, second=refused)  # fmt: skip
    plans = {name: str(m.execution_plan).splitlines()[2] for name, m in models.items()}  # the stem's choice
    for name, line in plans.items():
        print(f"{name}: {line.strip()}")
    if not args.control and "kernel" not in plans["kernel"]:
        raise SystemExit("the default plan did not choose the stem kernel here: nothing to compare")
    with torch.inference_mode(), autocast:
        a, b = (calls[n]().float() for n in ("kernel", "onednn"))
    difference = ((a - b).norm() / b.norm()).item()
    _, median = h.ab_medians(calls, args.rounds)
    payload = h.ab_payload("stem_kernel_ab", "run_stem_kernel_ab.py", args, median, ("kernel", "onednn"),
                           options=("model", "batch", "size", "dtype", "rounds"), dtype=args.dtype,
                           bf16_dot_products=bf16_dot_products(), stem_choices=plans,
                           logits_relative_difference=difference)  # fmt: skip
    print(f"kernel {median['kernel']:.2f} ms, onednn {median['onednn']:.2f} ms: "
          f"{payload['speedup_kernel_vs_onednn']:.3f}x (logits differ by {difference:.2e})")  # fmt: skip
    h.write_ab(payload, args.out)


if __name__ == "__main__":
    main()
