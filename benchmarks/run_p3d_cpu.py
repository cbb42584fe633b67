"""P3D convolutions of LGD-3D R50 on the CPU: which way of computing them is fastest, measured.

At the R50 shapes (batch 4, 16x112x112 clips, early temporal stride 4: res2..res5 maps of T=4 and
28/14/7/4 pixels, read from the model with forward hooks), side by side in one run (method:
benchmarks/_harness.py):

- per conv kind (spatial 1x3x3 stride 1/2, temporal 3x1x1 stride 1 and variant B's spatial stride 2),
  forward (eval, inference_mode) and forward+backward (input and weight gradients): ``nn.Conv3d``
  contiguous (reference), channels_last_3d, ``F.conv2d`` over the N*T frames (contiguous frames, which
  costs a layout copy in a 3-D network and is given here without it, and channels_last frames, a free view
  of channels_last_3d), the temporal conv as a (3, 1) ``F.conv2d`` over (T, H*W) (contiguous and
  channels_last, both free views) or as one matmul over the 3 time-shifted copies;
- per P3D unit (the body up to bn3 of every distinct R50 bottleneck: variant A/B/C, stride, stage), eval and
  training forward+backward: the reference, ``torch.compile`` of it, and the fast unit
  (``lgd_fast.models.p3d.bottleneck_body``: p3d_conv with fused epilogues), each on contiguous and on
  channels_last_3d input;
- end to end: LGD-3D R50 inference (reference eager, reference compiled, fast) and a training step
  (reference, fast), batch 4, fp32.

Writes benchmarks/results/p3d_cpu.{json,png} and prints the winner of every case.

    python benchmarks/run_p3d_cpu.py            # full run, about 15 minutes on 2 cores
    python benchmarks/run_p3d_cpu.py --quick    # stride-1 units of res2 and res4, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from lgd_fast import create_model  # noqa: E402
from lgd_fast.bench import time_interleaved, write_json  # noqa: E402
from lgd_fast.models.blocks import P3DBottleneck  # noqa: E402
from lgd_fast.models.p3d import bottleneck_body, to_fast_unit  # noqa: E402

CL3D = torch.channels_last_3d
BATCH, FRAMES, SIZE = 4, 16, 112
PASSES = ("forward", "forward+backward")


# ---- shapes from the model --------------------------------------------------------------------------


def r50_units() -> list[dict[str, Any]]:
    """Every distinct bottleneck of LGD-3D R50 at batch 4 x 16x112x112: its config, input shape and count."""
    model = create_model("lgd3d_r50", 400).eval()
    seen: dict[tuple, dict[str, Any]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, P3DBottleneck):

            def hook(mod, inputs, _out, name=name):
                shape = (BATCH, *inputs[0].shape[1:])
                key = (mod.variant, mod.stride, shape, mod.conv1.out_channels)
                if key in seen:
                    seen[key]["count"] += 1
                    seen[key]["blocks"].append(name)
                else:
                    stage = int(name.split(".")[0][len("layer") :]) + 1
                    seen[key] = {
                        "name": f"res{stage} {mod.variant} s{mod.stride}",
                        "variant": mod.variant,
                        "stride": mod.stride,
                        "in_shape": list(shape),
                        "planes": mod.conv1.out_channels,
                        "count": 1,
                        "blocks": [name],
                    }

            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.randn(1, 3, FRAMES, SIZE, SIZE))
    for handle in hooks:
        handle.remove()
    return list(seen.values())


def conv_cases(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The P3D convs of those units: (kind, stride, input shape), one each."""
    cases: dict[tuple, dict[str, Any]] = {}
    for u in units:
        n, _, t, hh, ww = u["in_shape"]
        p, s = u["planes"], u["stride"]
        mid = [n, p, t, hh, ww]  # conv2's input (after conv1)
        cases[("spatial", s, tuple(mid))] = {"kind": "spatial", "stride": s, "shape": mid}
        t_stride = s if u["variant"] == "B" else 1
        t_in = mid if u["variant"] == "B" else [n, p, t, (hh - 1) // s + 1, (ww - 1) // s + 1]
        cases[("temporal", t_stride, tuple(t_in))] = {"kind": "temporal", "stride": t_stride, "shape": t_in}
        out_hw = [(hh - 1) // s + 1, (ww - 1) // s + 1]
        cases[("pointwise", 1, tuple(u["in_shape"]), p)] = {
            "kind": "pointwise",
            "stride": 1,
            "shape": u["in_shape"],
            "out_channels": p,
        }
        cases[("pointwise", 1, (n, p, t, *out_hw), 4 * p)] = {
            "kind": "pointwise",
            "stride": 1,
            "shape": [n, p, t, *out_hw],
            "out_channels": 4 * p,
        }
    out = list(cases.values())
    for c in out:
        c["name"] = f"{c['kind']} s{c['stride']} {'x'.join(map(str, c['shape'][1:]))}"
        if c["kind"] == "pointwise":
            c["name"] = f"pointwise {'x'.join(map(str, c['shape'][1:]))}->{c['out_channels']}"
    return out


# ---- conv candidates --------------------------------------------------------------------------------


def _frames(x):
    n, c, t, hh, ww = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * t, c, hh, ww)


def conv_candidates(kind: str, stride: int, weight: torch.Tensor) -> dict[str, Callable]:
    """name -> fn(input dict) -> output, for one conv. Inputs: 'x' contiguous, 'x_cl' channels_last_3d,
    'frames' (N*T, C, H, W) contiguous."""
    if kind == "pointwise":
        w2, w_rows = weight.squeeze(2), weight.reshape(weight.shape[0], -1)

        def rows(x):
            return F.linear(x.permute(0, 2, 3, 4, 1), w_rows).permute(0, 4, 1, 2, 3)

        return {
            "reference": lambda i: F.conv3d(i["x"], weight),
            "conv3d_cl3d": lambda i: F.conv3d(i["x_cl"], weight),
            "conv2d_frames_cl": lambda i: F.conv2d(_frames(i["x_cl"]), w2),
            "linear_rows_cl": lambda i: rows(i["x_cl"]),
        }
    if kind == "spatial":
        w2 = weight.squeeze(2)
        conv = dict(stride=(1, stride, stride), padding=(0, 1, 1))
        return {
            "reference": lambda i: F.conv3d(i["x"], weight, **conv),
            "conv3d_cl3d": lambda i: F.conv3d(i["x_cl"], weight, **conv),
            "conv2d_frames": lambda i: F.conv2d(i["frames"], w2, stride=stride, padding=1),
            "conv2d_frames_cl": lambda i: F.conv2d(_frames(i["x_cl"]), w2, stride=stride, padding=1),
        }
    conv = dict(stride=(1, stride, stride), padding=(1, 0, 0))
    wt = weight.squeeze(-1)
    wcat = weight.reshape(weight.shape[0], weight.shape[1], 3).permute(0, 2, 1).reshape(weight.shape[0], -1)

    def plane(x):
        if stride != 1:
            x = x[:, :, :, ::stride, ::stride]
        n, c, t, hh, ww = x.shape
        return x.reshape(n, c, t, hh * ww)

    def plane_cl(x):
        if stride != 1:
            x = x[:, :, :, ::stride, ::stride].contiguous(memory_format=CL3D)
        n, c, t, hh, ww = x.shape
        return x.reshape(n, c, t, hh * ww)

    def shifted_matmul(x):  # out[t] = [x[t-1], x[t], x[t+1]] @ W, one GEMM over the 3 shifted copies
        if stride != 1:
            x = x[:, :, :, ::stride, ::stride]
        rows = x.permute(0, 2, 3, 4, 1)  # (N, T, H, W, C), a view in channels_last_3d
        padded = F.pad(rows, (0, 0, 0, 0, 0, 0, 1, 1))
        t = rows.shape[1]
        cat = torch.cat([padded[:, k : k + t] for k in range(3)], dim=-1)
        return F.linear(cat, wcat).permute(0, 4, 1, 2, 3)

    return {
        "reference": lambda i: F.conv3d(i["x"], weight, **conv),
        "conv3d_cl3d": lambda i: F.conv3d(i["x_cl"], weight, **conv),
        "conv2d_plane": lambda i: F.conv2d(plane(i["x"]), wt, padding=(1, 0)),
        "conv2d_plane_cl": lambda i: F.conv2d(plane_cl(i["x_cl"]), wt, padding=(1, 0)),
        "shifted_matmul_cl": lambda i: shifted_matmul(i["x_cl"]),
    }


def conv_inputs(shape, count: int, grad: bool) -> list[dict[str, torch.Tensor]]:
    sets = []
    for _ in range(count):
        x = torch.randn(shape) + 0.5
        d = {"x": x, "x_cl": x.contiguous(memory_format=CL3D), "frames": _frames(x.contiguous(memory_format=CL3D))}
        d["frames"] = d["frames"].contiguous()
        if grad:
            d = {k: v.requires_grad_(True) for k, v in d.items()}
        sets.append(d)
    return sets


def _flops_conv(kind: str, shape, stride: int) -> float:
    n, c, t, hh, ww = shape
    ho, wo = (hh - 1) // stride + 1, (ww - 1) // stride + 1
    taps = {"spatial": 9, "temporal": 3, "pointwise": 1}[kind]
    return 2.0 * n * t * ho * wo * c * c * taps


def bench_convs(args, cases) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        shape, kind, stride = case["shape"], case["kind"], case["stride"]
        c = shape[1]
        c_out = case.get("out_channels", c)
        ksize = {"spatial": (1, 3, 3), "temporal": (3, 1, 1), "pointwise": (1, 1, 1)}[kind]
        weight = torch.randn(c_out, c, *ksize) / (c * 3) ** 0.5
        for pass_ in PASSES:
            grad = pass_ != "forward"
            w = weight.clone().requires_grad_(grad)
            fns = conv_candidates(kind, stride, w)
            inputs = conv_inputs(shape, 3, grad)
            key = {"reference": "x", "conv3d_cl3d": "x_cl", "conv2d_frames": "frames"}
            if grad:
                out0 = fns["reference"](inputs[0])
                upstream = torch.randn(out0.shape)

                def with_backward(name, fn, key=key, upstream=upstream, w=w):
                    src = key.get(name, "x_cl" if name.endswith("_cl") else "x")

                    def run(i, upstream=upstream, w=w):
                        out = fn(i)
                        if out.dim() == 5:
                            up = upstream
                        elif name.startswith("conv2d_plane"):
                            up = upstream.reshape(out.shape)
                        else:
                            up = _frames(upstream.contiguous(memory_format=CL3D))
                        return torch.autograd.grad(out, (i[src], w), up)

                    return run

                cands = {n: with_backward(n, f) for n, f in fns.items()}
                timings = _time(args, cands, inputs, no_grad=False)
            else:
                timings = _time(args, fns, inputs, no_grad=True)
            flops = _flops_conv(kind, shape, stride) * c_out / c * (1 if not grad else 3)
            rows.append(
                _row(
                    case["name"],
                    {"kind": kind, "stride": stride, "shape": shape, "out_channels": c_out},
                    pass_,
                    timings,
                    flops=flops,
                )
            )
    return rows


# ---- unit candidates --------------------------------------------------------------------------------


def _randomise(block: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return block


def unit_candidates(block: P3DBottleneck, pass_: str, *, compile_: bool) -> dict[str, Callable]:
    """The unit's body up to bn3 (``residual_body``), each way; input key 'x' contiguous, 'x_cl' channels_last_3d."""
    torch._dynamo.reset()
    block = copy.deepcopy(block).train(pass_ != "forward")
    fast = to_fast_unit(copy.deepcopy(block), plan="default")  # the plan's deterministic default
    fns: dict[str, tuple[Callable, str]] = {
        "reference": (block.residual_body, "x"),
        "reference_cl3d": (block.residual_body, "x_cl"),
        "fast": (fast.residual_body, "x"),
        "fast_cl3d": (fast.residual_body, "x_cl"),
    }
    if compile_:
        fns["compiled"] = (torch.compile(block.residual_body, backend="inductor", dynamic=False), "x")
        fns["compiled_cl3d"] = (fns["compiled"][0], "x_cl")
    used = {n for n, p in block.named_parameters() if not n.startswith(("fc", "bn3", "downsample"))}
    params = [p for n, p in block.named_parameters() if n in used]
    fast_params = [p for n, p in fast.named_parameters() if n in used]
    if pass_ == "forward":
        return {name: (lambda i, fn=fn, src=src: fn(i[src])) for name, (fn, src) in fns.items()}

    def fused(x):  # the fused training path (statistics from the conv epilogues), which the CPU default skips
        return bottleneck_body(fast, x)[0]

    fns["fast_fused_training"] = (fused, "x")
    fns["fast_fused_training_cl3d"] = (fused, "x_cl")

    def with_backward(name, fn, src):
        ps = fast_params if name.startswith("fast") else params

        def run(i):
            out = fn(i[src])
            return torch.autograd.grad(out, (i[src], *ps), i["up"])

        return run

    return {name: with_backward(name, fn, src) for name, (fn, src) in fns.items()}


def _flops_unit(u) -> float:
    n, cin, t, hh, ww = u["in_shape"]
    p, s = u["planes"], u["stride"]
    ho, wo = (hh - 1) // s + 1, (ww - 1) // s + 1
    flops = 2.0 * n * t * hh * ww * cin * p  # conv1
    flops += 2.0 * n * t * ho * wo * p * p * 9  # conv2
    flops += 2.0 * n * t * ho * wo * p * p * 3  # conv2_t
    flops += 2.0 * n * t * ho * wo * p * 4 * p  # conv3
    return flops


def bench_units(args, units) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for u in units:
        block = _randomise(P3DBottleneck(u["in_shape"][1], u["planes"], variant=u["variant"], stride=u["stride"]), gen)
        for pass_ in PASSES:
            grad = pass_ != "forward"
            out_shape = [BATCH, 4 * u["planes"], u["in_shape"][2]] + [
                (d - 1) // u["stride"] + 1 for d in u["in_shape"][3:]
            ]
            inputs = []
            for _ in range(3):
                x = torch.randn(u["in_shape"]) + 0.5
                d = {"x": x, "x_cl": x.contiguous(memory_format=CL3D), "up": torch.randn(out_shape)}
                if grad:
                    d["x"].requires_grad_(True)
                    d["x_cl"].requires_grad_(True)
                inputs.append(d)
            cands = unit_candidates(block, pass_, compile_=not args.no_compile)
            timings = _time(args, cands, inputs, no_grad=not grad)
            rows.append(
                _row(
                    u["name"],
                    {k: u[k] for k in ("variant", "stride", "in_shape", "planes", "count", "blocks")},
                    pass_,
                    timings,
                    flops=_flops_unit(u) * (1 if not grad else 3),
                )
            )
    return rows


# ---- end to end -------------------------------------------------------------------------------------


def bench_end_to_end(args) -> list[dict[str, Any]]:
    """LGD-3D R50, batch 4 x 16x112x112, fp32: inference (eval, inference_mode) for the reference eager, the
    reference under torch.compile and the fast model; a training step (forward, backward, SGD) for the reference
    and the fast model (the compiled training step is lgd-fast bench's, issue 7)."""
    rows = []
    torch._dynamo.reset()
    ref = create_model("lgd3d_r50", 400, classifier="two_heads").eval()
    fast = create_model("lgd3d_r50", 400, classifier="two_heads", fast=True).eval()
    fast.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(BATCH, 3, FRAMES, SIZE, SIZE, generator=gen) for _ in range(2)]
    cands = {"reference": ref, "fast": fast}
    if not args.no_compile:
        cands["compiled"] = torch.compile(ref, backend="inductor", dynamic=False)
    with torch.inference_mode():
        for fn in cands.values():
            fn(inputs[0])
        with h.ForeignLoad() as load:
            samples, _ = time_interleaved(cands, inputs=inputs, warmup=1, repeats=args.e2e_repeats)
    rows.append(_e2e_row("inference (eval, inference_mode)", samples, load.cores))

    def step(model, opt):
        def run(x):
            opt.zero_grad(set_to_none=True)
            local, global_ = model(x)
            (local.logsumexp(1).mean() + global_.logsumexp(1).mean()).backward()
            opt.step()

        return run

    models = {"reference": ref.train(), "fast": fast.train()}
    steps = {k: step(m, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)) for k, m in models.items()}
    for fn in steps.values():
        fn(inputs[0])
    with h.ForeignLoad() as load:
        samples, _ = time_interleaved(steps, inputs=inputs, warmup=0, repeats=args.e2e_repeats)
    rows.append(_e2e_row("training step (forward, backward, SGD)", samples, load.cores))
    return rows


