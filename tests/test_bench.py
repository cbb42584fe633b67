"""lgd-fast bench (lgd_fast.bench): every candidate and pass measured, targets checked, files written."""

from __future__ import annotations

import json

import pytest
import torch

from lgd_fast import bench, create_model
from lgd_fast.cli import main


def test_run_bench_measures_every_candidate_and_pass():
    payload = bench.run_bench("lgd3d_tiny", batch=2, frames=4, size=32, num_classes=5, repeats=3,
                              candidates=("reference", "reference_channels_last", "fast"), progress=False)  # fmt: skip
    assert payload["device"] == "cpu" and payload["input"] == [2, 3, 4, 32, 32]
    assert payload["machine"]["torch"] == torch.__version__ and "commit" in payload["machine"]
    peak = payload["conv_peak"]
    assert len(peak["measurements"]) == 2
    assert peak["gflops_per_s"] == max(m["gflops_per_s"] for m in peak["measurements"])
    assert peak["gflops_per_s"] > 1 and peak["measurements"][0]["layout"] == "channels_last_3d"
    gflops = payload["model_gflops"]
    assert gflops["inference"] == pytest.approx(2 * gflops["latency"]) and gflops["inference"] > 0  # batch 2 and 1
    for pass_ in bench.PASSES:
        rows = payload["results"][pass_]
        assert set(rows) == {"reference", "reference_channels_last", "fast"}
        for row in rows.values():
            assert row["calls"] == 3 and 0 < row["min_s"] <= row["p25_s"] <= row["median_s"] <= row["p95_s"]
            clips = 1 if pass_ == "latency" else 2
            assert row["clips_per_s"] == pytest.approx(clips / row["median_s"])
            assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
            if pass_ == "training":
                assert row["conv_peak_share"] is None
            else:
                share = gflops[pass_] / row["median_s"] / peak["gflops_per_s"]
                assert row["conv_peak_share"] == pytest.approx(share)
    floors = payload["conv_floor"]
    assert set(floors) == set(bench.PASSES) and floors["training"]["training"]
    for pass_, floor in floors.items():
        assert floor["seconds"] > 0 and floor["calls"] == sum(c["count"] for c in floor["per_call"])
        for row in payload["results"][pass_].values():
            assert row["conv_floor_share"] == pytest.approx(floor["seconds"] / row["median_s"])
    metrics = {(c["pass"], c["metric"]) for c in payload["target_check"]}
    assert ("inference", "conv_peak_share") in metrics
    assert not any(c["target_applies_to_this_setting"] for c in payload["target_check"])  # tiny, not R50
    assert all(c["met"] is None for c in payload["target_check"])  # and so not judged
    assert payload["accuracy"] is None  # fp32: no bf16 logits to compare
    json.dumps(payload)


def test_model_flops_counts_convs_and_linears():
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1), groups=1),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 2 * 5 * 5, 4))  # fmt: skip
    x = torch.randn(1, 3, 2, 5, 5)
    assert bench.model_flops(model, x) == 2 * (8 * 2 * 5 * 5) * 3 * 9 + 2 * 4 * 400


def test_model_gflops_are_counted_on_a_plain_reference_whichever_candidate_comes_first(monkeypatch):
    """A fast model's hooks miscount its FLOPs: its fused convs call no module (and a measured plan's first call at
    a shape runs every trial through its modules, each counted). run_bench counts a plain reference's."""
    from lgd_fast import plan

    monkeypatch.setattr(plan, "_MEASURED", {})  # the trials run here, whatever an earlier test measured
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    want = bench.model_flops(create_model("lgd3d_tiny", 5, classifier="two_heads"), x)
    fast = create_model("lgd3d_tiny", 5, classifier="two_heads", fast=True)
    assert bench.model_flops(fast, x) < want  # (the fc's alone: the default plan, as conftest sets)
    measured = create_model("lgd3d_tiny", 5, classifier="two_heads", fast=True, plan="measure")
    assert bench.model_flops(measured, x) > want  # its plan's trials
    payload = bench.run_bench("lgd3d_tiny", batch=2, frames=4, size=32, num_classes=5, repeats=1, warmup=0,
                              passes=("inference", "latency"), candidates=("fast",), progress=False)  # fmt: skip
    assert payload["model_gflops"] == {"inference": pytest.approx(2 * want / 1e9), "latency": pytest.approx(want / 1e9)}


