"""Parity cases of p3d_conv and the fast P3D units, shared by the CPU tests and the Triton interpreter run.

Each case runs one backend, the plain PyTorch computation at the case's dtype (the yardstick: ``F.conv3d`` at
that dtype, then the epilogue) and the float64 reference, forward and every gradient, and returns one row per
output: relative errors (norm of the difference over the norm of the float64 value) of ours and of PyTorch.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from lgd_fast.models import p3d as p3d_models
from lgd_fast.models.blocks import P3DBasicBlock, P3DBottleneck
from lgd_fast.models.p3d import to_fast_unit
from lgd_fast.ops import p3d_conv, p3d_conv_reference
from op_testing import random_input

KINDS = {"spatial": (1, 3, 3), "temporal": (3, 1, 1), "pointwise": (1, 1, 1)}
# (kind, stride, (N, C, T, H, W), C_out): the Triton kernels' geometries (tests/test_p3d_triton.py under the
# interpreter, tests/test_gpu_backends.py on a GPU).
CONV_GEOMETRIES = [
    ("spatial", 1, (3, 5, 5, 9, 9), 7),  # 1215 output positions: two weight-gradient splits
    ("spatial", 2, (1, 3, 1, 15, 15), 5),
    ("temporal", 1, (1, 37, 7, 7, 7), 3),  # 37 input channels: two K steps of 32 (interpreter tiles)
    ("temporal", 2, (1, 5, 5, 9, 9), 9),
    ("pointwise", 2, (1, 19, 5, 9, 9), 67),  # 67 output channels: two column tiles of 64, and K steps in dgrad
]
EPILOGUES = {
    "none": {},
    "affine_relu": {"scale": True, "shift": True, "relu": True},
    "affine_residual_relu": {"scale": True, "shift": True, "residual": True, "relu": True},
    "residual_stats": {"residual": True, "stats": True},
    "affine_stats": {"scale": True, "shift": True, "stats": True},
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def conv_case_id(kind, stride, shape, co, epilogue, dtype, layout) -> str:
    return f"{kind}-s{stride}-{'x'.join(map(str, shape))}-{co}-{epilogue}-{dtype}-{layout}"


def near_the_kink(tensors: dict[str, torch.Tensor], stride: int) -> bool:
    """Whether a ReLU input of this p3d_conv case lies within 32 float32 roundings of its terms' magnitude of
    zero, in float64: the same sums on absolute values (conv(|x|, |w|) |scale| + |shift| + |residual|), which
    float32's error scales with. There float32 and float64 can fall on either side of the kink, and the
    gradient through that position flips between 0 and its full value: about 1e-2 of grad_x, grad_weight,
    grad_scale and grad_shift, which a single float32 draw judged at 5e-6 cannot absorb (expected in about one
    CI run in 230 before these cases were drawn again; the float32 reference flips too, by its own rounding)."""
    exact = {k: v.double() for k, v in tensors.items()}
    z = p3d_conv_reference(exact.pop("x"), exact.pop("weight"), stride=stride, **exact)
    sizes = {k: v.double().abs() for k, v in tensors.items()}
    size = p3d_conv_reference(sizes.pop("x"), sizes.pop("weight"), stride=stride, **sizes)
    return bool((z.abs() <= 32 * torch.finfo(torch.float32).eps * size).any())


def run_conv_case(kind, stride, shape, co, epilogue, dtype, layout, backend, gen, device="cpu") -> list[dict]:
    """One p3d_conv case: rows for out, stats (if asked) and the gradient of every input. The values are drawn on
    the CPU (the same draws on every device); ``device`` runs ours, PyTorch's and the float64 reference there.
    float32 cases with a ReLU are drawn again while a ReLU input is within rounding of zero (``near_the_kink``)."""
    dtype = getattr(torch, dtype)
    opts = EPILOGUES[epilogue]
    n, ci, t, h, w = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1

    def draw() -> dict[str, torch.Tensor]:
        x = random_input(shape, dtype, LAYOUTS[layout], gen) - 1.0
        weight = (torch.randn(co, ci, *KINDS[kind], generator=gen) / (ci * 3) ** 0.5).to(dtype)
        tensors = {"x": x, "weight": weight}
        if opts.get("scale"):
            tensors["scale"] = 0.5 + torch.rand(co, generator=gen)
        if opts.get("shift"):
            tensors["shift"] = 0.2 * torch.randn(co, generator=gen)
        if opts.get("residual"):
            tensors["residual"] = random_input((n, co, t, ho, wo), dtype, LAYOUTS[layout], gen) - 1.0
        return tensors

    tensors = draw()
    while dtype == torch.float32 and opts.get("relu") and near_the_kink(tensors, stride):
        tensors = draw()
    stats = bool(opts.get("stats"))
    # The upstream gradient in the case's dtype already: the op receives it rounded to out's dtype, and a rounding
    # made before the op (the same for ours and PyTorch's) would dominate the errors of the per-channel sums
    # (grad_scale, grad_shift) and leave their 2x ratio to chance: seen 4.2e-3 vs PyTorch's 1.4e-3 in bfloat16,
    # where PyTorch's second rounding (its sum of the two gradients of out in bfloat16) happened to cancel it.
    gout = torch.randn((n, co, t, ho, wo), generator=gen).to(dtype).float()
    gstats = torch.randn((2, co), generator=gen) / (n * t * ho * wo)

    gout, gstats = gout.to(device), gstats.to(device)

    def run(fn, cast):
        leaves = {k: cast(v.to(device)).detach().requires_grad_() for k, v in tensors.items()}
        args = {k: v for k, v in leaves.items() if k not in ("x", "weight")}
        result = fn(leaves["x"], leaves["weight"], stride=stride, relu=bool(opts.get("relu")), stats=stats, **args)
        out, st = result if stats else (result, None)
        loss = (out.double() * gout.double()).sum()
        if stats:
            loss = loss + (st.double() * gstats.double()).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        named = {"out": out, **({"stats": st} if stats else {})}
        named.update({f"grad_{k}": g for k, g in zip(leaves, grads, strict=True)})
        return named

    ours = run(lambda *a, **k: p3d_conv(*a, backend=backend, **k), lambda v: v)
    plain = run(p3d_conv_reference, lambda v: v)
    ref = run(p3d_conv_reference, lambda v: v.double())
    rows = []
    for name, a in ours.items():
        rows.append(
            {
                "name": name,
                "finite": bool(torch.isfinite(a).all()),
                "shape_ok": a.shape == ref[name].shape,
                "err": rel(a, ref[name]),
                "torch_err": rel(plain[name], ref[name]),
            }
        )
    if stats:  # the statistics are those of the output returned: float64 sums of it, at every dtype
        stored = ours["out"].double()
        dims = (0, 2, 3, 4)
        centred = stored - stored.mean(dims, keepdim=True)
        exact = torch.stack([stored.sum(dims), (centred * centred).sum(dims)])
        rows.append({"name": "stats_of_out", "finite": True, "shape_ok": True, "sums_err": rel(ours["stats"], exact)})
    return rows


# ---- units ------------------------------------------------------------------------------------------

# global_reduction 4 keeps a global path at the small, odd channel counts of the tests
UNITS = {
    "bottleneck": lambda ci, planes, variant, stride: P3DBottleneck(
        ci, planes, variant=variant, stride=stride, global_reduction=4
    ),
    "basic": lambda ci, planes, variant, stride: P3DBasicBlock(
        ci, planes, variant=variant, stride=stride, global_reduction=4
    ),
}


def unit_case_id(unit, variant, stride, shape, planes, mode, dtype, layout="contiguous") -> str:
    return f"{unit}-{variant}-s{stride}-{'x'.join(map(str, shape))}-{planes}-{mode}-{dtype}-{layout}"


def randomise_norms(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Non-trivial parameters and running statistics in every BatchNorm3d of ``module``."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return module


def randomise_block(block: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Non-trivial BatchNorm parameters and running statistics, and a non-zero fc6 (so diffusion is live)."""
    randomise_norms(block, gen)
    with torch.no_grad():
        block.fc6.weight.copy_(0.1 * torch.randn(block.fc6.weight.shape, generator=gen))
    return block


