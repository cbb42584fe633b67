"""Annotation lists as the field writes them, read into ``VideoRecord(path, label)``.

Formats (``read_annotations(source, fmt="auto")`` picks folder for a directory, kinetics_csv for ``*.csv``,
list otherwise):

* ``kinetics_csv``: a header naming at least ``label,youtube_id,time_start,time_end`` (``split`` and extra
  columns such as ``is_cc`` allowed, any order), fields quoted as the ``csv`` module reads them. The video of a
  row is ``{youtube_id}_{time_start:06d}_{time_end:06d}`` with extension ``.mp4``, else ``.webm``, else
  ``.mkv``, looked for in ``root/<label>/``, then ``root/<label with spaces as underscores>/``, then flat in
  ``root/``. Labels are indices into ``class_index`` (a folder spelling with underscores matches a name with
  spaces); without one, into the sorted unique labels of all the CSV's rows (before ``split`` filtering), so
  pass the same ``class_index`` (``write_class_index`` the training one) to keep labels equal across files.
* ``list``: one ``path label`` per line, separated by whitespace (mmaction2, PySlowFast) or by a comma (then
  paths may hold spaces); three fields ``path num_frames label`` (mmaction2 rawframes) take the last as the
  label. Blank lines and lines starting with ``#`` are skipped. Labels are non-negative integers, below
  ``len(class_index)`` when one is given.
* ``folder``: ``root/<class name>/<video>`` for videos ending in .mp4 .webm .mkv .avi .mov (any case); classes
  are the sorted subfolder names, or ``class_index`` (a folder not in it is an error). Hidden entries are skipped.

Relative paths resolve against ``root``, by default the annotation file's directory; records carry absolute
paths in file order (folder: sorted by class, then name).

Missing videos are kept: a record whose file does not exist still comes back (for Kinetics, with the first
candidate path, in its label folder when that folder exists), so the decoder reports the file and
``missing_videos(records)`` lists all of them for ``check-data``. Malformed input raises ``AnnotationError``,
whose message names the file, the 1-based line number and the line.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FORMATS",
    "VIDEO_EXTENSIONS",
    "AnnotationError",
    "VideoRecord",
    "detect_format",
    "missing_videos",
    "read_annotations",
    "read_class_index",
    "shard",
    "write_class_index",
]

FORMATS = ("kinetics_csv", "list", "folder")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
KINETICS_EXTENSIONS = (".mp4", ".webm", ".mkv")  # tried in this order
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHOWN_CHARS = 80


def _shorten(text: str) -> str:
    text = text.rstrip("\r\n")
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class AnnotationError(ValueError):
    """Malformed annotation input; the message reads ``file:line: reason: 'line text'``."""

    def __init__(self, reason: str, *, path: str | os.PathLike, line_no: int | None = None, line: str | None = None):
        self.path = os.fspath(path)
        self.line_no = line_no
        self.line = line
        self.reason = reason
        where = self.path if line_no is None else f"{self.path}:{line_no}"
        shown = "" if line is None else f": {_shorten(line)!r}"
        super().__init__(f"{where}: {reason}{shown}")


@dataclass(frozen=True)
class VideoRecord:
    """One annotated video: absolute ``path`` and class index ``label``."""

    path: str
    label: int


def _text(path: str | os.PathLike) -> str:
    """The text of an annotation file: UTF-8, a byte-order mark allowed; other bytes are an
    :class:`AnnotationError` naming the line (a bare UnicodeDecodeError names neither file nor line)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        line = data[start : len(data) if end < 0 else end].decode("utf-8", errors="replace").rstrip("\r")
        raise AnnotationError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {exc.start - start + 1}); "
                              "save the file as UTF-8", path=path, line_no=data[: exc.start].count(b"\n") + 1,
                              line=line) from None  # fmt: skip


def read_class_index(path: str | os.PathLike) -> list[str]:
    """Class names, one per line: line ``i`` (0-based) is label ``i``. Blank lines at the end are ignored."""
    lines = _text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise AnnotationError("no class names", path=path)
    seen: dict[str, int] = {}
    for line_no, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise AnnotationError("blank line inside the class index (it would shift every later label)",
                                  path=path, line_no=line_no, line=line)
        if name in seen:
            raise AnnotationError(f"class {name!r} repeats line {seen[name]}", path=path, line_no=line_no, line=line)
        seen[name] = line_no
    return list(seen)