def test_isolated_bench_builds_here_only_what_the_bf16_accuracy_compares(monkeypatch):
    """--isolated: each timed candidate is built in its own process, so run_bench's process builds only the fast
    model and its eager reference for the bf16 logits (none for fp32), and still times every candidate."""
    names = ["reference_compiled", "fast", "reference_channels_last", "reference"]
    assert bench._built_here(names, "fp32", ["inference"], isolated=False) == names
    assert bench._built_here(names, "fp32", ["inference"], isolated=True) == []
    assert bench._built_here(names, "bf16", ["inference"], isolated=True) == ["fast", "reference"]
    assert bench._built_here(names[:3], "bf16-weights", ["latency", "inference"], True) == [
        "fast", "reference_channels_last"]  # fmt: skip
    assert bench._built_here(names, "bf16", ["training"], isolated=True) == []  # no inference, no accuracy
    assert bench._built_here(["reference_compiled", "fast"], "bf16", ["inference"], isolated=True) == ["fast"]
    built, timed = [], []
    models = bench._models
    monkeypatch.setattr(bench, "_models", lambda *a: built.extend(a[3]) or models(*a))

    def fake_timing(spec, shapes, per_pass, repeats, warmup, bar):  # (the processes: the CLI test above)
        timed.append(per_pass)
        samples = {p: ({n: [0.01 + 0.001 * i for i in range(repeats)] for n in ns}, dict.fromkeys(ns, 0.1))
                   for p, ns in per_pass.items()}  # fmt: skip
        return samples, {p: dict.fromkeys(ns) for p, ns in per_pass.items()}

    monkeypatch.setattr(bench, "_time_passes_isolated", fake_timing)
    payload = bench.run_bench("lgd3d_tiny", batch=2, frames=4, size=32, num_classes=5, repeats=2, dtype="bf16",
                              passes=("inference",), candidates=names, isolated=True, progress=False)  # fmt: skip
    assert built == ["fast", "reference"] and timed == [{"inference": names}]
    assert set(payload["results"]["inference"]) == set(names)
    assert payload["accuracy"]["against"] == "reference" and payload["accuracy"]["logits_max_error_vs_fp32"] < 2e-2


def test_model_convs_lists_every_conv_call():
    """Each distinct conv call of one forward with its count: the FLOPs they add up to are the model's conv FLOPs;
    only the stem's input (the clip) needs no gradient; under bf16 autocast the convs compute in bfloat16."""
    model = create_model("lgd3d_tiny", 5, classifier="two_heads")
    x = torch.randn(2, 3, 4, 32, 32)
    off = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    calls = bench.model_convs(model, x, off)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert sum(c["count"] for c in calls) == len(convs)
    assert [c["input_grad"] for c in calls].count(False) == 1 and calls[0]["input"] == tuple(x.shape)
    assert all(c["dtype"] == torch.float32 for c in calls)
    floor = bench.conv_floor(model, x, training=False, autocast=off, repeats=3)
    flops = []
    handles = [m.register_forward_hook(lambda m, i, o: flops.append(2 * o.numel() * m.weight[0].numel()))
               for m in convs]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert floor["gflop"] * 1e9 == pytest.approx(sum(flops))
    assert floor["seconds"] == pytest.approx(sum(c["median_s"] * c["count"] for c in floor["per_call"]))
    training = bench.conv_floor(model, x, training=True, autocast=off, repeats=3)
    stem = 2 * torch.nn.functional.conv3d(x, convs[0].weight, stride=convs[0].stride, padding=convs[0].padding).numel()
    stem *= convs[0].weight[0].numel()  # forward plus the weight gradient: no input gradient for the clip
    assert training["gflop"] == pytest.approx(3 * floor["gflop"] - stem / 1e9)
    on = torch.autocast("cpu", dtype=torch.bfloat16)
    assert all(c["dtype"] == torch.bfloat16 for c in bench.model_convs(model, x, on))


