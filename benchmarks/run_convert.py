"""lgd_fast.convert on models the project did not write, built the way torchvision and pytorchvideo build them.

Models (tests/foreign_models.py): R(2+1)D-18, R3D-18 and MC3-18 (torchvision's structure), CSN-50 and an
X3D-S-sized X3D (pytorchvideo's). Inference: the original on contiguous clips, the original moved to
channels_last_3d on channels-last clips, the original under ``torch.compile``, the channels-last original under
``torch.compile`` with inductor's freezing (what a CPU user deploying it picks), ``lgd_fast.convert(model)`` in
eval on contiguous clips, and ``lgd_fast.convert(model, inference=True)`` on channels-last clips (each converted
layer's layout by its measured plan, written to the JSON), and that converted model wrapped in
``lgd_fast.RecordedInference`` (its recorded programs); a training step: the original and
``lgd_fast.convert(model)``. Timed in alternation (method: benchmarks/_harness.py) after checking that every
converted model's outputs equal the original's. With ``--isolated`` each candidate is built and timed in a
process of its own (one model per process, as deployed; benchmarks/_harness.py: time_isolated), the processes
taking turns. Writes benchmarks/results/convert_<model>_cpu.json (``--isolated``: convert_<model>_isolated_cpu.json).

    python benchmarks/run_convert.py [--model r2plus1d]   # batch 2, 16x112x112, fp32
    python benchmarks/run_convert.py --quick              # batch 1, 8x112x112, fewer repeats
    python benchmarks/run_convert.py --model x3d --quick --isolated
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the foreign model lives with the tests that check it
import _harness as h  # noqa: E402

import foreign_models  # noqa: E402
import lgd_fast  # noqa: E402
from lgd_fast.bench import _compiled, time_interleaved, write_json  # noqa: E402


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


MODELS = {
    "r2plus1d": ("R(2+1)D-18 written torchvision's way", lambda: foreign_models.r2plus1d(num_classes=400)),
    "r3d": ("R3D-18 written torchvision's way", lambda: foreign_models.r3d(num_classes=400)),
    "mc3": ("MC3-18 written torchvision's way", lambda: foreign_models.mc3(num_classes=400)),
    "csn": ("CSN-50 written pytorchvideo's way (no head)",
            lambda: foreign_models.csn(widths=(256, 512, 1024, 2048), blocks=(3, 4, 6, 3), stem_width=64)),
    "x3d": ("an X3D-S-sized X3D written pytorchvideo's way (no head)",
            lambda: foreign_models.x3d(widths=(24, 48, 96, 192), blocks=(3, 5, 11, 7), stem_width=24)),
}


INFERENCE = ("original", "original_channels_last", "converted", "converted_recorded", "converted_eval",
             "original_compiled", "original_compiled_freezing")  # fmt: skip
TRAINING = ("original", "converted")


def _setup(model: str, shape: tuple[int, ...]):
    """The original model (seeded: every process builds the same weights), two clips and labels."""
    torch.manual_seed(0)
    original = MODELS[model][1]()
    gen = torch.Generator().manual_seed(1)
    clips = [torch.randn(shape, generator=gen) for _ in range(2)]
    labels = torch.randint(0, 400, (shape[0],), generator=gen)
    return original, clips, labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="r2plus1d")
    h.add_common_arguments(parser, default_out=None, repeats=(8, 3))
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the original")
    parser.add_argument("--no-freezing", action="store_true", help="leave out torch.compile with freezing")
    parser.add_argument(
        "--isolated", action="store_true", help="each candidate in its own process (convert_<model>_isolated_cpu.json)"
    )
    args = parser.parse_args(argv)
    suffix = "_isolated" if args.isolated else ""
    args.out = args.out or h.RESULTS_DIR / f"convert_{args.model}{suffix}_cpu.json"
    setup = h.prepare_run(args)
    shape = (1, 3, 8, 112, 112) if args.quick else (2, 3, 16, 112, 112)
    run = _run_isolated if args.isolated else _run_in_process
    rows, plans, report = run(args, shape, setup)
    _write(args, shape, setup, rows, plans, report)


def _run_in_process(args, shape, setup):
    """Every candidate in this process, timed in alternation."""
    original, clips, labels = _setup(args.model, shape)
    make = MODELS[args.model][1]
    rows = {}

    # inference
    original.eval()
    cl = [c.contiguous(memory_format=torch.channels_last_3d) for c in clips]
    torch._dynamo.reset()
    shared = {}
    built = {name: _inference_candidate(name, original, clips, cl, shared) for name in _kept(args)}
    with torch.inference_mode():
        want = original(clips[0])
        error = {name: _checked(run, inputs, want) for name, (run, inputs) in built.items()}
        candidates = {name: (lambda i, run=run, inputs=inputs: run(inputs[i])) for name, (run, inputs) in built.items()}
        samples, _ = time_interleaved(candidates, inputs=[0, 1], warmup=args.warmup, repeats=args.repeats)
    timings = {k: h.Timing.from_samples(v).to_dict() for k, v in samples.items()}
    rows["inference"] = {"output_rel_error": error, "timings": timings}
    plans = {name: _converted_model(built[name][0], shared).execution_plan.to_dict()
             for name in ("converted", "converted_eval")}  # fmt: skip
    report = str(shared["converted"].conversion_report)
    labels = labels % want.shape[1]

    # training step
    train_original = make()
    train_original.load_state_dict(original.state_dict())
    train_converted = lgd_fast.convert(copy.deepcopy(train_original))
    steps = {"original": _training_step(train_original, clips, labels),
             "converted": _training_step(train_converted, clips, labels)}  # fmt: skip
    samples, _ = time_interleaved(steps, inputs=[0, 1], warmup=1, repeats=max(2, args.repeats // 2))
    rows["training_step"] = {"timings": {k: h.Timing.from_samples(v).to_dict() for k, v in samples.items()}}
    return rows, plans, report


def _inference_candidate(name: str, original, clips, cl, shared: dict):
    """(what to call, its clips) for inference candidate ``name``, ``original`` in eval; ``cl``: the clips in
    channels_last_3d. ``shared`` keeps the one ``convert(inference=True)`` model that "converted" and
    "converted_recorded" (it as recorded programs) share within a process."""
    if name == "original":
        return original, clips
    if name == "original_channels_last":
        return copy.deepcopy(original).to(memory_format=torch.channels_last_3d), cl
    if name in ("converted", "converted_recorded"):
        if "converted" not in shared:
            shared["converted"] = lgd_fast.convert(copy.deepcopy(original), inference=True)
        converted = shared["converted"]
        return (converted if name == "converted" else lgd_fast.RecordedInference(converted)), cl
    if name == "converted_eval":
        return lgd_fast.convert(copy.deepcopy(original)).eval(), clips
    if name == "original_compiled":
        return torch.compile(original, backend="inductor"), clips
    if name == "original_compiled_freezing":  # its own backend under the setting, as lgd-fast bench compiles it
        channels_last = copy.deepcopy(original).to(memory_format=torch.channels_last_3d)
        return _compiled(channels_last, freezing=True, compile_mode=None), cl
    raise ValueError(f"unknown inference candidate {name!r}; expected one of {INFERENCE}")


def _converted_model(run, shared: dict):
    """The converted model behind a converted candidate's ``run`` (the recorded one's is the shared model)."""
    return shared["converted"] if isinstance(run, lgd_fast.RecordedInference) else run


def _checked(run, inputs, want) -> float:
    """Two calls on the first clip (the recorded candidate's first runs eager, the next its program), then the
    output's relative error against the original's ``want``."""
    for _ in range(2):
        got = run(inputs[0])
    return _rel(got, want)


def _training_step(model, clips, labels):
    """A training step of ``model`` on clip i (forward, cross-entropy, backward, SGD at lr 1e-3)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run(i):
        loss = torch.nn.functional.cross_entropy(model.train()(clips[i]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return run


def _kept(args) -> list[str]:
    leave = set()
    if args.no_compile:
        leave |= {"original_compiled", "original_compiled_freezing"}
    if args.no_freezing:
        leave.add("original_compiled_freezing")
    return [name for name in INFERENCE if name not in leave]


def _run_isolated(args, shape, setup):
    """Each candidate in a process of its own (benchmarks/_harness.py: time_isolated), as one model per process is
    deployed: no candidate runs beside what another built (oneDNN's primitive and weight caches, compiled graphs,
    the heap's state)."""
    timed = {}
    for pass_, names, build, repeats, warmup in (
        ("inference", _kept(args), _isolated_inference, args.repeats, args.warmup),
        ("training_step", TRAINING, _isolated_training, max(2, args.repeats // 2), 1),
    ):
        builders = {name: (build, (args.model, name, shape)) for name in names}
        timed[pass_] = h.time_isolated(builders, repeats=repeats, warmup=warmup, steady=setup["steady_malloc"],
                                       progress=lambda what, p=pass_: print(p, what, flush=True))  # fmt: skip
    rows = {}
    for pass_, (samples, _) in timed.items():
        rows[pass_] = {"timings": {k: h.Timing.from_samples(v).to_dict() for k, v in samples.items()}}
    infos = timed["inference"][1]
    rows["inference"]["output_rel_error"] = {name: info["output_rel_error"] for name, info in infos.items()}
    plans = {name: info["execution_plan"] for name, info in infos.items() if "execution_plan" in info}
    return rows, plans, infos["converted"]["conversion_report"]


def _isolated_inference(model: str, name: str, shape: tuple[int, ...]):
    """Inference candidate ``name`` in its own process (h.time_isolated): built by _inference_candidate from the
    same weights and clips as _run_in_process, its output checked against the original's."""
    original, clips, _ = _setup(model, shape)
    original.eval()
    cl = [c.contiguous(memory_format=torch.channels_last_3d) for c in clips]
    shared = {}
    run, inputs = _inference_candidate(name, original, clips, cl, shared)
    with torch.inference_mode():
        info = {"output_rel_error": _checked(run, inputs, original(clips[0]))}
    if name.startswith("converted"):
        converted = _converted_model(run, shared)
        info["execution_plan"] = converted.execution_plan.to_dict()
        if name == "converted":
            info["conversion_report"] = str(converted.conversion_report)
    k = [0]

    def call():
        k[0] += 1
        with torch.inference_mode():
            run(inputs[k[0] % 2])

    return call, info


def _isolated_training(model: str, name: str, shape: tuple[int, ...]):
    """Training-step candidate ``name`` ("original" or "converted") in its own process, as _run_in_process's."""
    if name not in TRAINING:
        raise ValueError(f"unknown training candidate {name!r}; expected one of {TRAINING}")
    original, clips, labels = _setup(model, shape)
    with torch.no_grad():
        labels = labels % original.eval()(clips[0]).shape[1]
    candidate = original if name == "original" else lgd_fast.convert(copy.deepcopy(original))
    run = _training_step(candidate, clips, labels)
    k = [0]

    def call():
        k[0] += 1
        run(k[0] % 2)

    return call, {}


def _write(args, shape, setup, rows, plans, report) -> None:
    description = MODELS[args.model][0]
    for name, row in rows.items():
        med = {k: t["median_s"] for k, t in row["timings"].items()}
        row["converted_speedup"] = {k: med[k] / med["converted"] for k in med if k != "converted"}
        print(name, " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()),
              " ".join(f"x{v:.2f} vs {k}" for k, v in row["converted_speedup"].items()))  # fmt: skip
    payload = {
        "benchmark": "convert",
        "model": f"{description} (tests/foreign_models.py), fp32",
        "input": list(shape),
        "machine": h.machine_info(),
        "settings": {"quick": args.quick, "warmup": args.warmup, "repeats": args.repeats,
                     "steady_malloc": setup["steady_malloc"], "isolated": args.isolated},  # fmt: skip
        "conversion_report": report,
        "notes": [
            "inference: converted = lgd_fast.convert(model, inference=True) on channels_last_3d input (each "
            "converted layer's input layout as its measured plan chose); "
            "converted_recorded = lgd_fast.RecordedInference(converted), the same model as recorded programs "
            "(lgd_fast.recorded); "
            "converted_eval = lgd_fast.convert(model).eval() on contiguous input; original = the model in eval mode "
            "on contiguous input; original_channels_last = it moved to channels_last_3d, on channels-last input; "
            "original_compiled = torch.compile(original, inductor); original_compiled_freezing = "
            "torch.compile(original_channels_last) with inductor's freezing, on channels-last input",
            "training_step: forward, cross-entropy, backward, SGD step; converted = lgd_fast.convert(model)",
            "timings: median seconds per call over interleaved repeats; converted_speedup = other / converted",
            "isolated: each candidate built and timed in a process of its own, the processes handed 2 back-to-back "
            "calls in turn, the first of each pair left out (benchmarks/_harness.py: time_isolated); otherwise "
            "every candidate in one process, one call each in turn",
        ],
        "results": rows,
        "execution_plans": plans,  # each converted layer's choice (fused or not, layout) and its measured times
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
