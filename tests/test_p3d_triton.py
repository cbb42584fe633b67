"""The Triton backend of p3d_conv and the fast P3D units, run by the Triton interpreter on this GPU-less machine.

The interpreter must be on before triton is imported, so the cases run in subprocesses (this file run as a
script, with TRITON_INTERPRET=1 and LGD_FAST_BACKEND=triton, which routes p3d_conv and diffusion_epilogue to
their Triton kernels; two side by side, each a share of the cases) and the test functions here check their
JSON. Shapes are small: the interpreter runs every program of every launch in Python. Fresh allocations are NaN
there (poisoned), so an element a kernel forgets to write shows as non-finite.

- p3d_conv: every conv kind at strides 1 and 2 (T = 1, 5, 7; H = W = 7, 9, 15; batch 1 and 3; odd channel
  counts), every epilogue, float32 (within 5e-6 of float64), bfloat16 and float16 (2x PyTorch's error),
  forward, statistics and every gradient; and ``torch.library.opcheck`` of the op's registration.
- fast units: bottleneck and basic blocks of each variant, eval and train: the whole block in float32 (1e-4),
  the unit in bfloat16 (the 2x rule pooled over draws, as tests/test_p3d_units.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from p3d_cases import CONV_GEOMETRIES  # shared with test_gpu_backends.py; tests/ is on the path (conftest, or script)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

CONV_CASES = [
    (*geo, epilogue, dtype, "channels_last_3d")
    for geo in CONV_GEOMETRIES
    for epilogue in ("none", "affine_residual_relu", "residual_stats", "affine_stats")
    for dtype in ("float32", "bfloat16", "float16")
    if dtype == "float32" or epilogue != "none"
] + [(*CONV_GEOMETRIES[1], "affine_relu", "float32", "contiguous")]
UNIT_CASES = [
    (unit, variant, stride, shape, planes, mode, dtype)
    for unit, variant, stride, shape, planes in [
        ("bottleneck", "A", 1, (2, 20, 3, 7, 7), 5),
        ("bottleneck", "B", 2, (1, 12, 5, 9, 9), 7),
        ("bottleneck", "C", 2, (1, 13, 1, 7, 7), 5),
        ("basic", "A", 2, (1, 7, 3, 7, 7), 9),
        ("basic", "B", 2, (1, 5, 3, 9, 9), 11),
        ("basic", "C", 1, (1, 9, 5, 7, 7), 9),
    ]
    for mode in ("eval", "train")
    for dtype in ("float32", "bfloat16")
]
UNIT_DRAWS = 8
UNIT_FP32_DRAWS = 3
UNIT_LAYOUT = "channels_last_3d"  # the kernels' layout, so PyTorch's yardstick runs in it too
SHARDS = 2  # interpreter processes (this machine's cores)


def _shard(costs: list[float], n: int) -> list[int]:
    """Which of n processes runs each case: the costliest first, each to the process with the least so far."""
    load, owner = [0.0] * n, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owner[i] = min(range(n), key=load.__getitem__)
        load[owner[i]] += costs[i]
    return owner


def _costs() -> tuple[list[float], list[float]]:
    """Each case's interpreter time, roughly: output positions times draws (a unit draw costs about as much as
    four conv cases: several convs, forward and backward)."""
    conv = [math.prod(shape[:1] + shape[2:]) / stride**2 for _, stride, shape, *_ in CONV_CASES]
    unit = [4 * math.prod(shape[:1] + shape[2:]) / stride**2 * (UNIT_FP32_DRAWS if dtype == "float32" else UNIT_DRAWS)
            for _, _, stride, shape, _, _, dtype in UNIT_CASES]  # fmt: skip
    return conv, unit


def _interpreted_checks(shard: int = 0, shards: int = 1) -> dict:
    """The results of this process's share of the cases (``_shard``); the one-off checks run in shard 0."""
    import p3d_cases

    from lgd_fast.ops.p3d_conv import _TRITON_REGISTERED
    from lgd_fast.plan import forced
    from op_testing import SEED

    assert _TRITON_REGISTERED, "the triton op did not register"
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    results: dict = {"seed": SEED, "conv": {}, "unit": {}}
    conv_costs, unit_costs = _costs()
    owner = _shard(conv_costs + unit_costs, shards)
    conv_owner, unit_owner = owner[: len(CONV_CASES)], owner[len(CONV_CASES) :]
    for i, case in enumerate(CONV_CASES):
        if conv_owner[i] != shard:
            continue
        gen = torch.Generator().manual_seed(SEED + i)
        results["conv"][p3d_cases.conv_case_id(*case)] = p3d_cases.run_conv_case(*case, backend="triton", gen=gen)
    for i, case in enumerate(UNIT_CASES):
        if unit_owner[i] != shard:
            continue
        gen = torch.Generator().manual_seed(SEED + 1000 + i)
        scope = "block" if case[-1] == "float32" else "unit"
        with forced():  # interpreted tensors live on the CPU, whose default training path is native
            draws = [
                p3d_cases.run_unit_case(*case, gen=gen, scope=scope, layout=UNIT_LAYOUT)
                for _ in range(UNIT_FP32_DRAWS if scope == "block" else UNIT_DRAWS)
            ]
        results["unit"][p3d_cases.unit_case_id(*case, UNIT_LAYOUT)] = draws
    if shard != 0:
        return results
    results["autotune"] = _autotuned_statistics(SEED)
    # The op's registration (schema, autograd, fake kernel); the AOT-dispatch part of opcheck needs real
    # kernels, which the interpreter's launches are not.
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, 6, 3, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    args = (x, torch.randn(5, 6, 1, 3, 3, generator=gen), torch.rand(5, generator=gen) + 0.5, None,
            torch.randn(1, 5, 3, 4, 4, generator=gen), 2, False, True, False)  # fmt: skip
    torch.library.opcheck(
        torch.ops.lgd_fast.p3d_conv_triton.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    results["opchecks"] = _more_opchecks(gen)
    results["direct_errors"] = _direct_call_errors(gen)
    return results


def _more_opchecks(gen: torch.Generator) -> list[str]:
    """The forward in the other layout and in bfloat16, and the backward op itself: schema and fake (sizes and
    strides against the interpreted kernels' outputs)."""
    checks = ("test_schema", "test_faketensor")
    done = []
    x = torch.randn(2, 6, 3, 7, 7, generator=gen)  # contiguous
    w = torch.randn(5, 6, 3, 1, 1, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        args = (x.to(dtype), w.to(dtype), torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen), None,
                1, True, False, False)  # fmt: skip
        torch.library.opcheck(torch.ops.lgd_fast.p3d_conv_triton.default, args, test_utils=checks)
        done.append(f"forward contiguous {dtype}")
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        xs = torch.randn(1, 6, 3, 7, 7, generator=gen).contiguous(memory_format=layout)
        ws = torch.randn(5, 6, 1, 3, 3, generator=gen)
        out, _ = torch.ops.lgd_fast.p3d_conv_triton(xs, ws, None, None, None, 2, False, True, False)
        grad = torch.randn(out.shape, generator=gen).contiguous(memory_format=layout)
        args = (grad, torch.randn(2, 5, generator=gen), out, xs, ws, torch.rand(5, generator=gen) + 0.5, 2, False,
                True, False, [True, True, True, True, True])  # fmt: skip
        torch.library.opcheck(torch.ops.lgd_fast.p3d_conv_triton_backward.default, args, test_utils=checks)
        done.append(f"backward {layout}")
    return done


def _direct_call_errors(gen: torch.Generator) -> dict[str, str]:
    """Each Triton op called directly (as torch.compile's graphs and users may) with inputs that do not fit: the
    message it raises, or "no error" (its kernels would index past a tensor on a GPU)."""
    global_update = importlib.import_module("lgd_fast.ops.global_update")  # (the package's name is the function)
    assert global_update._TRITON_REGISTERED, "the global update's triton op did not register"
    x = torch.randn(1, 6, 3, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(5, 6, 1, 3, 3, generator=gen)
    out, _ = torch.ops.lgd_fast.p3d_conv_triton(x, w, None, None, None, 1, False, False, False)
    m = torch.randn(2, 8, generator=gen)
    fc = [torch.randn(*shape, generator=gen) for shape in [(4, 8), (4,), (6, 4), (6,), (4, 8), (4,), (6, 4), (6,),
                                                             (4, 6), (4,), (6, 4), (6,)]]  # fmt: skip
    calls = {
        "conv input channels": lambda: torch.ops.lgd_fast.p3d_conv_triton(x, w[:, :4], None, None, None, 1, False,
                                                                           False, False),  # fmt: skip
        "conv residual": lambda: torch.ops.lgd_fast.p3d_conv_triton(x, w, None, None, out[:, :, :2], 1, False,
                                                                    False, False),  # fmt: skip
        "conv scale": lambda: torch.ops.lgd_fast.p3d_conv_triton(x, w, torch.ones(4), None, None, 1, False, False,
                                                                 False),  # fmt: skip
        "backward grad_out": lambda: torch.ops.lgd_fast.p3d_conv_triton_backward(
            out[:, :, :, :5], out.new_zeros(2, 0), out, x, w, None, 1, False, False, False, [True] * 5),
        "backward grad_stats": lambda: torch.ops.lgd_fast.p3d_conv_triton_backward(
            out, out.new_zeros(2, 3), out, x, w, None, 1, False, True, False, [True] * 5),
        "global update weight": lambda: torch.ops.lgd_fast.global_update_triton(m, m, *fc[:2], fc[2][:, :3], *fc[3:]),
        "global update g": lambda: torch.ops.lgd_fast.global_update_triton(m, m[:1], *fc),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = "no error"
        except (ValueError, TypeError) as exc:
            errors[name] = str(exc)
    return errors


def _autotuned_statistics(seed: int) -> dict:
    """Training statistics on the first call through Triton's own Autotuner over two configs (BLOCK_M 16, then
    64, which wins), the conv output shifted by 300 (some 45 standard deviations): every config benchmarked writes the
    per-tile partials; the winner must not add the loser's leftovers. Relative errors against float64."""
    import triton

    from lgd_fast.kernels import p3d_conv as kernels
    from lgd_fast.ops.p3d_conv import p3d_conv_reference

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32, "BLOCK_K": 16, "TILES": "fp32"}, num_warps=1,
                             num_stages=1) for m in (16, 64)]  # fmt: skip
    times = iter([2.0, 1.0])  # the interpreter has no GPU timer: the second config is made the faster

    def bench(fn, quantiles):
        fn()
        t = next(times)
        return [t] * len(quantiles)

    real = kernels._forward
    kernels._forward = triton.autotune(configs=configs, key=kernels._KEY, reset_to_zero=["part_ptr"],
                                       do_bench=bench)(kernels._forward_kernel)  # fmt: skip
    try:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 5, 3, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(6, 5, 1, 3, 3, generator=gen)
        shift = torch.full((6,), 300.0)
        _, want = p3d_conv_reference(x.double(), w.double(), shift=shift.double(), stats=True)
        errors = []
        for _ in range(2):  # the first call benchmarks both configs, the second runs the cached winner
            _, stats = kernels.forward(x, w, None, shift, None, 1, False, True)
            errors.append([((stats[i].double() - want[i]).norm() / want[i].norm()).item() for i in range(2)])
        return {"block_m": kernels._forward.best_config.kwargs["BLOCK_M"], "errors": errors}
    finally:
        kernels._forward = real


