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


def test_doctor_aot_reports_registers_spills_and_mma(capsys):  # triton comes with the dev install
    assert main(["doctor", "--aot", "sm_90a", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["aot"]
    assert rows and {r["target"] for r in rows} == {"sm_90a"}
    assert all(r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    fields = {"num_stages", "tf32", "stack_bytes", "shared_bytes", "mma", "load_bits", "divisible", "constexprs"}
    assert all(fields <= set(r) for r in rows)
    conv = [r for r in rows if r["kernel"].startswith("p3d_conv_")]
    assert conv and all(r["mma"] == "wgmma" and r["dtype"] == "bf16" and not r["tf32"] for r in conv)
    assert all("x_ptr" in r["divisible"] or "g_ptr" in r["divisible"] for r in conv)
    from lgd_fast import doctor

    header = doctor.format_rows(rows).splitlines()[0].split()  # the text table `doctor --aot` prints
    assert header[:2] == ["kernel", "config"] and {"registers", "spill_stores", "mma", "load_bits"} <= set(header)


def test_doctor_aot_exits_1_naming_the_spilled_builds(capsys, monkeypatch):
    from lgd_fast import doctor

    row = dict(kernel="p3d_conv_forward_spatial[fp32]", config="BLOCK_M=64,BLOCK_N=64,BLOCK_K=16", num_warps=4,
               num_stages=2, dtype="fp32", tf32=False, target="sm_90a", registers=128, spill_stores=4, spill_loads=4,
               stack_bytes=8, shared_bytes=8192, mma="fma", load_bits=[128])  # fmt: skip
    clean = {**row, "num_warps": 8, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0}
    monkeypatch.setattr(doctor, "aot_compile", lambda targets, dtypes: [row, clean])
    assert main(["doctor", "--aot", "sm_90a", "--dtypes", "fp32"]) == 1
    captured = capsys.readouterr()
    assert "p3d_conv_forward_spatial[fp32]" in captured.out
    assert "register spills in 1 of the kernel builds" in captured.err
    assert "p3d_conv_forward_spatial[fp32] [BLOCK_M=64,BLOCK_N=64,BLOCK_K=16, 4 warps, 2 stages, fp32] on sm_90a" in (
        captured.err
    )
    assert "8 warps" not in captured.err


def test_console_script_runs():
    assert shutil.which("lgd-fast"), "the lgd-fast console script is not on PATH: install with pip install -e ."
    done = subprocess.run(["lgd-fast", "info", "lgd3d_tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lgd3d_tiny" in done.stdout
