"""The training engine: loss goes down, resume equals uninterrupted, SIGKILL then resume, NaN stop, configs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lgd_fast import create_model
from lgd_fast.cli import main
from lgd_fast.data.synthetic import make_dataset
from lgd_fast.engine import ConfigError, TrainingDiverged, load_checkpoint, load_config, train
from lgd_fast.engine.checkpoint import save_checkpoint

SMALL = [
    "data.resize_shorter=32", "data.crop=24", "data.clip_len=8", "data.test_clips=2", "data.workers=0",
    "data.backend=pyav", "optim.batch_size=8", "optim.lr=0.05", "optim.warmup_epochs=0.5", "model.name=lgd3d_tiny",
    "model.sketch_dim=64", "progress=false",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    make_dataset(root, classes=4, videos_per_class=6, frames=16, size=32, seed=1, progress=False)
    return str(root)


def _config(dataset, out, *extra, **flags):
    return load_config(None, [*SMALL, f"data.root={dataset}", f"out={out}", *extra], **flags)


def test_loss_goes_down_and_run_folder_is_complete(dataset, tmp_path):
    metrics = train(_config(dataset, tmp_path / "run", "epochs=4", "stage2_epochs=1"))
    losses = [row["train_loss"] for row in metrics["history"] if row["stage"] == 1]
    assert losses[-1] < losses[0] * 0.8, losses
    assert metrics["epoch"] == 5 and metrics["history"][-1]["stage"] == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["epoch"] == 5 and saved["val_top1"] == metrics["val_top1"] is not None
    for name in ("config.yaml", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 5 and state["stage"] == 2 and len(state["class_names"]) == 4
    assert load_config(tmp_path / "run" / "config.yaml").epochs == 4  # the resolved config reads back


@pytest.mark.parametrize("stop_at", [1, 2])  # in stage 1, and at the start of stage 2
def test_resume_ends_with_the_same_weights(dataset, tmp_path, monkeypatch, stop_at, caplog):
    import logging

    from lgd_fast.engine.train import Trainer

    caplog.set_level(logging.INFO, logger="lgd_fast.engine.train")
    train(_config(dataset, tmp_path / "full", "epochs=2", "stage2_epochs=1", "deterministic=true"))
    first = caplog.records[0].getMessage()
    assert first.startswith("training lgd3d_tiny on cpu: 2 stage-1 + 1 stage-2 epoch(s) (stage2_epochs) = 3 epochs")
    assert "16 training videos (0 left out), 8 validation videos, 4 classes" in first
    assert "starting a new run" in caplog.records[1].getMessage()
    real = Trainer._train_epoch

    def interrupted(self, epoch, *args):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return real(self, epoch, *args)

    seen = []
    monkeypatch.setattr(Trainer, "_train_epoch", lambda *a: seen.append(torch.are_deterministic_algorithms_enabled())
                        or interrupted(*a))  # fmt: skip
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyboardInterrupt):
        train(_config(dataset, tmp_path / "split", "epochs=2", "stage2_epochs=1", "deterministic=true"))
    # deterministic for the run's length, the process's own setting back afterwards (an interrupted run too)
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(Trainer, "_train_epoch", real)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["epoch"] == stop_at
    caplog.clear()
    train(_config(dataset, tmp_path / "split", "epochs=2", "stage2_epochs=1", "deterministic=true"))
    said = [r.getMessage() for r in caplog.records]
    assert f"resuming from {tmp_path / 'split' / 'checkpoints' / 'last.pt'} (epoch {stop_at}): stage " in said[1]
    assert ("stage 2 from epoch 3: the kernel classifier's loss, lr 0.05" in said) == (stop_at == 1)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_sigkill_then_resume_finishes(dataset, tmp_path):
    out = tmp_path / "killed"
    argv = ["train", "--data", dataset, "--out", str(out), "--epochs", "6", "--stage2-epochs", "0", "--no-progress"]
    argv += [a for item in SMALL for a in ("--set", item)]
    command = [sys.executable, "-m", "lgd_fast", *argv]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 6
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3, 4, 5, 6]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def _cli_command(dataset, out, *flags):
    argv = ["train", "--data", dataset, "--out", str(out), "--no-progress", *flags]
    argv += [a for item in [*SMALL, "optim.batch_size=4", "deterministic=true"] for a in ("--set", item)]
    return [sys.executable, "-m", "lgd_fast", *argv]


MID_EPOCH = ["--epochs", "2", "--stage2-epochs", "1", "--checkpoint-every-steps", "1"]  # 4 steps an epoch


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(_cli_command(dataset, out, *MID_EPOCH), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**load_checkpoint(out / "checkpoints" / "last.pt"), "out": out}


@pytest.mark.parametrize("kill_after", ["epoch 2, batch 1 of 4", "epoch 3, batch 2 of 4"])  # stage 1, stage 2
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(dataset, tmp_path, uninterrupted, kill_after):
    """SIGKILL right after a mid-epoch checkpoint (while the next step runs, or its checkpoint is being
    written); the resumed run must end bit for bit where the uninterrupted one did, history included."""
    out = tmp_path / "killed"
    command = _cli_command(dataset, out, *MID_EPOCH)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the CLI logs each checkpoint once it is on disk
        seen.append(line)
        if f"({kill_after}," in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {kill_after}:\n{''.join(seen)[-3000:]}"
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["in_epoch"] is not None, "killed at an epoch boundary, not mid-epoch"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "batch" in resumed.stderr.split("resuming from")[1].splitlines()[0]
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    assert final["epoch"] == uninterrupted["epoch"] == 3 and final["step"] == uninterrupted["step"] == 12
    assert final["in_epoch"] is None
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, final["model"][key]), key
    timing = ("epoch_seconds", "clips_per_s")
    strip = [{k: v for k, v in row.items() if k not in timing} for row in final["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in timing} for row in uninterrupted["history"]]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # TensorBoard: one loss per step, 1..12, those of the uninterrupted run (the killed run's later ones purged)
    steps, values = _scalars(out / "tensorboard", "train/loss_step")
    ref_steps, ref_values = _scalars(uninterrupted["out"] / "tensorboard", "train/loss_step")
    assert steps == ref_steps == list(range(1, 13)) and values == ref_values


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(dataset, tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("lgd_fast.engine.train")  # the package re-exports train()
    real = train_module.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] > 2 * 4 else loss  # two losses a step: step 5 turns NaN

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned)
    config = _config(dataset, tmp_path / "nan", "epochs=3", "stage2_epochs=0")
    # 16 training videos (4 classes x 4), batch 8: 2 steps an epoch, so step 5 is the first of epoch 3
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5 \(epoch 3, stage 1\).*last.pt \(epoch 2\)"):
        train(config)
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")["epoch"] == 2


def test_curves_mark_the_stages(tmp_path):
    from lgd_fast.engine.train import _plot_curves, stage_spans

    rows = [{"epoch": e, "stage": 1 if e <= 3 else 2, "train_loss": 3.0 / e, "train_top1": e / 6} for e in range(1, 6)]
    rows[2]["val_top1"] = 0.5
    assert stage_spans(rows) == [(1, 1, 3), (2, 4, 5)]
    assert stage_spans(rows[:3]) == [(1, 1, 3)] and stage_spans([]) == []
    import matplotlib.image

    marked, plain = tmp_path / "marked.png", tmp_path / "plain.png"
    _plot_curves(rows, marked)
    _plot_curves([{**r, "stage": 1} for r in rows], plain)
    a, b = matplotlib.image.imread(marked)[..., :3], matplotlib.image.imread(plain)[..., :3]
    # the shaded stage 2: tab:orange at alpha 0.12 over white is about (1.0, 0.94, 0.89)
    orange = (a[..., 0] > 0.97) & (a[..., 1] < 0.97) & (a[..., 2] < a[..., 1] - 0.03)
    assert a.shape == b.shape and orange.sum() > 2000 and abs(b - a).max() > 0.2


def test_a_wrong_model_name_is_reported_before_any_video_is_read(tmp_path, capsys, monkeypatch):
    import importlib

    train_module = importlib.import_module("lgd_fast.engine.train")  # the package re-exports train()

    def no_probe(*args, **kwargs):
        raise AssertionError("the data was read before the model name was checked")

    monkeypatch.setattr(train_module, "VideoClipLoader", no_probe)
    data = tmp_path / "data"
    data.mkdir()
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "lgd3d_r05"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown model 'lgd3d_r05'" in err and "lgd3d_r50" in err


@pytest.mark.parametrize("value", ["false", "true", "auto", "False", "'false'"])
def test_tensorboard_switch_takes_true_and_false(tmp_path, value):
    """README: --set tensorboard=false turns the scalars off, true makes a missing package an error; YAML reads the
    bare words as booleans, which the string key takes as the words (from --set and from a config file alike)."""
    word = value.strip("'").lower()
    assert load_config(None, [f"tensorboard={value}"]).tensorboard == word
    path = tmp_path / "c.yaml"
    path.write_text(f"tensorboard: {value}\n")
    assert load_config(path).tensorboard == word
    with pytest.raises(ConfigError, match="tensorboard must be auto, true or false"):
        load_config(None, ["tensorboard=maybe"])


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\noptim:\n  lr: 0.5\n  batch_size: 4\nmodel:\n  name: lgd3d_r18\n")
    config = load_config(path, ["optim.lr=0.25"], model__name="lgd3d_tiny")
    assert (config.epochs, config.optim.lr, config.optim.batch_size, config.model.name) == (7, 0.25, 4, "lgd3d_tiny")
    assert config.optim.momentum == 0.9 and config.optim.nesterov  # untouched defaults stay


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("optim:\n  lrr: 0.1\n", [], "unknown config key 'optim.lrr'.*c.yaml"),
        ("", ["optim.lr=fast"], "optim.lr .*must be float, got 'fast'"),
        ("", ["amp=fp8"], "amp must be none, bf16 or fp16"),
        ("", ["dtype=float16"], "dtype must be float32 or float64"),
        ("", ["dtype=float64", "amp=bf16"], "dtype=float64 trains without autocast: set amp=none"),
        ("epochs: [1, 2]\n", [], "epochs .*must be int"),
        ("- 1\n", [], "must hold a mapping"),
        ("", ["optim"], "--set takes key=value"),
        ("", ["max_steps_per_epoch=-1"], "max_steps_per_epoch must be >= 0"),  # (it trained nothing, quietly)
        ("", ["optim.momentum=-3"], r"optim.momentum must be in \[0, 1\)"),
        ("", ["optim.momentum=0"], "optim.nesterov needs optim.momentum > 0"),
        ("", ["optim.stage2_lr_scale=-1"], "optim.stage2_lr_scale must be > 0"),
        ("", ["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
        ("", ["data.clip_len=0"], "data.clip_len, step, .* must be >= 1"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_cli_train_then_eval(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--data", dataset, "--out", str(out), "--epochs", "1", "--stage2-epochs", "1"]
    assert main(argv + [a for item in SMALL for a in ("--set", item)]) == 0
    assert "val top-1" in capsys.readouterr().out
    assert main(["eval", "--data", dataset, "--checkpoint", str(out / "checkpoints" / "last.pt")]) == 0
    assert "probing videos" in capsys.readouterr().err  # eval, extract and predict show their probing
    assert main(["eval", "--data", dataset, "--checkpoint", str(out / "checkpoints" / "last.pt"), "--no-progress"]) == 0
    assert "probing videos" not in capsys.readouterr().err
    assert (out / "eval.json").exists() and (out / "eval_confusion.png").exists()
    result = json.loads((out / "eval.json").read_text())
    assert result["num_videos"] == 8 and 0.0 <= result["top1"] <= 1.0
    checkpoint = str(out / "checkpoints" / "last.pt")
    for name in ("features.npz", "features.safetensors"):
        assert main(["extract", "--data", dataset, "--checkpoint", checkpoint, "--out", str(out / name)]) == 0
    features = np.load(out / "features.npz")  # no pickle needed, paths included
    assert features["local"].shape == features["global"].shape == (8, 128)  # lgd3d_tiny: 128 channels
    assert sorted(features["labels"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    listed = [os.path.normpath(os.path.join(dataset, line.rsplit(" ", 1)[0]))
              for line in open(os.path.join(dataset, "val.txt")).read().splitlines()]  # fmt: skip
    assert features["paths"].tolist() == [listed[i] for i in features["video_ids"]]
    from safetensors import safe_open

    with safe_open(str(out / "features.safetensors"), "np") as f:
        assert json.loads(f.metadata()["paths"]) == features["paths"].tolist()
    capsys.readouterr()
    assert main(["extract", "--data", dataset, "--checkpoint", checkpoint, "--out", str(out / "feats.pt")]) == 2
    assert "written as .npz or .safetensors, not '.pt'" in capsys.readouterr().err
    assert not list(out.glob("feats.pt*"))
    assert main(["train", "--data", dataset, "--out", str(tmp_path / "x"), "--set", "optim.bogus=1"]) == 2
    assert "unknown config key 'optim.bogus'" in capsys.readouterr().err
    swapped = tmp_path / "swapped"  # the data's class index in another order: its labels name other classes
    shutil.copytree(dataset, swapped)
    names = (swapped / "classes.txt").read_text().splitlines()
    (swapped / "classes.txt").write_text("\n".join([*names[:2], names[3], names[2]]) + "\n")
    for command in ("eval", "extract"):
        argv = [command, "--data", str(swapped), "--checkpoint", checkpoint, "--out", str(tmp_path / "e.npz")]
        assert main(argv) == 2
        assert "differs from the checkpoint's class names (4) from label 2 on" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["model.fast=true", "amp=bf16", "model.channels_last=true"],
        ["model.compile=true", "max_steps_per_epoch=2"],
        ["amp=fp16", "optim.grad_clip=5.0", "max_steps_per_epoch=3"],
    ],
    ids=["fast-bf16-channels_last", "compile", "fp16-scaler"],
)
def test_training_switches_run(dataset, tmp_path, flags):
    """--fast, --amp bf16/fp16, --channels-last and --compile train, validate and checkpoint (losses finite)."""
    metrics = train(_config(dataset, tmp_path / "run", "epochs=1", "stage2_epochs=1", *flags))
    assert metrics["epoch"] == 2 and all(np.isfinite(row["train_loss"]) for row in metrics["history"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod.") for key in state["model"])  # compile does not rename the keys
    if "model.fast=true" in flags:  # the plan of the first step, as the log says
        assert (tmp_path / "run" / "plan.txt").read_text().startswith("execution plan of ")
    if "amp=fp16" in flags:  # the loss scaler's state is checkpointed and read back on resume
        assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
        # a scale no fresh scaler reaches in 3 steps (65536, halved at most once a step on overflow): the resumed
        # run goes on from it (grown only after 2000 clean steps)
        state["scaler"].update(scale=1024.0, _growth_tracker=5)
        save_checkpoint(state, tmp_path / "run" / "checkpoints" / "last.pt")
        metrics = train(_config(dataset, tmp_path / "run", "epochs=1", "stage2_epochs=2", *flags))
        assert metrics["epoch"] == 3
        resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]
        assert resumed["scale"] <= 1024.0 and resumed["_growth_tracker"] <= 5 + 3, resumed  # (3 steps more)
    else:
        assert state["scaler"] == {}


def test_a_failed_validation_keeps_the_epoch_it_follows(dataset, tmp_path, monkeypatch):
    """Validation runs before the epoch's checkpoint: when it fails (out of memory, no readable video, Ctrl-C), the
    epoch's training is saved first, and a rerun validates it, then goes on (the last epoch's too)."""
    from lgd_fast.engine.train import Trainer

    def fails(self):
        raise RuntimeError("validation failed")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_validate", fails)
        with pytest.raises(RuntimeError, match="validation failed"):
            train(_config(dataset, tmp_path / "v", "epochs=2", "stage2_epochs=0"))
    state = load_checkpoint(tmp_path / "v" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["in_epoch"] is None and "val_top1" not in state["history"][0]
    assert state["validation_pending"]
    metrics = train(_config(dataset, tmp_path / "v", "epochs=2", "stage2_epochs=0"))  # validates epoch 1 first
    assert metrics["epoch"] == 2 and [("val_top1" in r) for r in metrics["history"]] == [True, True]
    with monkeypatch.context() as patch:  # the last epoch's validation stopped: the rerun runs it, and only it
        patch.setattr(Trainer, "_validate", fails)
        with pytest.raises(RuntimeError, match="validation failed"):
            train(_config(dataset, tmp_path / "w", "epochs=1", "stage2_epochs=0"))
    metrics = train(_config(dataset, tmp_path / "w", "epochs=1", "stage2_epochs=0"))
    assert [r["epoch"] for r in metrics["history"]] == [1] and metrics["val_top1"] is not None
    assert not load_checkpoint(tmp_path / "w" / "checkpoints" / "last.pt")["validation_pending"]


def test_fused_sgd_state_follows_the_parameters_layout(gen):
    """A momentum buffer saved from a channels-last model and loaded for a contiguous one keeps its strides; torch's
    fused SGD then pairs each weight with another's momentum (no error). match_state_layouts puts it in the
    parameter's layout: the fused step equals the per-parameter one."""
    from lgd_fast.engine.train import match_state_layouts

    def step(model, optimizer, x):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    x = torch.randn(2, 3, 4, 6, 6, generator=gen)
    saved = torch.nn.Conv3d(3, 5, (1, 3, 3), bias=False).to(memory_format=torch.channels_last_3d)
    first = torch.optim.SGD(saved.parameters(), lr=0.1, momentum=0.9, fused=True)
    step(saved, first, x.contiguous(memory_format=torch.channels_last_3d))
    state = first.state_dict()
    assert not first.state[saved.weight]["momentum_buffer"].is_contiguous()  # (the case: a channels-last buffer)
    runs = {}
    for fused in (True, False):
        model = torch.nn.Conv3d(3, 5, (1, 3, 3), bias=False)
        model.load_state_dict(saved.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused or None, foreach=False)
        optimizer.load_state_dict(state)
        assert match_state_layouts(optimizer) == 1
        assert optimizer.state[model.weight]["momentum_buffer"].stride() == model.weight.stride()
        step(model, optimizer, x)
        runs[fused] = model.weight.detach()
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=1e-6)