def write_class_index(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Writes ``names`` one per line, so that ``read_class_index(path) == list(names)``."""
    names = list(names)
    if not names:
        raise ValueError("no class names to write")
    if len(set(names)) != len(names):
        raise ValueError("class names repeat")
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"class name {name!r} cannot be written one per line (empty, padded or multi-line)")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(name + "\n" for name in names))


def detect_format(source: str | os.PathLike) -> str:
    """``"folder"`` for a directory, ``"kinetics_csv"`` for a ``.csv`` file, ``"list"`` otherwise."""
    if os.path.isdir(source):
        return "folder"
    if os.fspath(source).lower().endswith(".csv"):
        return "kinetics_csv"
    return "list"


def read_annotations(
    source: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    class_index: Sequence[str] | str | os.PathLike | None = None,
    fmt: str = "auto",
    split: str | None = None,
) -> list[VideoRecord]:
    """Records of an annotation file or folder; see the module docstring for formats and rules.

    ``root``: where relative video paths start (default: the file's directory; a folder source is its own
    root). ``class_index``: class names (no repeats), or the path of a class index file. ``split``: keeps the
    Kinetics rows of that split only (a split that no row has is an error). Missing video files are kept (see
    ``missing_videos``).
    """
    if fmt == "auto":
        fmt = detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if split is not None and fmt != "kinetics_csv":
        raise ValueError(f"split={split!r} applies to Kinetics CSVs only, not to the {fmt} format")
    if isinstance(class_index, (str, os.PathLike)):
        class_index = read_class_index(class_index)
    elif class_index is not None:
        class_index = _class_names(class_index)
    if fmt == "folder":
        if root is not None and os.path.abspath(root) != os.path.abspath(source):
            raise ValueError(f"a folder source is its own root; got root={os.fspath(root)!r} for {os.fspath(source)!r}")
        return _read_folder(source, class_index)
    root = os.path.dirname(os.path.abspath(source)) if root is None else os.path.abspath(root)
    if fmt == "list":
        return _read_list(source, root, class_index)
    return _read_kinetics_csv(source, root, class_index, split)


def missing_videos(records: Iterable[VideoRecord]) -> list[VideoRecord]:
    """The records whose video file does not exist (or is not a file)."""
    return [record for record in records if not os.path.isfile(record.path)]


def shard(records: Sequence, shard_id: int, num_shards: int) -> list:
    """Strided shard ``records[shard_id::num_shards]`` for distributed training.

    The shards partition ``records`` (no overlap, nothing left out), their sizes differ by at most one (some are
    empty when ``num_shards > len(records)``; pad or drop in the loader when every rank needs the same count),
    and each takes records from all over the list, so a class-sorted list spreads every class over the shards.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, {num_shards}), got {shard_id!r}")
    return list(records[shard_id::num_shards])


def _class_names(class_index: Sequence[str]) -> list[str]:
    """A ``class_index`` given as names, checked as ``read_class_index`` checks a file: strings, none repeated."""
    names = list(class_index)
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class_index must hold class names (str), got {name!r} ({type(name).__name__}) "
                            f"at position {position}")  # fmt: skip
        if name in seen:
            raise ValueError(f"class_index: class {name!r} at position {position} repeats position {seen[name]}")
        seen[name] = position
    return names


def _label_lookup(class_index: Sequence[str]) -> dict[str, int]:
    """Name -> label, also reachable by the spelling with underscores for spaces (folder names)."""
    lookup = {name.replace(" ", "_"): label for label, name in enumerate(class_index)}
    lookup.update({name: label for label, name in enumerate(class_index)})  # exact names win
    return lookup


def _parse_label(text: str, num_classes: int | None) -> int:
    text = text.strip()
    if not text:
        raise ValueError("missing label")
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"label {text!r} is not an integer")
    label = int(text)
    if label < 0:
        raise ValueError(f"label {label} is negative")
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"label {label} is out of range for {num_classes} classes")
    return label