class ReluBranches:
    """The ReLUs of one run of a P3D block, in call order: ``F.relu`` (the reference's modules, the global path)
    and the fused convs' ReLU (``conv_bn`` / ``conv_sum_bn`` with ``relu=True``, as the fast units call them).

    Recording (``force=None``) keeps each ReLU's input where it sees one (``F.relu``) and each output's mask
    (``> 0``). Forcing (``force``: another run's masks) makes each ``F.relu`` multiply its input by the given mask:
    a float64 run of the reference through exactly the branches that run took.
    """

    def __init__(self, force: list[torch.Tensor] | None = None):
        self.force = force
        self.inputs: list[torch.Tensor | None] = []
        self.masks: list[torch.Tensor] = []

    def _relu(self, real):
        def relu(x, inplace=False):
            k = len(self.masks)
            if self.force is not None:
                if k >= len(self.force) or self.force[k].shape != x.shape:
                    raise AssertionError(f"ReLU {k} of the float64 run does not match the recorded run's")
                out = x * self.force[k].to(x.dtype)
            else:
                self.inputs.append(x.detach().clone())
                out = real(x, inplace=inplace)
            self.masks.append(out.detach() > 0)
            return out

        return relu

    def _fused_conv(self, real):
        def conv(*args, relu=False, **kwargs):  # (its own ReLU is torch.relu or a kernel's, never F.relu)
            out = real(*args, relu=relu, **kwargs)
            if relu:
                if self.force is not None:
                    raise AssertionError("a forced run must be the reference's, whose ReLUs are F.relu")
                self.inputs.append(None)  # the fused conv's ReLU input never leaves the kernel
                self.masks.append((out[0] if isinstance(out, tuple) else out).detach() > 0)
            return out

        return conv

    @contextlib.contextmanager
    def active(self):
        saved = F.relu, p3d_models.conv_bn, p3d_models.conv_sum_bn
        F.relu = self._relu(saved[0])
        p3d_models.conv_bn, p3d_models.conv_sum_bn = self._fused_conv(saved[1]), self._fused_conv(saved[2])
        try:
            yield self
        finally:
            F.relu, p3d_models.conv_bn, p3d_models.conv_sum_bn = saved