def test_resume_across_a_channels_last_switch_keeps_the_optimizer_state_in_layout(dataset, tmp_path):
    """A run saved with --channels-last and resumed without it (and back): the loaded momentum buffers take the
    parameters' layout (the fused SGD would otherwise mix them up silently)."""
    train(_config(dataset, tmp_path / "r", "epochs=1", "stage2_epochs=0", "model.channels_last=true",
                  "max_steps_per_epoch=2"))  # fmt: skip
    for epochs, channels_last in ((2, "false"), (3, "true")):
        train(_config(dataset, tmp_path / "r", f"epochs={epochs}", "stage2_epochs=0",
                      f"model.channels_last={channels_last}", "max_steps_per_epoch=2"))  # fmt: skip
        state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
        buffers = [s.get("momentum_buffer") for s in state["optimizer"]["state"].values()]
        convs = [b for b in buffers if b is not None and b.dim() == 5 and b.shape[2:] != (1, 1, 1)]
        assert convs and all(b.is_contiguous() == (channels_last == "false") for b in convs), channels_last


def test_resuming_with_another_model_is_refused(dataset, tmp_path):
    train(_config(dataset, tmp_path / "r", "epochs=1", "stage2_epochs=0"))
    with pytest.raises(ValueError, match="model.classifier='kernel'.*another --out"):
        train(_config(dataset, tmp_path / "r", "epochs=2", "model.classifier=two_heads"))
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    names = list(state["class_names"])
    save_checkpoint({**state, "class_names": [names[1], names[0], *names[2:]]}, path)  # same count, other meaning
    with pytest.raises(ValueError, match=f"other class names \\(label 0: '{names[1]}' -> '{names[0]}'; label 1"):
        train(_config(dataset, tmp_path / "r", "epochs=2", "stage2_epochs=0"))
    # stopped after batch 1 of epoch 2: its remaining batches are the plan of its seed and batch size
    steps = state["step"]
    in_epoch = {"batches": 1, "of": steps, "processes": 1, "position": 1, "sums": [0.0, 0.0, 0.0], "seconds": 1.0,
                "skipped": []}  # fmt: skip
    save_checkpoint({**state, "in_epoch": in_epoch}, path)
    with pytest.raises(ValueError, match=f"stopped within an epoch.* but seed 0 -> 5, steps per epoch {steps} -> "):
        train(_config(dataset, tmp_path / "r", "epochs=2", "stage2_epochs=0", "seed=5", "max_steps_per_epoch=1"))
    metrics = train(_config(dataset, tmp_path / "r", "epochs=2", "stage2_epochs=0"))  # its own settings: resumes
    assert metrics["epoch"] == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_init_from_replaces_heads_of_another_label_set(dataset, tmp_path, caplog):
    train(_config(dataset, tmp_path / "src", "epochs=1", "stage2_epochs=0"))
    other = tmp_path / "two"
    make_dataset(other, classes=2, videos_per_class=4, frames=16, size=32, seed=2, progress=False)
    config = _config(str(other), tmp_path / "dst", "epochs=1", "stage2_epochs=0",
                     f"model.init_from={tmp_path / 'src' / 'checkpoints' / 'last.pt'}")
    caplog.set_level("WARNING")
    train(config)
    assert "replaced (new shape, kept initialised)" in caplog.text and "fc.weight" in caplog.text


