"""`lgd-fast check-data` (a table of failures, exit 1 if any) and `lgd-fast make-dataset` from the command line."""

from __future__ import annotations

import pytest

from lgd_fast.cli import main
from video_testing import truncate, write_video


@pytest.fixture
def dataset(tmp_path):
    good = [write_video(tmp_path / f"good{i}", 12 + i, seed=i) for i in range(3)]
    truncate(good[0], tmp_path / "cut.webm", 0.4)
    (tmp_path / "empty.webm").write_bytes(b"")
    return tmp_path, good


def _write_list(root, names):
    path = root / "train.txt"
    path.write_text("".join(f"{name} {i % 2}\n" for i, name in enumerate(names)))
    return str(path)


@pytest.mark.parametrize("backend", ["auto", "dali", "pyav"])
def test_all_good_exits_zero(dataset, backend, capsys):
    root, good = dataset
    listing = _write_list(root, [p.rsplit("/", 1)[1] for p in good])
    assert main(["check-data", listing, "--backend", backend]) == 0
    assert "3 of 3 videos decoded" in capsys.readouterr().out


def test_failures_are_tabulated_and_exit_one(dataset, capsys):
    root, good = dataset
    listing = _write_list(root, ["good0.webm", "cut.webm", "empty.webm", "gone.webm", "good1.webm"])
    assert main(["check-data", listing]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0].rsplit("/", 1)[-1]: line for line in out.splitlines() if line.startswith(str(root))}
    assert set(lines) == {"cut.webm", "empty.webm", "gone.webm"}
    assert "truncated" in lines["cut.webm"] and "empty file" in lines["empty.webm"]
    assert "file not found" in lines["gone.webm"]
    assert "2 of 5 videos decoded" in out and "3 failed" in out


def test_malformed_annotation_line_is_a_clear_error(dataset, capsys):
    root, _ = dataset
    listing = root / "bad.txt"
    listing.write_text("good0.webm 0\ngood1.webm one\n")
    assert main(["check-data", str(listing)]) == 2
    err = capsys.readouterr().err
    assert "bad.txt:2:" in err and "not an integer" in err


def test_make_dataset_then_check_data(tmp_path, capsys):
    out = tmp_path / "motion"
    argv = ["make-dataset", str(out), "--classes", "2", "--videos-per-class", "3", "--frames", "12", "--size", "32"]
    assert main(argv) == 0
    assert "2 classes" in capsys.readouterr().out
    assert main(["check-data", str(out / "train.txt"), "--class-index", str(out / "classes.txt")]) == 0
    assert "videos decoded" in capsys.readouterr().out
    assert main([*argv[:3], "4"]) == 2  # same folder, other parameters: refused, clearly
    assert "other parameters" in capsys.readouterr().err


def test_labels_are_checked_against_the_class_count_training_uses(dataset, capsys):
    """A classes.txt beside the list is the class index training reads: label 99 of 8 classes is an error."""
    root, good = dataset
    names = [p.rsplit("/", 1)[1] for p in good]
    listing = root / "train.txt"
    listing.write_text(f"{names[0]} 0\n{names[1]} 99\n")
    assert main(["check-data", str(listing)]) == 0  # no class index anywhere: said, not silent
    assert "labels not checked against a class count" in capsys.readouterr().out
    (root / "classes.txt").write_text("".join(f"class{i}\n" for i in range(8)))
    assert main(["check-data", str(listing)]) == 2
    err = capsys.readouterr().err
    assert "train.txt:2:" in err and "label 99 is out of range for 8 classes" in err
    listing.write_text(f"{names[0]} 0\n{names[1]} 7\n")
    assert main(["check-data", str(listing)]) == 0
    assert f"labels checked against {root / 'classes.txt'} (8 classes)" in capsys.readouterr().out