def branch_rows(exact: ReluBranches, ours: ReluBranches, plain: ReluBranches) -> list[dict]:
    """One row per ReLU: where our mask differs from the float64 one, the largest float64 ReLU input there
    (``flip_value``), against the largest error of PyTorch's ReLU input at the same dtype (``flip_bound``), the
    largest float64 input (``scale``), and how many masks differ in ours and in PyTorch's (``flips``,
    ``torch_flips``). A rounding flips only inputs within rounding of zero; a mask that drops real values does not."""
    if not (len(exact.masks) == len(ours.masks) == len(plain.masks)):
        return [{"name": "relu count", "finite": True, "shape_ok": False, "flip_value": 0.0, "flip_bound": 0.0}]
    rows = []
    for k, (z, mask, z_plain, plain_mask) in enumerate(zip(exact.inputs, ours.masks, plain.inputs, plain.masks,
                                                           strict=True)):  # fmt: skip
        row = {"name": f"relu{k} flips", "finite": True, "shape_ok": mask.shape == z.shape, "flip_value": 0.0,
               "flip_bound": 0.0}  # fmt: skip
        if row["shape_ok"]:
            flipped = mask != (z > 0)
            row.update(
                flips=int(flipped.sum()),
                torch_flips=int((plain_mask != (z > 0)).sum()),
                flip_value=z[flipped].abs().max().item() if flipped.any() else 0.0,
                flip_bound=(z_plain.double() - z).abs().max().item(),
                scale=z.abs().max().item(),
            )
        rows.append(row)
    return rows


def check_branches(rows: list[dict], case: str, *, floor: float = 0.0) -> None:
    """Each ReLU flipped only inputs within twice PyTorch's largest error of that input, or within ``floor`` times
    the largest input (a float32 case's tolerance: there PyTorch's error can be far below it) (``branch_rows``).

    What this cannot see: a ReLU whose threshold moved by less than that band (at bfloat16 about 1e-2 of the
    largest input), which is what rounding does. The number of flips is not judged: at these sizes it is a few
    per ReLU and draw (bfloat16 CPU units, a /tmp study over 22800 ReLU draws: 3.42 on average ours, 3.50
    PyTorch's), too few for a ratio rule that a correct kernel would not fail by chance."""
    for row in rows:
        if "flip_value" in row:
            assert row["shape_ok"], f"{case} {row['name']}: the runs' ReLUs differ in number or shape"
            bound = max(2 * row["flip_bound"], floor * row["scale"])
            assert row["flip_value"] <= bound, (
                f"{case} {row['name']}: {row['flips']} masks differ from float64's, at inputs up to "
                f"{row['flip_value']:.2e}; PyTorch's inputs are within {row['flip_bound']:.2e} of float64's"
            )