def test_init_from_reads_wrapped_state_dicts_and_refuses_a_file_that_fits_nothing(tmp_path, caplog):
    """model.init_from: an lgd_fast checkpoint under any name, a plain state dict, or one under "state_dict"
    (mmaction2, Lightning) or "model_state" (PySlowFast) fine-tunes; a file none of whose tensors fits the model
    is an error (it read as a flat state dict and trained from scratch after a warning), an unreadable one too."""
    from types import SimpleNamespace

    from lgd_fast.engine.train import Trainer

    source = create_model("lgd3d_tiny", 4, classifier="two_heads")
    weights = source.state_dict()
    wrapped = {f"module.{k}": v for k, v in weights.items()}  # (DDP's names)
    for name, payload in [("run.pth", {"model": weights, "epoch": 3}), ("plain.pt", weights),
                          ("mm.pth", {"state_dict": weights, "meta": {"epoch": 1}}),
                          ("slowfast.pyth", {"model_state": wrapped})]:  # fmt: skip
        torch.save(payload, tmp_path / name)
        target = SimpleNamespace(model=create_model("lgd3d_tiny", 4, classifier="two_heads"), rank=0,
                                 config=SimpleNamespace(model=SimpleNamespace(name="lgd3d_tiny")))  # fmt: skip
        Trainer._init_from(target, str(tmp_path / name))
        assert target.init_report["loaded"] == len(weights) and not target.init_report["missing"], name
        assert all(torch.equal(v, weights[k]) for k, v in target.model.state_dict().items()), name
    fresh = create_model("lgd3d_tiny", 4, classifier="two_heads").state_dict()
    assert not all(torch.equal(v, weights[k]) for k, v in fresh.items())  # (a fresh model's differ)
    torch.save({"state_dict": {"backbone.conv1.weight": torch.ones(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: none of its 1 tensors fits lgd3d_tiny .*backbone.conv1.weight"):
        Trainer._init_from(target, str(tmp_path / "other.pth"))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "run.pth").read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.pth: cannot read its weights: its zip archive is damaged"):
        Trainer._init_from(target, str(tmp_path / "cut.pth"))
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        Trainer._init_from(target, str(tmp_path / "absent.pth"))


def test_demo_meets_its_targets(tmp_path, capsys):
    """The README's main job exactly as a user runs it (defaults): within 10 minutes on this machine, at least
    90% val top-1 on held-out videos, and the time-reversed control at most 10% (each reversed video is its
    twin's: a model that reads temporal order gets it wrong)."""
    start = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "val top-1" in out and "reversed top-1" in out and "train step clips/s" in out
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["num_classes"] == 8 and metrics["val_videos"] == 80
    assert metrics["val_top1"] >= 0.9, metrics
    assert metrics["reversed_top1"] <= 0.1 and metrics["reversed_predicted_as_twin"] >= 0.8, metrics
    assert seconds <= 600 and metrics["seconds"]["total"] <= 600, seconds
    assert metrics["speed"]["fast"]["inference_clips_per_s"] > 0
    for name in ("eval.json", "eval_reversed.json", "eval_confusion.png", "run/curves.png"):
        assert (tmp_path / "demo" / name).exists(), name
    # lgd-fast predict on the held-out videos: eval's per-video top-5, class names in order
    evaluated = json.loads((tmp_path / "demo" / "eval.json").read_text())
    names = evaluated["class_names"]
    videos = [line.rsplit(" ", 1)[0] for line in (tmp_path / "demo" / "data" / "val.txt").read_text().splitlines()]
    videos = [str(tmp_path / "demo" / "data" / v) for v in videos]
    checkpoint = str(tmp_path / "demo" / "run" / "checkpoints" / "last.pt")
    assert main(["predict", "--checkpoint", checkpoint, "--json", *videos]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(videos) == evaluated["num_videos"] == 80
    for row, scores in zip(rows, evaluated["scores"], strict=True):  # eval's videos are in val.txt's order
        top5 = torch.tensor(scores).topk(5).indices.tolist()
        assert [t["class"] for t in row["top"]] == [names[c] for c in top5], row["video"]


@pytest.mark.parametrize("norm, fast", [("sync_batchnorm", False), ("norm_eval", False), ("sync_batchnorm", True)])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(dataset, tmp_path, norm, fast, monkeypatch):
    """torchrun, 2 processes on this CPU (gloo), global batch 8 = 2 x 4, against 1 process with batch 8.

    No dropout. BatchNorm in training mode, synchronised over the processes (statistics of the global batch),
    or on running statistics (model.norm_eval): either way each process's loss is the mean over its half of
    the global batch and DDP's gradient average is the single-process gradient. The fast model's fused convs
    merge their statistics over the processes themselves: the plan "fused" makes every layer take its fused code
    (at these small frames the default rule would run the blocks' own modules, here synchronised BatchNorms).

    In float64 (``dtype=float64``): the loss has kinks (ReLU), and float32 rounding puts runs on either side of
    one. Measured in float32: at step 2, float64 gradients at parameters 1.4e-6 apart (2 processes against 1)
    differed by 8.5e-3, and from there the runs trained apart (epoch-2 loss 0.17%), with every step's gradient
    right to 2e-6; with seeds 1 and 3 the reference model's comparison failed the same way. float64's rounding
    is ten orders of magnitude below such margins."""
    common = [*SMALL, f"data.root={dataset}", "epochs=2", "stage2_epochs=1", f"model.norm_eval={norm == 'norm_eval'}",
              "model.dropout=0.0", "data.backend=pyav", f"model.fast={fast}", "dtype=float64"]
    if fast:
        monkeypatch.setenv("LGD_FAST_PLAN", "fused")  # this process and torchrun's
    single = tmp_path / "single"
    train(load_config(None, [*common, f"out={single}"]))
    pair = tmp_path / "pair"
    argv = ["train", "--out", str(pair), "--no-progress", *[a for item in common for a in ("--set", item)]]
    argv += ["--checkpoint-every-steps", "1"]  # mid-epoch checkpoints: every rank joins the sums' all-reduce
    # --standalone: the rendezvous on a free port of localhost (a fixed port fails while anything else holds it)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lgd_fast", *argv]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            _, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:  # SIGTERM: torchrun stops its workers (each in a session of its own)
            process.terminate()
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, stderr[-4000:]
    a = load_checkpoint(single / "checkpoints" / "last.pt")
    b = load_checkpoint(pair / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    if fast:  # every block and unit of both runs took the fused code
        for run in (single, pair):
            choices = [line for line in (run / "plan.txt").read_text().splitlines() if line.startswith("    ")]
            assert len(choices) == 5 and all(line.endswith("plan fused") for line in choices[1:]), choices
    for key, value in a["model"].items():
        if value.is_floating_point():  # the same up to the order of float additions
            assert value.dtype == torch.float64, key
            assert ((value - b["model"][key]).norm() <= 1e-10 * value.norm() + 1e-12), key
    losses = [(r["train_loss"], s["train_loss"]) for r, s in zip(a["history"], b["history"], strict=True)]
    assert all(abs(x - y) <= 1e-10 * abs(x) for x, y in losses), losses


def _step_agreement(rank: int, world: int, init: str, batches: list, answers) -> None:
    """One process of test_a_step_missing_on_one_process_is_skipped_on_all (module level: spawned by name)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from lgd_fast.engine.train import Trainer

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        skipped = [(f"rank{rank}.webm", "truncated")] * (rank + 1)  # each process's own part of the data
        loader = SimpleNamespace(skipped=skipped)
        trainer = SimpleNamespace(distributed=True, rank=rank, world=world, train_loader=loader)
        agreed = [Trainer._every_process_has(trainer, b) for b in batches[rank]]
        answers.put((rank, agreed, Trainer._every_process_skipped(trainer)))
    finally:
        dist.destroy_process_group()


def test_a_step_missing_on_one_process_is_skipped_on_all(tmp_path):
    """A process whose part of a global batch was all unreadable gets None from its loader (yield_empty); every
    process then skips that step together (one process a step short of the others would hang DDP). The skipped
    clips the run reports and checkpoints are every process's, not rank 0's alone."""
    import torch.multiprocessing as mp

    from lgd_fast.engine.train import Trainer

    assert Trainer._every_process_has(type("T", (), {"distributed": False})(), None) is False
    batches = [["b", None, "b", "b"], ["b", "b", "b", None]]  # rank 0 lacks step 2, rank 1 step 4
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    workers = [ctx.Process(target=_step_agreement, args=(r, 2, init, batches, answers)) for r in range(2)]
    for w in workers:
        w.start()
    got = {rank: rest for rank, *rest in (answers.get(timeout=120) for _ in workers)}
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    skipped = [("rank0.webm", "truncated"), ("rank1.webm", "truncated"), ("rank1.webm", "truncated")]
    assert got == {0: [[True, False, True, False], skipped], 1: [[True, False, True, False], skipped]}


def test_sync_batchnorm_is_batchnorm_outside_a_process_group(gen):
    from lgd_fast.engine.sync_bn import SyncBatchNorm, convert_sync_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv3d(3, 5, 1), torch.nn.BatchNorm3d(5, momentum=None), torch.nn.ReLU())
    torch.nn.init.normal_(net[1].weight, generator=gen)
    converted = convert_sync_batchnorm(copy.deepcopy(net))
    assert isinstance(converted[1], SyncBatchNorm) and converted.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(2, 3, 4, 5, 5, generator=gen)
    for mode in (True, False):
        net.train(mode), converted.train(mode)
        torch.testing.assert_close(converted(x), net(x))
    torch.testing.assert_close(converted.state_dict(), net.state_dict())


def test_the_recipe_sgd_is_fused_and_updates_as_the_per_parameter_loop(gen):
    """make_sgd: torch's fused SGD (one kernel over every parameter) with the recipe's momentum, Nesterov and
    weight decay; three steps on fresh gradients move the parameters as the per-parameter SGD does, to rounding."""
    from lgd_fast.engine.config import OptimConfig
    from lgd_fast.engine.train import make_sgd

    recipe = OptimConfig()
    params = [torch.randn(shape, generator=gen) for shape in ((7, 5, 1, 3, 3), (7,), (13, 3))]
    fused_params = [torch.nn.Parameter(p.clone()) for p in params]
    loop_params = [torch.nn.Parameter(p.clone()) for p in params]
    fused = make_sgd(fused_params, recipe, lr=0.1)
    loop = torch.optim.SGD(loop_params, lr=0.1, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay, foreach=False)  # fmt: skip
    assert fused.defaults["fused"] and recipe.nesterov and recipe.weight_decay > 0
    for _ in range(3):
        for a, b in zip(fused_params, loop_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step(), loop.step()
    for a, b, start in zip(fused_params, loop_params, params, strict=True):
        moved = (b.detach() - start).norm()
        assert moved > 0.1 and (a.detach() - b.detach()).norm() <= 1e-6 * moved