@pytest.fixture(scope="module")
def interpreted():
    """The interpreter run's results, from SHARDS processes side by side (the interpreter is single-threaded
    Python; each case draws from its own seed, so the split changes no result)."""
    from op_testing import SEED

    env = {**os.environ, "TRITON_INTERPRET": "1", "LGD_FAST_BACKEND": "triton"}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, HERE]), LGD_FAST_TEST_SEED=str(SEED))
    runs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), str(k), str(SHARDS)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for k in range(SHARDS)
    ]
    deadline = time.monotonic() + 900  # for both together
    try:
        outputs = [run.communicate(timeout=max(deadline - time.monotonic(), 1)) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()
    results: dict = {}
    for k, (run, (out, err)) in enumerate(zip(runs, outputs, strict=True)):
        assert run.returncode == 0, f"interpreter run {k} of {SHARDS} failed:\n{out[-3000:]}\n{err[-6000:]}"
        for key, value in json.loads(out.strip().splitlines()[-1]).items():
            if isinstance(value, dict) and key in results:
                assert not set(value) & set(results[key]), f"shards overlap in {key}"
                results[key].update(value)
            else:
                assert key not in results or results[key] == value, f"shards disagree on {key}"
                results[key] = value
    assert len(results["conv"]) == len(CONV_CASES) and len(results["unit"]) == len(UNIT_CASES)
    return results


def _conv_id(case):
    import p3d_cases

    return p3d_cases.conv_case_id(*case)


def _unit_id(case):
    import p3d_cases

    return p3d_cases.unit_case_id(*case, UNIT_LAYOUT)


@pytest.mark.parametrize("case", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_triton_p3d_conv_matches_reference(interpreted, case):
    from p3d_cases import check_rows

    rows = interpreted["conv"][_conv_id(case)]
    names = {r["name"] for r in rows}
    assert {"out", "grad_x", "grad_weight"} <= names and ("stats" in names) == case[4].endswith("stats")
    check_rows(rows, case[5], f"{_conv_id(case)} (seed {interpreted['seed']})", fp32_tol=5e-6)


@pytest.mark.parametrize("case", UNIT_CASES, ids=[_unit_id(c) for c in UNIT_CASES])
def test_triton_fast_unit_matches_reference(interpreted, case):
    from p3d_cases import check_fp32_draws, check_pooled_ratio

    draws = interpreted["unit"][_unit_id(case)]
    label = f"{_unit_id(case)} (seed {interpreted['seed']})"
    if case[-1] == "float32":  # (first: a run whose ReLUs differ from the reference's is named there)
        check_fp32_draws(draws, label, tol=1e-4)
    else:
        check_pooled_ratio(draws, label, set_aside=0)
    assert {"out", "grad_x", "grad_conv1.weight"} <= {r["name"] for r in draws[0]}


def test_first_training_call_through_the_autotuner_has_exact_statistics(interpreted):
    result = interpreted["autotune"]
    assert result["block_m"] == 64  # the larger tile won: the smaller one's partials are in the buffer
    for call, (sum_err, m2_err) in enumerate(result["errors"]):
        assert sum_err < 1e-6 and m2_err < 1e-5, f"call {call + 1}: statistics off by {sum_err:.2e}, {m2_err:.2e}"


def test_triton_ops_called_directly_check_their_inputs(interpreted):
    """The Triton ops are public (torch.ops.lgd_fast.*): inputs that do not fit raise a message naming them,
    before a kernel would index past a tensor on the GPU; the backward op and the forward's other layouts and
    dtypes pass torch.library.opcheck (schema, fake sizes and strides)."""
    errors = interpreted["direct_errors"]
    expected = {
        "conv input channels": "weight takes 4 input channels but x has 6",
        "conv residual": "residual must have the output's shape (1, 5, 3, 7, 7), got (1, 5, 2, 7, 7)",
        "conv scale": "scale must have shape (C_out,) = (5,), got (4,)",
        "backward grad_out": "backward: grad_out must have the output's shape (1, 5, 3, 7, 7), got (1, 5, 3, 5, 7)",
        "backward grad_stats": "backward: grad_stats must be (2, C_out) = (2, 5), got (2, 3)",
        "global update weight": "fc2 weight must have shape (6, 4) and bias (6,), got (6, 3) and (6,)",
        "global update g": "g must have m's shape (2, 8), got (1, 8)",
    }
    assert set(errors) == set(expected)
    for name, message in expected.items():
        assert message in errors[name], f"{name}: {errors[name]}"
    assert len(interpreted["opchecks"]) == 4


if __name__ == "__main__":  # the interpreter run: TRITON_INTERPRET=1 is set by the fixture above
    assert os.environ.get("TRITON_INTERPRET") == "1"
    shard, shards = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 1)
    torch.set_num_threads(1)  # the shards run side by side, one core each
    print(json.dumps(_interpreted_checks(shard, shards)))
