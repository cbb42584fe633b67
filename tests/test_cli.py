"""The `lgd-fast` command line (run in-process and as the installed console script)."""

import json
import shutil
import subprocess

import pytest

from lgd_fast.cli import main


def test_info_reports_parameters_flops_and_shapes(capsys):
    assert main(["info", "lgd3d_tiny", "--num-classes", "9", "--frames", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [1, 3, 8, 32, 32]
    assert info["outputs"] == {"local_map": [1, 128, 4, 1, 1], "global_vector": [1, 128], "logits": [1, 9]}
    p = info["parameters"]
    assert p["total"] == p["backbone"] + p["global_path"] + p["heads"] == p["trainable"]
    # FLOPs: the stem alone does 2 * (16 * 3 * 2 * 7 * 7) multiply-adds at each of its 4 x 16 x 16 outputs
    assert info["gflops_per_clip"] * 1e9 > 2 * 16 * 3 * 2 * 49 * 4 * 16 * 16


def test_info_table_and_models_listing(capsys):
    assert main(["info", "lgd2d_r18", "--classifier", "two_heads", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs per clip" in out and "(1, 400)" in out and "1x3x3x64x64" in out
    assert main(["models"]) == 0
    assert "lgd3d_r101" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "lgd3d_r5"], "Did you mean lgd3d_r50"),
        (["info", "lgd3d_tiny", "--frames", "1"], "give at least 2 frames"),
        (["info", "lgd2d_r18", "--early-stride", "2"], "LGD-3D models only"),
    ],
)
def test_info_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_flag_value_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["info", "lgd3d_tiny", "--batch", "0"])
    assert exc.value.code == 2


def test_doctor_reports_every_backend(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["cpu"]["cpp"] == "ok" and info["backends"]["cpu"]["onednn"] == "ok"
    assert set(info["backends"]["cuda"]) == {"cuda", "cpp", "onednn", "triton", "reference"}
    assert "CPU tensors only" in info["backends"]["cuda"]["onednn"]
    assert info["aot"] is None
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "backends on cpu:" in out and "lgd_fast._C_cuda" in out


def test_doctor_aot_bad_target_fails(capsys):
    assert main(["doctor", "--aot", "sm80"]) == 1
    assert "not of the form sm_80 / sm_90a" in capsys.readouterr().err


def test_doctor_aot_prints_registers_and_spills(capsys):  # triton comes with the dev install
    assert main(["doctor", "--aot", "sm_80", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["aot"]
    assert rows and {r["target"] for r in rows} == {"sm_80"}
    assert all(r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)


def test_console_script_runs():
    assert shutil.which("lgd-fast"), "the lgd-fast console script is not on PATH: install with pip install -e ."
    done = subprocess.run(["lgd-fast", "info", "lgd3d_tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lgd3d_tiny" in done.stdout