def run_unit_case(
    unit, variant, stride, shape, planes, mode, dtype, gen, *, scope="block", layout="contiguous"
) -> list[dict]:
    """A fast P3D block against the reference block, at ``dtype`` against float64, on an input in ``layout``.

    The plain PyTorch yardstick runs in the same layout: PyTorch's own kernels differ by layout (its bfloat16
    BatchNorm backward was seen to be less accurate on channels_last_3d than on contiguous tensors).

    Each run is judged against the float64 reference taken through that run's own ReLU branches
    (:class:`ReluBranches`): a ReLU input within rounding of zero falls on either side in two implementations,
    and at the tests' small maps one flipped position with a large gradient moves a weight gradient by tens of
    percent (seen at bfloat16: 0.119 against PyTorch's 0.043, from flips alone). That is a fact about the input,
    not the kernel. What a flip may be is checked on its own (``branch_rows``): only inputs within rounding of
    zero. So the 2x rule measures the arithmetic, and a wrong mask (one that drops a real value) still fails.

    scope "block": the whole LGD block (fused unit, fused projection shortcut, global path): outputs x' and g',
    the gradients of x, g and every parameter, and in training the running statistics after the step.
    scope "unit": the P3D unit and its shortcut, ``residual(x) + shortcut(x)``: that output, the gradient of x
    and of every parameter of the unit, and in training the running statistics (the global path, the
    reference's own code, is left out: its gradients are sums through the block's last ReLU, whose mask
    flips with any rounding, so at bfloat16 they measure noise, not the unit).

    The plan must not measure candidates while a run records its ReLUs (each would add its own): callers run
    under :func:`lgd_fast.plan.forced` (the tests' plan is "default", which measures nothing, in any case).
    """
    dtype = getattr(torch, dtype)
    ci = shape[1]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = randomise_block(UNITS[unit](ci, planes, variant, stride), gen).train(mode == "train")
    x = random_input(shape, torch.float64, torch.contiguous_format, gen) - 1.0
    g = torch.randn(shape[0], ci, generator=gen, dtype=torch.float64)
    upstream = {}

    def run(block, cast, branches):
        block = copy.deepcopy(block).to(cast)
        xs = x.to(cast).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
        gs = g.to(cast).requires_grad_()
        with branches.active():
            if scope == "block":
                outputs = dict(zip(("out", "g"), block(xs, gs), strict=True))
            else:
                outputs = {"out": block.residual(xs) + block.shortcut(xs)}
        for k, v in outputs.items():
            upstream.setdefault(k, torch.randn(v.shape, generator=gen, dtype=torch.float64))
        loss = sum((v.double() * upstream[k]).sum() for k, v in outputs.items())
        params = {k: p for k, p in block.named_parameters() if scope == "block" or not k.startswith("fc")}
        leaves = {"x": xs, **({"g": gs} if scope == "block" else {}), **params}
        grads = torch.autograd.grad(loss, list(leaves.values()))
        named = {**outputs, **{f"grad_{k}": v for k, v in zip(leaves, grads, strict=True)}}
        if mode == "train":
            named.update({k: v for k, v in block.named_buffers() if k.endswith(("running_mean", "running_var"))})
        return named

    exact, plain_branches, our_branches = ReluBranches(), ReluBranches(), ReluBranches()
    reference = run(ref, torch.float64, exact)
    plain = run(ref, dtype, plain_branches)
    ours = run(to_fast_unit(copy.deepcopy(ref)), dtype, our_branches)
    rows = branch_rows(exact, our_branches, plain_branches)
    if any(not row["shape_ok"] for row in rows):
        return rows
    for_plain = run(ref, torch.float64, ReluBranches(force=plain_branches.masks))
    for_ours = run(ref, torch.float64, ReluBranches(force=our_branches.masks))
    return rows + [
        {
            "name": name,
            "finite": bool(torch.isfinite(a).all()),
            "shape_ok": a.shape == reference[name].shape,
            "err": rel(a, for_ours[name]),
            "torch_err": rel(plain[name], for_plain[name]),
        }
        for name, a in ours.items()
    ]