def test_conv_floor_counts_grouped_2d_and_1d_convs_by_hand():
    """FLOPs written out by hand: a grouped Conv3d with a bias, a Conv2d on frames and a Conv1d; a transposed conv
    is left out; the model's training mode is restored; bound_max uses each conv's fastest call."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv3d(4, 8, (1, 3, 3), padding=(0, 1, 1), groups=2, bias=True)
            self.b = torch.nn.Conv2d(8, 6, 3, padding="same")
            self.c = torch.nn.Conv1d(6, 5, 1)
            self.up = torch.nn.ConvTranspose1d(5, 5, 2, stride=2)

        def forward(self, x):  # (1, 4, 2, 5, 5)
            y = self.a(x)  # (1, 8, 2, 5, 5)
            y = self.b(y.transpose(1, 2).flatten(0, 1))  # (2, 6, 5, 5)
            return self.up(self.c(y.flatten(2)))  # (2, 5, 25) -> (2, 5, 50)

    net = Net().train()
    x = torch.randn(1, 4, 2, 5, 5)
    off = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    floor = bench.conv_floor(net, x, training=False, autocast=off, repeats=3)
    assert net.training and floor["calls"] == 3
    a = 2 * (8 * 2 * 5 * 5) * (2 * 9)  # each output: 4 / 2 input channels x 9 taps
    b = 2 * (2 * 6 * 5 * 5) * (8 * 9)
    c = 2 * (2 * 5 * 25) * 6
    assert floor["gflop"] * 1e9 == pytest.approx(a + b + c)
    training = bench.conv_floor(net, x, training=True, autocast=off, repeats=3)
    assert training["gflop"] * 1e9 == pytest.approx(2 * a + 3 * b + 3 * c)  # the clip's input gradient: none
    assert 0 < training["seconds_min"] <= training["seconds"]
    rows = {"fast": {"median_s": 1.0}, "reference_channels_last_compiled": {"median_s": 2.0}}
    floors = {"training": {"seconds": 1.0, "seconds_min": 0.5}}
    (check,) = [c for c in bench.check_targets({"training": rows}, "lgd3d_r50", [4, 3, 16, 112, 112], "fp32", "cpu",
                                               floors=floors) if c["metric"].startswith("speedup")]  # fmt: skip
    assert (check["bound"], check["bound_max"]) == (2.0, 4.0)


def test_channels_last_and_freezing_candidates(monkeypatch):
    """The channels-last candidates get channels_last_3d weights and clips; freezing candidates run only in the
    inference passes, compiled with inductor's freezing on (what is compiled, with which setting, recorded)."""
    compiled = []

    def fake_compiled(model, *, freezing, compile_mode):
        compiled.append((type(model).__name__, freezing))
        return model

    monkeypatch.setattr(bench, "_compiled", fake_compiled)
    models = bench._models("lgd3d_tiny", 5, torch.device("cpu"), bench.CANDIDATES, None)
    for name, (module, _, layout) in models.items():
        cl = "channels_last" in name or name == "reference_compiled_freezing"
        assert (layout == torch.channels_last_3d) == cl, name
        assert module.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d) == cl, name
    assert compiled == [("LGD3D", False), ("LGD3D", False), ("LGD3D", True), ("FastLGD3D", False),
                        ("FastLGD3D", True)]  # fmt: skip
    assert [name for name, (module, _, _) in models.items() if not getattr(module, "activation_arena", True)] == [
        "fast_no_arena"]  # fmt: skip
    assert [name for name, (module, _, _) in models.items() if not getattr(module, "recorded_inference", True)] == [
        "fast_not_recorded"]  # fmt: skip
    payload = bench.run_bench("lgd3d_tiny", batch=1, frames=4, size=32, num_classes=5, repeats=1, progress=False,
                              passes=("inference", "training"))  # fmt: skip
    assert set(payload["results"]["inference"]) == set(bench.CANDIDATES)
    assert set(payload["results"]["training"]) == set(bench.CANDIDATES) - bench.INFERENCE_ONLY
    assert "fast_no_arena" in payload["results"]["training"]  # training runs in the arena too
    assert payload["activation_arena"]["installed"] and payload["activation_arena"]["hits"] > 0