def _e2e_row(pass_: str, samples, load) -> dict[str, Any]:
    timings = {k: h.Timing.from_samples(v) for k, v in samples.items()}
    med = {k: t.median_s for k, t in timings.items()}
    row = {
        "pass": pass_,
        "shape": [BATCH, 3, FRAMES, SIZE, SIZE],
        "timings": {k: t.to_dict() for k, t in timings.items()},
        "clips_per_s": {k: BATCH / v for k, v in med.items()},
        "speedup_fast_vs_reference": med["reference"] / med["fast"],
        "foreign_load_cores": load,
    }
    if "compiled" in med:
        row["speedup_fast_vs_compiled"] = med["compiled"] / med["fast"]
    print(f"end to end R50, {pass_}: " + " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()))
    return row


# ---- shared -----------------------------------------------------------------------------------------


def _time(args, cands, inputs, *, no_grad: bool):
    ctx = torch.inference_mode() if no_grad else torch.enable_grad()
    with ctx:
        for fn in cands.values():  # compile first, then let the machine settle
            fn(inputs[0])
        if not args.no_wait:
            h.wait_until_quiet(max_wait_s=10.0, window_s=0.3)
        with h.ForeignLoad() as load:
            samples, _ = time_interleaved(cands, inputs=inputs, warmup=args.warmup, repeats=args.repeats)
    timings = {k: h.Timing.from_samples(v) for k, v in samples.items()}
    timings["_load"] = load.cores
    return timings


def _row(name, config, pass_, timings, *, flops: float) -> dict[str, Any]:
    load = timings.pop("_load")
    med = {k: t.median_s for k, t in timings.items()}
    winner = min(med, key=med.get)
    row = {
        "name": name,
        **config,
        "pass": pass_,
        "flops": flops,
        "timings": {k: t.to_dict() for k, t in timings.items()},
        "speedup_vs_reference": {k: med["reference"] / v for k, v in med.items()},
        "winner": winner,
        "winner_vs_reference": med["reference"] / med[winner],
        "gflops_per_s": {k: flops / v / 1e9 for k, v in med.items()},
        "foreign_load_cores": load,
    }
    if "compiled" in med:
        row["speedup_vs_compiled"] = {k: med["compiled"] / v for k, v in med.items()}
    extra = f", x{row['speedup_vs_compiled'][winner]:.2f} vs compiled" if "compiled" in med else ""
    print(
        f"{name:28s} {pass_:16s} "
        + " ".join(f"{k} {v * 1e3:7.2f}" for k, v in med.items())
        + f" ms | winner {winner} x{row['winner_vs_reference']:.2f} vs reference{extra}"
        + (f" (others' load {load:.2f} cores)" if load is not None else "")
    )
    return row


def r50_totals(unit_rows) -> dict[str, Any]:
    """Sum over all 16 R50 bottlenecks (each distinct unit times its count) of every candidate's median."""
    totals: dict[str, dict[str, float]] = {}
    for row in unit_rows:
        for k, t in row["timings"].items():
            totals.setdefault(row["pass"], {}).setdefault(k, 0.0)
            totals[row["pass"]][k] += t["median_s"] * row["count"]
    return {
        p: {"seconds": v, "speedup_vs_reference": {k: v["reference"] / s for k, s in v.items()}}
        for p, v in totals.items()
    }


def plot(payload: dict[str, Any], path: Path) -> Path:
    rows_c, rows_u = payload["conv_results"], payload["unit_results"]
    fig, (ax_c, ax_u) = h.new_figure(1, 2, figsize=(16, 0.28 * max(4 * len(rows_c), 4 * len(rows_u)) / 2 + 3))

    def panel(ax, rows, names, title):
        labels = [f"{r['name']} {'fwd' if r['pass'] == 'forward' else 'fwd+bwd'}" for r in rows]
        series = {n: [r["speedup_vs_reference"].get(n, float("nan")) for r in rows] for n in names}
        h.grouped_barh(ax, labels, series, value_format="{:.2f}x", reference_line=1.0, log=True)
        ax.set_title(title)

    conv_names = [
        "conv3d_cl3d",
        "conv2d_frames",
        "conv2d_frames_cl",
        "conv2d_plane",
        "conv2d_plane_cl",
        "shifted_matmul_cl",
        "linear_rows_cl",
    ]
    conv_names = [n for n in conv_names if any(n in r["timings"] for r in rows_c)]
    panel(ax_c, rows_c, conv_names, "P3D convs: speedup over nn.Conv3d contiguous (log; >1 faster)")
    unit_names = [
        n
        for n in ("reference_cl3d", "compiled", "compiled_cl3d", "fast", "fast_cl3d")
        if any(n in r["timings"] for r in rows_u)
    ]
    panel(ax_u, rows_u, unit_names, "P3D units (residual_body): speedup over the eager reference")
    m = payload["machine"]
    fig.suptitle(
        f"P3D convolutions, LGD-3D R50 shapes (batch 4, 16x112x112), {m['device']} "
        f"({m['torch_threads']} threads), torch {m['torch']}, commit {(m['commit'] or 'unknown')[:10]}",
        fontsize=10,
    )
    return h.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_arguments(parser, default_out=h.RESULTS_DIR / "p3d_cpu.json", repeats=(15, 5))
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the units")
    parser.add_argument("--e2e-repeats", type=int, default=5, help="timed calls per model, end to end")
    parser.add_argument("--skip", choices=("convs", "units", "e2e"), action="append", default=[])
    args = parser.parse_args(argv)
    setup = h.prepare_run(args)
    units = r50_units()
    if args.quick:
        units = [u for u in units if u["stride"] == 1 and u["name"].startswith(("res2", "res4"))]
    convs = conv_cases(units)
    conv_rows = [] if "convs" in args.skip else bench_convs(args, convs)
    unit_rows = [] if "units" in args.skip else bench_units(args, units)
    e2e = None if "e2e" in args.skip else bench_end_to_end(args)
    payload = {
        "benchmark": "p3d_cpu",
        "machine": h.machine_info(),
        "settings": {
            "quick": args.quick,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "steady_malloc": setup["steady_malloc"],
            "compile": not args.no_compile,
            "e2e_repeats": args.e2e_repeats,
        },
        "copy_bandwidth": setup["copy_bandwidth"],
        "foreign_load_before_cores": setup["foreign_load_before_cores"],
        "notes": [
            "timings: median seconds per call over interleaved repeats, 3 rotated input sets, normal inputs + 0.5",
            "conv candidates: reference = F.conv3d contiguous; conv3d_cl3d = F.conv3d on channels_last_3d; "
            "conv2d_frames = F.conv2d over (N*T, C, H, W) contiguous frames (input given in that layout: in a 3-D "
            "network that costs a permute copy each way, not included); conv2d_frames_cl = F.conv2d on the "
            "channels_last frames view of a channels_last_3d input (free); conv2d_plane(_cl) = temporal conv as a "
            "(3, 1) F.conv2d over (N, C, T, H*W) (a free view of either layout; stride 2 subsamples first); "
            "shifted_matmul_cl = the 3 time-shifted copies concatenated, one GEMM; no torch.compile per conv "
            "(inductor calls the same aten convolution for a lone conv)",
            "forward+backward = autograd.grad of the output w.r.t. input and weight (units: input and conv/bn1/bn2 "
            "parameters) with a random upstream gradient",
            "unit candidates (body up to bn3): reference = block.residual_body on a contiguous input; "
            "reference_cl3d = the same on channels_last_3d; compiled(_cl3d) = torch.compile(block.residual_body, "
            "inductor) on that layout; fast(_cl3d) = the fast unit's residual_body under its default execution plan "
            "(lgd_fast.plan: conv_bn calls with fused epilogues, in eval every BatchNorm folded and one oneDNN "
            "primitive per conv; in training on CPU tensors the block's own modules, the measured default), and "
            "fast_fused_training(_cl3d) times the fused training path (lgd_fast.models.p3d.bottleneck_body: the "
            "convs' statistics feeding BatchNorm) that choice was measured against",
            "pointwise conv candidates: linear_rows_cl = F.linear over the (N*T*H*W, C) rows view of "
            "channels_last_3d; conv2d_frames_cl = 1x1 F.conv2d on the frames view",
            "r50_totals: each distinct unit's median times how often it occurs among R50's 16 bottlenecks",
            "flops: 2*MACs of the convs (forward); fwd+bwd counted as 3x",
        ],
        "units": units,
        "conv_results": conv_rows,
        "unit_results": unit_rows,
        "r50_totals": r50_totals(unit_rows) if unit_rows else None,
        "end_to_end": e2e,
    }
    if payload["r50_totals"]:
        for p, t in payload["r50_totals"].items():
            print(
                f"R50 bottleneck bodies, {p}: "
                + " ".join(
                    f"{k} {s * 1e3:.1f} ms (x{t['speedup_vs_reference'][k]:.2f})" for k, s in t["seconds"].items()
                )
            )
    print("wrote", write_json(args.out, payload))
    print("wrote", plot(payload, args.plot or args.out.with_suffix(".png")))


if __name__ == "__main__":
    main()