def check_rows(rows: list[dict], dtype: str, case: str, *, fp32_tol: float) -> None:
    """fp32 within ``fp32_tol``; bf16/fp16 within 2x PyTorch's own error at that dtype, or within ``fp32_tol``,
    in every row and every draw: the per-channel sums (grad_scale, grad_shift) too, since the upstream gradient
    comes in the case's dtype (``run_conv_case``) and no rounding made outside the op is counted. (With that
    exact gradient, grad_shift of a conv with statistics is float32 arithmetic at any dtype: PyTorch's error
    then is float32 summation noise, 7e-8 to 3e-7 seen, and ours may be a few times it.) Statistics: at every
    dtype within 1e-5 of the float64 sums of the output returned; against the float64 reference too in float32
    (at 16 bits that comparison is the stored values' rounding noise, partly cancelling in the sums, whose ratio
    to PyTorch's was seen above 2x by chance: 9.3e-5 vs 4.5e-5 in float16)."""
    for row in rows:
        name = row["name"]
        assert row["finite"], f"{case} {name}: unwritten or non-finite elements"
        assert row["shape_ok"], f"{case} {name}: wrong shape"
        if "sums_err" in row:  # float32 sums of the returned output against float64 ones
            assert row["sums_err"] < 1e-5, f"{case} {name}: statistics off the output's sums by {row['sums_err']:.2e}"
        elif name == "stats" and dtype != "float32":
            continue  # rounding noise of 16-bit values that partly cancels in a sum; checked by stats_of_out
        elif dtype == "float32":
            assert row["err"] < fp32_tol, f"{case} {name}: relative error {row['err']:.2e} >= {fp32_tol:.0e}"
        else:
            assert row["err"] <= max(2 * row["torch_err"], fp32_tol), (
                f"{case} {name}: error {row['err']:.2e} vs PyTorch {dtype} {row['torch_err']:.2e}"
            )


def check_pooled_ratio(draws: list[list[dict]], case: str, *, limit: float = 2.0, set_aside: float = 0.25) -> None:
    """The 2x-PyTorch rule over several fresh draws: per output, the sum of our errors is at most ``limit`` times
    the sum of PyTorch's errors at the same dtype, over the draws left after setting aside the worst
    ``set_aside`` share (by our error over PyTorch's). Draws that carry ReLU branch rows (``run_unit_case``) are
    judged against the float64 run through their own branches, and their branches are checked here. A row
    marked ``excused`` (PyTorch's own run flipped that gradient under other rounding luck) leaves both sums; at
    most half of a gradient's draws may be excused.

    Used for bfloat16 units, where one draw's error is mostly rounding noise: ReLU masks and batch statistics
    move with every rounding, and at the tests' small maps (4x4 frames after a stride 2) one flipped mask at a
    position with a large gradient moves a weight gradient by tens of percent. Measured over 24 draws of a
    stride-2 bottleneck in training: about one draw in six at 25-37x PyTorch's error, the pooled ratio 1.2-1.35
    (and single draws from 0.2x to 8x elsewhere). A systematic excess moves every draw and still fails.

    The fast units' draws need no set-aside (``set_aside=0``): judged through their own ReLU branches, over
    40 seeds x 40 CPU cases x 16 draws the pooled ratio over all draws was at most 1.32 (/tmp study, the
    bfloat16 cases of tests/test_p3d_units.py); through the float64 reference's branches the same draws had
    set-asides to explain, and 8 interpreted draws with three flipped ones failed (ratio 2.03, seed 3665499384).
    """
    errors: dict[str, list[tuple[float, float]]] = {}
    excused: dict[str, int] = {}
    for rows in draws:
        check_branches(rows, case)
        for row in rows:
            if "flip_value" in row:
                continue
            assert row["finite"], f"{case} {row['name']}: unwritten or non-finite elements"
            assert row["shape_ok"], f"{case} {row['name']}: wrong shape"
            if row.get("excused"):  # PyTorch itself flipped there under other rounding: not judged by error
                excused[row["name"]] = excused.get(row["name"], 0) + 1
                continue
            errors.setdefault(row["name"], []).append((row["err"], row["torch_err"]))
    for name, count in excused.items():
        assert 2 * count <= len(draws), f"{case} {name}: {count} of {len(draws)} draws excused, half at the most"
    for name, pairs in errors.items():
        kept = sorted(pairs, key=lambda p: p[0] / (p[1] + 2.0**-24))[: len(pairs) - int(len(pairs) * set_aside)]
        ours, torch_ = sum(a for a, _ in kept), sum(b for _, b in kept) + 2.0**-23
        assert ours <= limit * torch_, (
            f"{case} {name}: summed error {ours:.3e} over {len(kept)} of {len(pairs)} draws vs PyTorch's "
            f"{torch_:.3e} (ratio {ours / torch_:.2f}); per draw: {pairs}"
        )