def _read_list(path, root: str, class_index: list[str] | None) -> list[VideoRecord]:
    num_classes = None if class_index is None else len(class_index)
    records = []
    with io.StringIO(_text(path), newline=None) as f:  # (newline=None: \r\n and \r end lines, as open() reads)
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = [field.strip() for field in text.split(",")] if "," in text else text.split()
            try:
                if len(fields) == 1:
                    raise ValueError("missing label (expected 'path label')")
                if len(fields) == 3:
                    if not re.fullmatch(r"[0-9]+", fields[1]):
                        raise ValueError("too many fields (expected 'path label' or 'path num_frames label'; "
                                         "separate by commas when paths hold spaces)")
                elif len(fields) != 2:
                    raise ValueError(f"too many fields ({len(fields)}; expected 'path label' or "
                                     "'path num_frames label'; separate by commas when paths hold spaces)")
                if not fields[0]:
                    raise ValueError("empty path")
                label = _parse_label(fields[-1], num_classes)
            except ValueError as e:
                raise AnnotationError(str(e), path=path, line_no=line_no, line=line) from None
            records.append(VideoRecord(os.path.normpath(os.path.join(root, fields[0])), label))
    return records


def _read_folder(source, class_index: list[str] | None) -> list[VideoRecord]:
    source = os.path.abspath(source)
    class_dirs = sorted(e.name for e in os.scandir(source) if e.is_dir() and not e.name.startswith("."))
    if class_index is None:
        labels = {name: label for label, name in enumerate(class_dirs)}
    else:
        lookup = _label_lookup(class_index)
        unknown = [name for name in class_dirs if name not in lookup]
        if unknown:
            raise AnnotationError(f"class folders not in the class index: {', '.join(unknown[:5])}"
                                  + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""), path=source)
        labels = {name: lookup[name] for name in class_dirs}
    records = []
    for name in class_dirs:
        class_dir = os.path.join(source, name)
        videos = sorted(e.name for e in os.scandir(class_dir)
                        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(VIDEO_EXTENSIONS))
        records.extend(VideoRecord(os.path.join(class_dir, video), labels[name]) for video in videos)
    return records


class _Listings:
    """File names per directory, read once: a Kinetics CSV asks about each directory many times."""

    def __init__(self):
        self._names: dict[str, frozenset[str] | None] = {}

    def names(self, directory: str) -> frozenset[str] | None:
        """File names in ``directory``; None when it is not a directory."""
        if directory not in self._names:
            try:
                self._names[directory] = frozenset(e.name for e in os.scandir(directory) if e.is_file())
            except (FileNotFoundError, NotADirectoryError):
                self._names[directory] = None
        return self._names[directory]


def _parse_time(text: str) -> int:
    text = text.strip()
    if _INTEGER.fullmatch(text):
        value = int(text)
    else:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"time {text!r} is not a number") from None
        if not number.is_integer():
            raise ValueError(f"time {text!r} is not a whole number of seconds")
        value = int(number)
    if value < 0:
        raise ValueError(f"time {value} is negative")
    return value


def _open_quote_line(lines: list[str], start: int) -> int | None:
    """The 1-based line where a quoted field of the CSV record starting on line ``start`` opens and is never closed
    (it runs to the end of the file), read as ``csv.reader`` reads quotes; None when the record's quotes close."""
    opened = None
    state = "start"  # of a field; "plain": in an unquoted field; "quoted"; "quote": a quote inside a quoted field
    for line_no in range(start, len(lines) + 1):
        for char in lines[line_no - 1]:
            if state == "quoted":
                state = "quote" if char == '"' else "quoted"
            elif state == "quote" and char == '"':
                state = "quoted"  # a doubled quote
            elif char == ",":
                state = "start"
            elif state == "start" and char == '"':
                state, opened = "quoted", line_no
            else:
                state = "plain"
        if state != "quoted":
            return None  # the line ends the record
    return opened