def test_each_compiled_candidate_compiles_its_own_graph():
    """Two instances of one class, compiled without and with freezing: each gets its own graph (with freezing
    patched globally the second silently reused the first's), and freezing packs the conv weights (with
    torch.compile's options={"freezing": True} it did not)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    a, b = (create_model("lgd3d_tiny", 5).eval() for _ in range(2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 4, 32, 32)
    before, packs = counters["stats"]["unique_graphs"], counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"]
    with torch.no_grad():
        out_a = bench._compiled(a, freezing=False, compile_mode=None)(x)
        out_b = bench._compiled(b, freezing=True, compile_mode=None)(x)
    assert counters["stats"]["unique_graphs"] - before == 2
    assert torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > packs  # freezing packed the weights


def test_bf16_run_compares_logits_with_fp32():
    payload = bench.run_bench("lgd3d_tiny", batch=1, frames=4, size=32, num_classes=5, repeats=1, dtype="bf16",
                              candidates=("reference", "fast"), passes=("inference",), progress=False)  # fmt: skip
    accuracy = payload["accuracy"]
    assert accuracy["against"] == "reference" and set(accuracy["per_head"]) in ({"logits"}, {"local", "global"})
    assert 0 < accuracy["logits_max_error_vs_fp32"] < 0.1  # bfloat16 rounds: not 0, and not wrong
    assert 0 < accuracy["reference_bf16_max_error_vs_fp32"] < 0.1
    vs_fp64 = accuracy["relative_error_vs_fp64"]
    for head, ratio in vs_fp64["fast_over_reference"].items():
        assert 0 < vs_fp64["reference"][head] < 0.1
        assert ratio == pytest.approx(vs_fp64["fast"][head] / vs_fp64["reference"][head])
    assert payload["conv_peak"]["measurements"][0]["dtype"] == "bf16"


def test_bf16_weights_run_every_model_and_clip_in_bfloat16(monkeypatch):
    seen = []
    real = bench.time_interleaved

    def recording(calls, **kwargs):  # each candidate's parameters' dtypes when it is timed
        seen.append({p.dtype for module in models.values() for p in module[0].parameters()})
        return real(calls, **kwargs)

    real_models = bench._models

    def keep(*args):
        models.update(real_models(*args))
        return models

    models = {}
    monkeypatch.setattr(bench, "time_interleaved", recording)
    monkeypatch.setattr(bench, "_models", keep)
    payload = bench.run_bench("lgd3d_tiny", batch=1, frames=4, size=32, num_classes=5, repeats=1, dtype="bf16-weights",
                              candidates=("reference", "fast"), passes=("inference",), progress=False)  # fmt: skip
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    assert payload["dtype"] == "bf16-weights" and payload["conv_peak"]["measurements"][0]["dtype"] == "bf16-weights"
    assert {row["dtype"] for row in payload["conv_floor"]["inference"]["per_call"]} == {"torch.bfloat16"}
    accuracy = payload["accuracy"]
    assert 0 < accuracy["logits_max_error_vs_fp32"] < 0.1 and 0 < accuracy["reference_bf16_max_error_vs_fp32"] < 0.1
    assert all(0 < v < 0.1 for v in accuracy["relative_error_vs_fp64"]["fast"].values())


def test_every_run_benches_the_same_weights():
    torch.manual_seed(123)  # whatever the global generator holds, the bench's reference is made under its own seed
    first = bench._models("lgd3d_tiny", 5, torch.device("cpu"), ("reference", "fast"), None)
    state = torch.get_rng_state()
    second = bench._models("lgd3d_tiny", 5, torch.device("cpu"), ("fast",), None)
    assert torch.equal(torch.get_rng_state(), state)  # and leaves the global generator as it was
    for key, value in first["reference"][0].state_dict().items():
        assert torch.equal(value, first["fast"][0].state_dict()[key]), key
        assert torch.equal(value, second["fast"][0].state_dict()[key]), key


def test_trained_like_gives_batchnorm_and_diffusion_trained_values_seeded():
    model = create_model("lgd3d_tiny", 5)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    bench.trained_like(model)
    again = bench.trained_like(create_model("lgd3d_tiny", 5))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, fresh[k])}
    for key in changed:
        assert torch.equal(model.state_dict()[key], again.state_dict()[key]), key  # seeded
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    for name in norms:
        bn = model.get_submodule(name)
        assert {f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")} <= changed
        assert 0.5 <= bn.weight.min() and bn.weight.max() < 1.5 and 0.5 <= bn.running_var.min()
    diffusion = {k for k in fresh if k.endswith("fc6.weight")}
    assert norms and diffusion and {k for k in changed if "fc6" in k} == diffusion
    assert changed == diffusion | {f"{n}.{k}" for n in norms for k in ("weight", "bias", "running_mean", "running_var")}


def test_target_check_on_a_hand_made_result():
    rows = {
        "fast": {"median_s": 1.0, "peak_memory_bytes": 70, "conv_peak_share": 0.8},
        "reference_channels_last": {"median_s": 1.4, "peak_memory_bytes": 100},
        "reference_channels_last_compiled": {"median_s": 1.1, "peak_memory_bytes": 90},
        "reference_compiled_freezing": {"median_s": 1.1, "peak_memory_bytes": 90},
        "reference": {"median_s": 3.5, "peak_memory_bytes": 100},
    }
    results = {"inference": rows, "training": rows}
    checks = bench.check_targets(results, "lgd3d_r50", [4, 3, 16, 112, 112], "fp32", "cpu")
    got = {(c["pass"], c["metric"]): (round(c["measured"], 3), c["met"]) for c in checks}
    assert got == {
        ("inference", "speedup_vs_reference_compiled_freezing"): (1.1, False),
        ("inference", "conv_peak_share"): (0.8, True),
        ("training", "speedup_vs_reference_channels_last_compiled"): (1.1, False),
        ("training", "peak_memory_vs_reference"): (0.7, True),
    }
    assert all(c["target_applies_to_this_setting"] for c in checks)
    assert not any("bound" in c for c in checks)
    floors = {"inference": {"seconds": 0.5}, "training": {"seconds": 1.0}}
    checks = bench.check_targets(results, "lgd3d_r50", [4, 3, 16, 112, 112], "fp32", "cpu", floors=floors)
    bounds = {(c["pass"], c["metric"]): c.get("bound") for c in checks}
    assert bounds[("inference", "speedup_vs_reference_compiled_freezing")] == pytest.approx(1.1 / 0.5)
    assert bounds[("training", "speedup_vs_reference_channels_last_compiled")] == pytest.approx(1.1 / 1.0)
    assert bounds[("inference", "conv_peak_share")] is None  # a bound is for speedups only
    accuracy = {"logits_max_error_vs_fp32": 0.03}
    checks = bench.check_targets(results, "lgd3d_r50", [4, 3, 16, 112, 112], "bf16", "cpu", accuracy=accuracy)
    got = {(c["pass"], c["metric"]): (round(c["measured"], 3), c["met"]) for c in checks}
    assert got == {
        ("inference", "speedup_vs_reference_channels_last"): (1.4, True),
        ("inference", "conv_peak_share"): (0.8, True),
        ("inference", "logits_max_error_vs_fp32"): (0.03, False),
    }


def test_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "lgd3d_tiny", "--batch", "2", "--frames", "4", "--size", "32", "--repeats", "2",
            "--no-compile", "--passes", "inference", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"inference"}
    no_compile = {"reference", "reference_channels_last", "fast", "fast_no_arena", "fast_not_recorded"}
    assert set(payload["results"]["inference"]) == no_compile
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "NOT met" not in printed and "not judged" in printed


def test_cli_isolated_times_each_candidate_in_a_process_of_its_own(tmp_path, capsys):
    """lgd-fast bench --isolated: every candidate of every pass timed (time_isolated: its own process, tested in
    test_time_isolated_runs_each_candidate_in_a_process_of_its_own), with the warm-up and peak memory its process
    measured; the file is named and its settings and notes say so."""
    argv = ["bench", "--model", "lgd3d_tiny", "--batch", "2", "--frames", "4", "--size", "32", "--repeats", "2",
            "--passes", "inference", "--candidates", "reference_channels_last,fast", "--isolated",
            "--no-progress", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    path = tmp_path / "bench_lgd3d_tiny_fp32_isolated_cpu.json"
    payload = json.loads(path.read_text())
    assert payload["settings"]["isolated"] is True
    assert any(note.startswith("isolated: each candidate") for note in payload["notes"])
    rows = payload["results"]["inference"]  # (one pass, two processes; a training step's build: the test below)
    assert set(rows) == {"reference_channels_last", "fast"}
    for row in rows.values():
        assert row["calls"] == 2 and 0 < row["min_s"] <= row["median_s"] and row["warmup_s"] > 0
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
    assert "inference fast" in capsys.readouterr().out


def test_an_isolated_candidate_is_built_as_run_bench_builds_it():
    """What each --isolated process builds (here in this process): the candidates with one set of weights (the
    fast model's logits equal the channels-last reference's to float32 rounding), bf16 weights where asked, and a
    training step."""
    spec = {"model": "lgd3d_tiny", "num_classes": 5, "device": "cpu", "compile_mode": None, "dtype": "fp32",
            "channels_last": False, "pass": "inference", "shape": (2, 3, 4, 32, 32), "warmup": 1}  # fmt: skip
    want, info = bench._isolated_candidate({**spec, "candidate": "reference_channels_last"})
    got, _ = bench._isolated_candidate({**spec, "candidate": "fast"})
    assert info["warmup_s"] > 0 and set(info) == {"warmup_s", "peak_memory_bytes"}
    a, b = got(), want()
    assert a.shape == (2, 5) and ((a - b).norm() / b.norm()).item() < 1e-5
    half, _ = bench._isolated_candidate({**spec, "candidate": "fast", "dtype": "bf16-weights"})
    assert half().dtype == torch.bfloat16
    step, _ = bench._isolated_candidate({**spec, "candidate": "fast", "pass": "training"})
    step()


def test_cli_bf16_prints_both_errors(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "lgd3d_tiny", "--batch", "1", "--frames", "4", "--size", "32", "--repeats", "1",
            "--no-compile", "--passes", "inference", "--no-progress", "--dtype", "bf16-weights",
            "--candidates", "reference,fast", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    accuracy = json.loads(out.read_text())["accuracy"]
    printed = capsys.readouterr().out
    ratio = max(accuracy["relative_error_vs_fp64"]["fast_over_reference"].values())
    assert f"max error {accuracy['logits_max_error_vs_fp32']:.2e} (the reference's" in printed
    assert f"the fast model's error is {ratio:.2f}x the reference's" in printed


def test_cli_default_output_is_a_named_folder_where_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--model", "lgd3d_tiny", "--batch", "1", "--frames", "4", "--size", "32", "--repeats", "1",
            "--no-compile", "--passes", "inference", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    written = sorted(p.name for p in (tmp_path / "lgd_bench").iterdir())
    assert written == ["bench_lgd3d_tiny_fp32_cpu.json", "bench_lgd3d_tiny_fp32_cpu.png"]
    assert not (tmp_path / "benchmarks").exists()
    assert "lgd_bench/bench_lgd3d_tiny_fp32_cpu.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,message",
    [({"passes": ("sideways",)}, "unknown candidates/passes"), ({"dtype": "fp8"}, "dtype must be one of fp32"),
     ({"repeats": 0}, "repeats >= 1"), ({"dtype": "bf16-weights"}, "times inference only, not the training pass")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.run_bench("lgd3d_tiny", progress=False, **kwargs)


def test_git_commit_outside_a_checkout_takes_the_named_commit_or_none(tmp_path, monkeypatch):
    """A copy of the tree without .git (the GPU machine's) records $LGD_FAST_COMMIT, said so, or no commit."""
    from lgd_fast.bench import git_commit

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path either
    monkeypatch.delenv("LGD_FAST_COMMIT", raising=False)
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("LGD_FAST_COMMIT", "0123456789abcdef")
    assert git_commit(tmp_path) == {"commit": "0123456789abcdef", "dirty": None, "commit_from": "LGD_FAST_COMMIT"}
    here = git_commit()  # this package's checkout, where it is one: git's own answer, whatever the variable says
    if here.get("commit_from") is None:
        assert here["commit"] not in (None, "0123456789abcdef")


def test_training_convs_script_counts_and_times_every_direction(monkeypatch):
    """benchmarks/run_training_convs.py: its FLOP count per conv call, summed over a forward, equals
    model_flops' hook count less the linear layers'; a call's three directions are timed (positive), the input
    gradient left out (0) where the model does not need it (the clip's conv); and stride-1 1x1x1 convs, only
    they, get the torch.mm timings."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run_training_convs as script

    torch.manual_seed(0)
    model = create_model("lgd3d_r50", 5)  # bottlenecks: stride-1 1x1x1 convs too
    x = torch.randn(1, 3, 8, 32, 32)
    calls = bench.model_convs(model, x, torch.autocast("cpu", enabled=False))
    linear = []  # the linear layers' FLOPs in one forward, counted as they run
    handles = [m.register_forward_hook(lambda m, i, o: linear.append(2 * o.numel() * m.in_features))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    assert sum(c["count"] * script.flops_of(c) for c in calls) == bench.model_flops(model, x) - sum(linear)
    gen = torch.Generator().manual_seed(0)
    stem = next(c for c in calls if not c["input_grad"])
    inner = next(c for c in calls if c["input_grad"] and tuple(c["weight"][2:]) == (1, 1, 1)
                 and tuple(c["stride"]) == (1, 1, 1))  # fmt: skip
    for call in (stem, inner):
        for layout in script.LAYOUTS.values():
            seconds = script.time_call(call, layout, gen, repeats=1)
            assert seconds["forward"] > 0 and seconds["weight_grad"] > 0
            assert (seconds["input_grad"] > 0) == call["input_grad"]
    assert script.time_gemm(stem, gen, repeats=1) is None
    gemm = script.time_gemm(inner, gen, repeats=1)
    assert all(gemm[d] > 0 for d in script.DIRECTIONS)


def _isolated_candidate(delay_s: float, fail: bool, dies: bool = False):
    """A candidate for _harness.time_isolated (module level: the spawned process imports it by name); ``dies``: its
    process exits with code 3 on the first call."""
    import os
    import time

    if fail:
        raise ValueError("this candidate cannot be built")
    call = (lambda: os._exit(3)) if dies else (lambda: time.sleep(delay_s))
    return call, {"pid": os.getpid(), "threads": torch.get_num_threads()}


def test_time_isolated_runs_each_candidate_in_a_process_of_its_own(monkeypatch):
    """benchmarks/_harness.py time_isolated: each candidate built and called in its own process (not this one),
    with this process's thread count; ``repeats`` bursts of ``burst`` calls each, the first of a burst left out,
    every kept sample at least the call's own sleep; a candidate that fails to build is named with its traceback,
    one whose process dies with its exit code, and the processes are gone afterwards."""
    import os
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import _harness

    builders = {"a": (_isolated_candidate, (0.002, False)), "b": (_isolated_candidate, (0.004, False))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)  # not what a spawned process starts with
    try:
        samples, infos = _harness.time_isolated(builders, repeats=3, warmup=1, burst=3)
        assert all(info["threads"] == torch.get_num_threads() for info in infos.values())
    finally:
        torch.set_num_threads(threads)
    assert {len(s) for s in samples.values()} == {6}
    assert min(samples["a"]) >= 0.002 and min(samples["b"]) >= 0.004
    pids = {info["pid"] for info in infos.values()}
    assert len(pids) == 2 and os.getpid() not in pids
    builders = {"a": builders["a"], "bad": (_isolated_candidate, (0.0, True))}  # a built one, then a failure
    with pytest.raises(RuntimeError, match=r"(?s)candidate 'bad' failed to build.*cannot be built"):
        _harness.time_isolated(builders, repeats=1, warmup=0)
    with pytest.raises(RuntimeError, match=r"candidate 'dies': its process ended with exit code 3"):
        _harness.time_isolated({"dies": (_isolated_candidate, (0.0, False, True))}, repeats=1, warmup=1)
    import multiprocessing

    assert not multiprocessing.active_children()


def test_convert_script_isolated_candidates_build_and_match(monkeypatch):
    """benchmarks/run_convert.py --isolated: what each candidate's process builds (here in this process, at a small
    clip): the converted model in inference and eval, recorded, and a training step of the converted model; the
    outputs equal the original's to float32 rounding, the plan and the conversion report come back."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run_convert as script

    shape = (1, 3, 4, 32, 32)
    for name in ("converted", "converted_recorded", "converted_eval", "original_channels_last"):
        call, info = script._isolated_inference("r3d", name, shape)
        call()
        assert info["output_rel_error"] < 1e-5, name
        assert ("execution_plan" in info) == name.startswith("converted")
    assert "conv run" in script._isolated_inference("r3d", "converted", shape)[1]["conversion_report"]
    call, _ = script._isolated_training("r3d", "converted", shape)
    call()
    with pytest.raises(ValueError, match="unknown inference candidate 'other'"):
        script._isolated_inference("r3d", "other", shape)