# Floor of the per-parameter rule in GradientDraws: in 144 LGD-2D draws (24 seeds, 2 threads) every (tensor, draw)
# outside 2 draws met max(2x, 1e-3); without a floor 7% of them miss 2x at errors near 1e-5 (two fp32 roundings of
# a 1e-5 error are noise), while a wrong gradient is percents off (a 1% error in a block end's scale gradient fails).
GRAD_FLOOR = 1e-3


class GradientDraws:
    """A whole model's float32 training gradients over several fresh draws, against float64, by the 2x rule.

    One draw decides little. A ReLU input within float32 rounding of zero falls on either side in two
    implementations, and at small maps one flipped position moves every gradient below it by percents. Seen:
    lgd3d_tiny, seed 579733099 (channels_last_3d, kernel head): layer2.0's block-end ReLU input at one position
    is 7.9e-7 in float64 (the map's largest is 7.1); the float32 reference put it at 6.3e-8, the fast model at or
    below 0, and every gradient of layer2.0 and below was 1e-3..1e-2 off in the fast model (the reference's
    1e-6) while layer3 and layer4 were as close as the reference's. LGD-2D, seed 17: layer2.1's first ReLU at
    1.4e-6 flipped in the fast model only. So, as for the units (``check_pooled_ratio``):

    - per parameter, the candidate's error is within max(2x the yardstick's, ``floor``) in every draw outside
      that parameter's worst quarter;
    - over all gradients as one vector, the summed error over the draws outside the worst quarter is within 2x
      the yardstick's (``check_pooled_ratio``).

    A flip hits a few draws in a hundred, each on its own; a defect repeats in every draw and still fails.
    """

    def __init__(self, *, floor: float = GRAD_FLOOR):
        self.floor = floor
        self.per_key: dict[str, list[tuple[float, int, float, float]]] = {}
        self.pooled: list[list[dict]] = []

    def add(self, ours: dict, theirs: dict, exact: dict) -> None:
        """One draw: the candidate's, the yardstick's and the float64 gradients, by parameter name."""
        assert ours.keys() == theirs.keys() == exact.keys(), "the models' parameters with gradients differ"
        keys = [k for k, g in exact.items() if g.norm() > 0]
        draw = len(self.pooled)
        for key in keys:
            err, torch_err = rel(ours[key], exact[key]), rel(theirs[key], exact[key])
            self.per_key.setdefault(key, []).append((err / max(2 * torch_err, self.floor), draw, err, torch_err))

        def flat(grads):
            return torch.cat([grads[k].double().flatten() for k in keys])

        finite = all(bool(torch.isfinite(g).all()) for g in ours.values())
        shapes = all(ours[k].shape == exact[k].shape for k in keys)
        errors = {"err": rel(flat(ours), flat(exact)), "torch_err": rel(flat(theirs), flat(exact))}
        self.pooled.append([{"name": "all gradients", **errors, "finite": finite, "shape_ok": shapes}])

    def check(self, case: str) -> None:
        for key, rows in self.per_key.items():  # every draw but this key's worst quarter (the docstring says why)
            for bound_share, draw, err, torch_err in sorted(rows)[: len(rows) - len(rows) // 4]:
                assert bound_share <= 1, (
                    f"{case}, draw {draw}, {key}: ours {err:.2e}, reference {torch_err:.2e} (floor {self.floor})"
                )
        check_pooled_ratio(self.pooled, case)


def check_fp32_draws(draws: list[list[dict]], case: str, *, tol: float) -> None:
    """float32 blocks: every output within ``tol`` of float64 in every draw but the single worst one per output.

    A ReLU input within float32 rounding of zero can fall on either side in two implementations; the flipped
    position then moves a gradient sum by about one part in the number of positions (seen: 3.0e-3 on grad_x of a
    7x7x7 basic block in one run of ~30). That is rare per draw, so it cannot repeat across draws; a defect does.
    """
    errors: dict[str, list[float]] = {}
    for rows in draws:
        check_branches(rows, case, floor=tol)
        for row in rows:
            if "flip_value" in row:
                continue
            assert row["finite"], f"{case} {row['name']}: unwritten or non-finite elements"
            assert row["shape_ok"], f"{case} {row['name']}: wrong shape"
            errors.setdefault(row["name"], []).append(row["err"])
    for name, errs in errors.items():
        kept = sorted(errs)[: max(1, len(errs) - 1)]
        assert max(kept) < tol, f"{case} {name}: relative errors {errs} (all but the worst must be < {tol:.0e})"