def _read_kinetics_csv(path, root: str, class_index: list[str] | None, split: str | None) -> list[VideoRecord]:
    text = _text(path)
    lines = re.split(r"\r\n|\n|\r", text)  # physical lines, numbered as csv.reader counts them
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader, [])]
    if not any(header):
        raise AnnotationError("no header (expected 'label,youtube_id,time_start,time_end,split' on the first line)",
                              path=path, line_no=1, line=lines[0])
    missing = [name for name in KINETICS_COLUMNS if name not in header]
    if split is not None and "split" not in header:
        missing.append("split")
    if missing:
        raise AnnotationError(f"header lacks column(s) {', '.join(missing)}", path=path, line_no=1, line=lines[0])
    column = {name: header.index(name) for name in (*KINETICS_COLUMNS, "split") if name in header}

    rows = []  # (line_no, line text, label name, file stem) of the rows kept
    all_labels = set()
    splits = set()
    while True:
        start = reader.line_num + 1  # the record's first line (a quoted field may run over several)
        try:
            fields = next(reader, None)
        except csv.Error as e:  # (a quote left open runs into the field size limit)
            quote_line = _open_quote_line(lines, start)
            if quote_line is not None:
                raise AnnotationError(f"unterminated quote: the quoted field opened here never closes ({e})",
                                      path=path, line_no=quote_line, line=lines[quote_line - 1]) from None
            raise AnnotationError(str(e), path=path, line_no=start, line=lines[start - 1]) from None
        if fields is None:
            break
        line_no = reader.line_num
        line = lines[line_no - 1]
        if line_no == len(lines):  # the last record: a quote left open anywhere above ends here
            quote_line = _open_quote_line(lines, start)
            if quote_line is not None:
                raise AnnotationError("unterminated quote: the quoted field opened here runs to the end of the file",
                                      path=path, line_no=quote_line, line=lines[quote_line - 1])
        if not any(field.strip() for field in fields):
            continue
        try:
            if len(fields) != len(header):
                raise ValueError(f"{len(fields)} fields where the header has {len(header)}")
            label_name = fields[column["label"]].strip()
            youtube_id = fields[column["youtube_id"]].strip()
            if not label_name:
                raise ValueError("empty label")
            if not youtube_id:
                raise ValueError("empty youtube_id")
            time_start = _parse_time(fields[column["time_start"]])
            time_end = _parse_time(fields[column["time_end"]])
            if time_end < time_start:
                raise ValueError(f"time_end {time_end} is before time_start {time_start}")
            stem = f"{youtube_id}_{time_start:06d}_{time_end:06d}"
        except ValueError as e:
            raise AnnotationError(str(e), path=path, line_no=line_no, line=line) from None
        all_labels.add(label_name)
        if split is not None:
            splits.add(fields[column["split"]].strip())
        if split is None or fields[column["split"]].strip() == split:
            rows.append((line_no, line, label_name, stem))
    if split is not None and splits and split not in splits:
        shown = ", ".join(repr(name) for name in sorted(splits)[:10]) + (" ..." if len(splits) > 10 else "")
        raise AnnotationError(f"no row of split {split!r}; the file's splits are {shown}", path=path)

    lookup = _label_lookup(sorted(all_labels) if class_index is None else class_index)
    listings = _Listings()
    records = []
    for line_no, line, label_name, stem in rows:
        label = lookup.get(label_name, lookup.get(label_name.replace(" ", "_")))
        if label is None:
            raise AnnotationError(f"label {label_name!r} is not in the class index", path=path, line_no=line_no,
                                  line=line)
        records.append(VideoRecord(_find_kinetics_video(root, label_name, stem, listings), label))
    return records


def _find_kinetics_video(root: str, label_name: str, stem: str, listings: _Listings) -> str:
    """The first existing candidate, else the ``.mp4`` in the label folder (when one exists) or flat in root."""
    label_dirs = [os.path.join(root, label_name), os.path.join(root, label_name.replace(" ", "_"))]
    directories = list(dict.fromkeys([*label_dirs, root]))
    for directory in directories:
        names = listings.names(directory) or frozenset()
        for ext in KINETICS_EXTENSIONS:
            if stem + ext in names:
                return os.path.join(directory, stem + ext)
    expected_dir = next((d for d in directories if listings.names(d) is not None), root)
    return os.path.join(expected_dir, stem + KINETICS_EXTENSIONS[0])
