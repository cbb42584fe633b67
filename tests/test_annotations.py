"""Annotation readers: Kinetics CSV, path-label lists, class folders, class index files, sharding."""

from __future__ import annotations

import os

import pytest

from lgd_fast.data.annotations import (
    AnnotationError,
    VideoRecord,
    detect_format,
    missing_videos,
    read_annotations,
    read_class_index,
    shard,
    write_class_index,
)


def _touch(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _expect_error(path, line_no: int, *args, **kwargs) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        read_annotations(path, *args, **kwargs)
    message = str(info.value)
    assert os.path.basename(path) in message
    assert f"{os.path.basename(path)}:{line_no}:" in message
    assert info.value.line_no == line_no
    return info.value


# ---- class index ----


def test_class_index_round_trip(tmp_path):
    names = ["abseiling", "air drumming", "passing American football (in game)", "bending, metal", "zumba"]
    path = tmp_path / "classes.txt"
    write_class_index(path, names)
    assert read_class_index(path) == names


def test_class_index_trailing_blank_lines_ignored(tmp_path):
    assert read_class_index(_write(tmp_path / "c.txt", "a\nb\n\n\n")) == ["a", "b"]


@pytest.mark.parametrize(
    "text,line_no,reason",
    [("a\n\nb\n", 2, "blank line"), ("a\nb\nc\nb\n", 4, "repeats line 2"), ("a\n  \nb\n", 2, "blank line")],
)
def test_class_index_errors(tmp_path, text, line_no, reason):
    path = _write(tmp_path / "bad_classes.txt", text)
    with pytest.raises(AnnotationError, match=reason) as info:
        read_class_index(path)
    assert f"bad_classes.txt:{line_no}:" in str(info.value)


def test_class_index_empty_and_unwritable(tmp_path):
    with pytest.raises(AnnotationError, match="no class names"):
        read_class_index(_write(tmp_path / "empty.txt", "\n"))
    for names in ([], ["a", "a"], ["a\nb"], [" padded"], [""]):
        with pytest.raises(ValueError):
            write_class_index(tmp_path / "out.txt", names)


# ---- format detection ----


def test_detect_format(tmp_path):
    assert detect_format(tmp_path) == "folder"
    assert detect_format(tmp_path / "train.csv") == "kinetics_csv"
    assert detect_format(tmp_path / "TRAIN.CSV") == "kinetics_csv"
    assert detect_format(tmp_path / "train.txt") == "list"
    assert detect_format(tmp_path / "trainlist01") == "list"


def test_unknown_format_and_misplaced_split(tmp_path):
    path = _write(tmp_path / "a.txt", "a.mp4 0\n")
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotations(path, fmt="json")
    with pytest.raises(ValueError, match="split"):
        read_annotations(path, split="train")


# ---- Kinetics CSV ----

KINETICS_HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"


def test_kinetics_label_folders(tmp_path):
    root = tmp_path / "videos"
    a = _touch(root / "abseiling" / "aaa_000010_000020.mp4")
    b = _touch(root / "air_drumming" / "bbb_000000_000010.webm")  # underscore folder, .webm
    c = _touch(root / "air_drumming" / "ccc_000005_000015.mkv")
    csv_path = _write(
        tmp_path / "train.csv",
        KINETICS_HEADER
        + "abseiling,aaa,10,20,train,0\n"
        + "air drumming,bbb,0,10,train,0\n"
        + '"air drumming",ccc,5,15,train,1\n',
    )
    records = read_annotations(csv_path, root=root)
    assert records == [VideoRecord(a, 0), VideoRecord(b, 1), VideoRecord(c, 1)]
    assert all(os.path.isabs(r.path) for r in records)
    assert missing_videos(records) == []


def test_kinetics_flat_root_and_default_root(tmp_path):
    a = _touch(tmp_path / "aaa_000010_000020.mp4")
    b = _touch(tmp_path / "bbb_000000_000010.mp4")
    csv_path = _write(tmp_path / "val.csv", "label,youtube_id,time_start,time_end,split\nzumba,aaa,10,20,val\n"
                      "abseiling,bbb,0,10,val\n")
    assert read_annotations(csv_path) == [VideoRecord(a, 1), VideoRecord(b, 0)]  # sorted labels: abseiling, zumba


def test_kinetics_quoted_labels_with_commas(tmp_path):
    a = _touch(tmp_path / "bending, metal" / "aaa_000001_000011.mp4")
    b = _touch(tmp_path / "dancing_gangnam_style" / "bbb_000002_000012.mp4")
    csv_path = _write(tmp_path / "k.csv", KINETICS_HEADER + '"bending, metal",aaa,1,11,train,0\n'
                      '"dancing gangnam style",bbb,2,12,train,0\n')
    assert read_annotations(csv_path) == [VideoRecord(a, 0), VideoRecord(b, 1)]


def test_kinetics_column_order_split_filter_and_class_index(tmp_path):
    csv_path = _write(tmp_path / "k.csv", "youtube_id,label,split,time_end,time_start\n"
                      "aaa,b,train,10,0\nbbb,a,val,20,10\nccc,c,train,30,20\n")
    _touch(tmp_path / "b" / "aaa_000000_000010.mp4")
    _touch(tmp_path / "c" / "ccc_000020_000030.mp4")
    train = read_annotations(csv_path, split="train")
    assert [(os.path.basename(r.path), r.label) for r in train] == [("aaa_000000_000010.mp4", 1),
                                                                      ("ccc_000020_000030.mp4", 2)]
    assert [r.label for r in read_annotations(csv_path, split="val")] == [0]  # labels from all rows: a, b, c
    classes = _write(tmp_path / "classes.txt", "c\nb\na\n")
    assert [r.label for r in read_annotations(csv_path, class_index=classes)] == [1, 2, 0]
    assert [r.label for r in read_annotations(csv_path, class_index=["c", "b", "a"], split="train")] == [1, 0]


def test_kinetics_class_index_with_underscores(tmp_path):
    csv_path = _write(tmp_path / "k.csv", KINETICS_HEADER + "air drumming,aaa,0,10,train,0\n")
    assert read_annotations(csv_path, class_index=["abseiling", "air_drumming"])[0].label == 1


def test_kinetics_missing_videos_are_kept(tmp_path):
    present = _touch(tmp_path / "abseiling" / "aaa_000000_000010.mp4")
    csv_path = _write(tmp_path / "k.csv", KINETICS_HEADER + "abseiling,aaa,0,10,train,0\n"
                      "abseiling,gone,0,10,train,0\nno folder,gone2,5,15,train,0\n")
    records = read_annotations(csv_path)
    assert [r.path for r in records] == [
        present,
        str(tmp_path / "abseiling" / "gone_000000_000010.mp4"),  # its label folder exists
        str(tmp_path / "gone2_000005_000015.mp4"),  # no label folder: flat in root
    ]
    assert missing_videos(records) == records[1:]


def test_kinetics_prefers_label_folder_and_mp4(tmp_path):
    in_folder = _touch(tmp_path / "a" / "x_000000_000010.mp4")
    _touch(tmp_path / "a" / "x_000000_000010.webm")
    _touch(tmp_path / "x_000000_000010.mp4")
    csv_path = _write(tmp_path / "k.csv", KINETICS_HEADER + "a,x,0,10,train,0\n")
    assert read_annotations(csv_path)[0].path == in_folder


def test_kinetics_header_errors(tmp_path):
    path = _write(tmp_path / "nolabel.csv", "youtube_id,time_start,time_end,split\naaa,0,10,test\n")
    assert "label" in _expect_error(path, 1).reason
    path = _write(tmp_path / "nosplit.csv", "label,youtube_id,time_start,time_end\na,aaa,0,10\n")
    assert read_annotations(path)[0].label == 0
    assert "split" in _expect_error(path, 1, split="train").reason
    for text in ("", "\nlabel,youtube_id,time_start,time_end\n"):
        assert "no header" in _expect_error(_write(tmp_path / "empty.csv", text), 1).reason


@pytest.mark.parametrize(
    "row,reason",
    [
        ("a,aaa,zero,10,train,0", "not a number"),
        ("a,aaa,0,10,train", "5 fields where the header has 6"),
        ("a,aaa,0,10,train,0,extra", "7 fields"),
        (",aaa,0,10,train,0", "empty label"),
        ("a,,0,10,train,0", "empty youtube_id"),
        ("a,aaa,-1,10,train,0", "negative"),
        ("a,aaa,0.5,10,train,0", "whole number"),
        ("a,aaa,10,5,train,0", "time_end 5 is before time_start 10"),
    ],
)
def test_kinetics_malformed_rows(tmp_path, row, reason):
    path = _write(tmp_path / "bad.csv", KINETICS_HEADER + "a,ok,0,10,train,0\n\n" + row + "\n")
    error = _expect_error(path, 4)  # header, good row, blank line, bad row
    assert reason in error.reason
    assert row[:10] in str(error)


def test_kinetics_unknown_label_names_line(tmp_path):
    path = _write(tmp_path / "k.csv", KINETICS_HEADER + "a,x,0,10,train,0\nb,y,0,10,train,0\n")
    assert "not in the class index" in _expect_error(path, 3, class_index=["a"]).reason


def test_kinetics_split_not_in_the_file_names_its_splits(tmp_path):
    """A misspelt split (``tset``) kept no row and returned [] without a word."""
    path = _write(tmp_path / "k.csv", KINETICS_HEADER + "a,x,0,10,train,0\nb,y,0,10,val,0\n")
    with pytest.raises(AnnotationError, match=r"k\.csv: no row of split 'tset'; the file's splits are 'train', 'val'"):
        read_annotations(path, split="tset")
    assert [r.label for r in read_annotations(path, split="val")] == [1]
    assert read_annotations(_write(tmp_path / "header_only.csv", KINETICS_HEADER), split="train") == []


@pytest.mark.parametrize(
    "rows,line_no",
    [
        ('"a,x,0,10,train,0\n', 2),  # the quote opens the row: everything after is one field
        ('a,x,0,10,train,0\nb,y,0,10,"train,0\nc,z,0,10,val,0\n', 3),  # in a later field: the row's count is right
        ('"a\nb",x,0,10,train,0\n"c,y,0,10,train,0', 4),  # after a quoted label over two lines; no final newline
        ('a,x,0,10,train,0\n"b,y,0,10,train,0\n' + "c,z,0,10,train,0\n" * 10_000, 3),  # past the csv field limit
    ],
    ids=["opens_the_row", "in_a_later_field", "after_a_field_over_two_lines", "past_the_field_size_limit"],
)
def test_kinetics_unterminated_quote_names_the_line_it_opens(tmp_path, rows, line_no):
    """A quote left open swallows the rest of the file: the error said "k.csv:3: 1 fields where the header has 6: ''"
    about a line that does not exist (or a raw csv.Error naming no file), not the quote."""
    path = _write(tmp_path / "k.csv", KINETICS_HEADER + rows)
    error = _expect_error(path, line_no)
    assert "unterminated quote" in error.reason
    assert error.line.count('"') == 1


def test_kinetics_quoted_field_over_two_lines_is_no_unterminated_quote(tmp_path):
    path = _write(tmp_path / "k.csv", KINETICS_HEADER + 'a,x,0,10,train,0\n"b\nc",y,0,10,"val",0\n')
    assert [os.path.basename(r.path) for r in read_annotations(path)] == ["x_000000_000010.mp4", "y_000000_000010.mp4"]


def test_kinetics_class_index_list_checked_as_a_file_is(tmp_path):
    """A repeated name in a class index file was an error, in a list it was accepted."""
    path = _write(tmp_path / "k.csv", KINETICS_HEADER + "abc,x,0,10,train,0\n")
    with pytest.raises(ValueError, match=r"class_index: class 'abc' at position 1 repeats position 0"):
        read_annotations(path, class_index=["abc", "abc"])
    with pytest.raises(TypeError, match=r"class_index must hold class names \(str\), got 1 \(int\) at position 1"):
        read_annotations(path, class_index=["abc", 1])
    assert read_annotations(path, class_index=("zzz", "abc"))[0].label == 1


def test_kinetics_float_times_and_crlf(tmp_path):
    path = tmp_path / "k.csv"
    path.write_bytes(b"label,youtube_id,time_start,time_end\r\na,x,10.0,20\r\nb,y,bad,20\r\n")
    _expect_error(str(path), 3)
    path.write_bytes(b"label,youtube_id,time_start,time_end\r\na,x,10.0,20\r\n")
    assert read_annotations(path)[0].path.endswith("x_000010_000020.mp4")


# ---- path-label lists ----


def test_list_space_separated_default_root(tmp_path):
    path = _write(tmp_path / "train.txt", "# mmaction2 / PySlowFast\n\nvideos/a.mp4 3\n  videos/b.mp4\t0  \n"
                  "/abs/c.mp4 1\n")
    assert read_annotations(path) == [
        VideoRecord(str(tmp_path / "videos" / "a.mp4"), 3),
        VideoRecord(str(tmp_path / "videos" / "b.mp4"), 0),
        VideoRecord("/abs/c.mp4", 1),
    ]


def test_list_comma_separated_paths_with_spaces_and_root(tmp_path):
    path = _write(tmp_path / "list.csv.txt", "my videos/a b.mp4, 2\nc.mp4,0\n")
    root = tmp_path / "data"
    assert read_annotations(path, root=root) == [
        VideoRecord(str(root / "my videos" / "a b.mp4"), 2),
        VideoRecord(str(root / "c.mp4"), 0),
    ]


def test_list_rawframes_three_columns(tmp_path):
    path = _write(tmp_path / "rawframes.txt", "frames/a 120 4\nframes/b,87,1\n")
    assert [r.label for r in read_annotations(path)] == [4, 1]


def test_list_format_forced_for_csv_name(tmp_path):
    path = _write(tmp_path / "list.csv", "a.mp4,1\n")
    assert read_annotations(path, fmt="list") == [VideoRecord(str(tmp_path / "a.mp4"), 1)]


def test_list_class_index_range(tmp_path):
    path = _write(tmp_path / "l.txt", "a.mp4 0\nb.mp4 1\nc.mp4 2\n")
    assert len(read_annotations(path, class_index=["x", "y", "z"])) == 3
    assert "out of range for 2 classes" in _expect_error(path, 3, class_index=["x", "y"]).reason


@pytest.mark.parametrize(
    "line,reason",
    [
        ("a.mp4", "missing label"),
        ("a.mp4 three", "not an integer"),
        ("a.mp4 1.5", "not an integer"),
        ("a.mp4 -1", "negative"),
        ("my video.mp4 3", "too many fields"),
        ("a.mp4 10 20 3", "too many fields"),
        ("a.mp4,", "missing label"),
        (",3", "empty path"),
        ("a.mp4,1,2,3", "too many fields"),
    ],
)
def test_list_malformed_lines(tmp_path, line, reason):
    path = _write(tmp_path / "bad_list.txt", "# header comment\nok.mp4 1\n\n" + line + "\nlater.mp4 2\n")
    error = _expect_error(path, 4)
    assert reason in error.reason
    assert repr(line) in str(error)


def test_list_long_line_is_shortened(tmp_path):
    path = _write(tmp_path / "long.txt", "x" * 500 + ".mp4 label\n")
    message = str(_expect_error(path, 1))
    assert "..." in message and len(message) < 300


def test_text_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    """A list, a Kinetics CSV or a class index saved as Latin-1: an AnnotationError with the file, the line and the
    byte (a bare UnicodeDecodeError named neither); a UTF-8 byte-order mark and CRLF lines still read."""
    listed = tmp_path / "train.txt"
    listed.write_bytes(b"a.mp4 0\r\ncaf\xe9.mp4 1\r\n")
    error = _expect_error(str(listed), 2)
    assert "not UTF-8 text (byte 0xe9 at column 4)" in str(error) and "caf\ufffd.mp4 1" in str(error)
    csv_path = tmp_path / "k.csv"
    csv_path.write_bytes(b"label,youtube_id,time_start,time_end\na,x,10,20\ncaf\xe9,y,1,2\n")
    _expect_error(str(csv_path), 3)
    index = tmp_path / "classes.txt"
    index.write_bytes(b"walking\ncaf\xe9\n")
    with pytest.raises(AnnotationError, match=r"classes.txt:2: not UTF-8 text \(byte 0xe9"):
        read_class_index(index)
    listed.write_bytes(b"\xef\xbb\xbfa.mp4 0\r\ncaf\xc3\xa9.mp4 1\r\n")
    assert [r.label for r in read_annotations(str(listed))] == [0, 1]
    assert read_annotations(str(listed))[1].path.endswith("caf\u00e9.mp4")


def test_list_empty_file(tmp_path):
    assert read_annotations(_write(tmp_path / "empty.txt", "# nothing\n\n")) == []


# ---- class folders ----


def _folder_tree(root):
    _touch(root / "walking" / "b.mp4")
    _touch(root / "walking" / "a.MKV")
    _touch(root / "walking" / "notes.txt")
    _touch(root / "walking" / ".hidden.mp4")
    _touch(root / "archery" / "z.avi")
    _touch(root / "archery" / "y.mov")
    _touch(root / "archery" / "x.webm")
    (root / "empty_class").mkdir()
    (root / ".cache").mkdir()
    _touch(root / "stray.mp4")


def test_folder_tree(tmp_path):
    root = tmp_path / "ucf"
    _folder_tree(root)
    records = read_annotations(root)
    assert [(os.path.relpath(r.path, root), r.label) for r in records] == [
        ("archery/x.webm", 0), ("archery/y.mov", 0), ("archery/z.avi", 0),
        ("walking/a.MKV", 2), ("walking/b.mp4", 2),
    ]
    assert read_annotations(root, fmt="folder", root=root) == records


def test_folder_with_class_index(tmp_path):
    root = tmp_path / "ucf"
    _folder_tree(root)
    classes = ["walking", "empty class", "archery", "unused"]
    records = read_annotations(root, class_index=classes)
    assert [r.label for r in records] == [2, 2, 2, 0, 0]
    with pytest.raises(AnnotationError, match="walking") as info:
        read_annotations(root, class_index=["archery", "empty_class"])
    assert str(root) in str(info.value)


def test_folder_root_mismatch(tmp_path):
    with pytest.raises(ValueError, match="its own root"):
        read_annotations(tmp_path, root=tmp_path / "elsewhere")


# ---- sharding ----


@pytest.mark.parametrize("count", [0, 1, 7, 10, 23])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8, 30])
def test_shard_partitions(count, num_shards):
    records = [VideoRecord(f"/v/{i}.mp4", i % 3) for i in range(count)]
    shards = [shard(records, i, num_shards) for i in range(num_shards)]
    flat = [r for s in shards for r in s]
    assert sorted(flat, key=lambda r: int(r.path[3:-4])) == records  # covers everything exactly once
    assert len(flat) == len(set(flat)) == count
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_bad_ids():
    records = [VideoRecord("/v/a.mp4", 0)]
    for shard_id, num_shards in [(-1, 2), (2, 2), (0, 0), (0, -1), (0.0, 2), (True, 2)]:
        with pytest.raises(ValueError):
            shard(records, shard_id, num_shards)
