"""tests/test_fast_models.py::test_tiny_matches_reference_eval_and_train over many seeds in one process.

Each seed replays exactly what ``LGD_FAST_TEST_SEED=<seed> python -m pytest tests/test_fast_models.py -k
tiny_matches`` draws (the conftest's seeding by test name), runs the four cases (two heads, two layouts) and
records every draw's ratio of the fast model's error over all fp32 gradients to the reference's, both against
float64. Flipped draws (a ReLU input within float32 rounding of zero landing on the other side in one model:
``p3d_cases.GradientDraws``) show as ratios far above 1; the rest are rounding. Written to
benchmarks/results/tiny_gradient_draws_cpu.json.

    PYTHONPATH=.:tests python benchmarks/run_tiny_gradient_draws.py --seeds 0-99
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests"), HERE]

import p3d_cases  # noqa: E402
from run_gradient_outliers import write_record  # noqa: E402

import test_fast_models  # noqa: E402
from lgd_fast.plan import forced  # noqa: E402

LAYOUTS = (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d))
CASES = [(mid, mf, clf) for clf in ("two_heads", "kernel") for mid, mf in LAYOUTS]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-99", help="first-last, inclusive")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "tiny_gradient_draws_cpu.json"))
    args = parser.parse_args(argv)
    first, last = (int(v) for v in args.seeds.split("-"))
    ratios, failures = [], []
    check = p3d_cases.GradientDraws.check

    def recording_check(self, case):
        ratios.extend(rows[0]["err"] / rows[0]["torch_err"] for rows in self.pooled)
        check(self, case)

    p3d_cases.GradientDraws.check = recording_check
    start = time.perf_counter()
    for seed in range(first, last + 1):
        for mid, memory_format, classifier in CASES:
            name = f"test_tiny_matches_reference_eval_and_train[{mid}-{classifier}]"
            gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
            torch.manual_seed((seed ^ zlib.crc32(name.encode()) ^ 0x9E3779B9) & 0xFFFFFFFF)
            try:
                with forced(training=False):  # the test module's autouse fixture
                    test_fast_models.test_tiny_matches_reference_eval_and_train(classifier, memory_format, gen)
            except AssertionError as error:
                failures.append({"seed": seed, "test": name, "error": str(error)[:500]})
                print("FAILED", seed, name, str(error)[:200], flush=True)
        print(f"seed {seed}: {len(ratios)} draws, {len(failures)} failures", flush=True)
    ordered = sorted(ratios)
    summary = {
        "draws": len(ordered), "failures": failures, "draws_over_2x": sum(r > 2 for r in ordered),
        "draws_over_10x": sum(r > 10 for r in ordered), "median_ratio": ordered[len(ordered) // 2],
        "p90_ratio": ordered[int(0.9 * len(ordered))], "max_ratio": ordered[-1],
    }  # fmt: skip
    print(summary)
    write_record(args.out, seeds=args.seeds, seconds=round(time.perf_counter() - start, 1), **summary)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