def test_isolated_bench_script_builds_candidates_as_bench_does(monkeypatch):
    """benchmarks/run_isolated_bench.py: what each candidate's process builds (here in this process, lgd3d_tiny at a
    small clip): lgd_fast.bench's candidates with the same weights, so the fast model's logits equal the
    channels-last reference's to float32 rounding, and a training step of the fast model runs."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run_isolated_bench as script

    shape = (2, 3, 4, 32, 32)
    _, want = script._build("lgd3d_tiny", "reference_channels_last", "inference", shape)
    call, got = script._build("lgd3d_tiny", "fast", "inference", shape)
    for a, b in zip(got["logits"], want["logits"], strict=True):
        assert script._rel(torch.tensor(a), torch.tensor(b)) < 1e-5
    assert call().shape == (2, script.NUM_CLASSES)
    step, info = script._build("lgd3d_tiny", "fast", "training", shape)
    step()
    assert info == {}


def test_conv_bn_script_times_every_candidate_against_the_conv_peak(monkeypatch, tmp_path):
    """benchmarks/run_conv_bn.py at a tiny case (the P3D path with a shortcut, a depthwise conv: both of conv_bn's
    eager ops), one repeat: every candidate timed, its conv-peak share computed from the run's own peak, and the
    fused output within float32 rounding of the modules'."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run_conv_bn as script

    cases = {"p3d": ((1, 8, 2, 6, 6), 16, (1, 3, 3), (1, 1, 1), 1, True),
             "depthwise": ((1, 8, 2, 6, 6), 8, (3, 3, 3), (1, 1, 1), 8, False)}  # fmt: skip
    monkeypatch.setattr(script, "CASES", cases)
    monkeypatch.setattr(script, "QUICK", tuple(cases))
    out = tmp_path / "conv_bn.json"
    script.main(["--quick", "--no-wait", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    peak = payload["conv_peak"]["fp32"]["gflops_per_s"]
    assert [r["case"] for r in payload["results"]] == ["p3d", "depthwise"] and peak > 1
    assert [r["p3d_geometry"] for r in payload["results"]] == [True, False]
    for row in payload["results"]:
        assert set(row["timings"]) == set(script.IMPLS) and row["fast_vs_modules_relative_error"] < 1e-5
        for name, timing in row["timings"].items():
            assert row["conv_peak_share"][name] == pytest.approx(row["gflop"] * 1e9 / (peak * 1e9) / timing["median_s"])
