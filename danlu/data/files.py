"""Reading dataset files (json, jsonl, csv, parquet, or a directory of them) into lists of records."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from danlu.utils.jsonfile import read_json

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """A dataset file or record is malformed; the message names the file, line and field."""


@dataclass
class Record:
    data: dict
    source: str  # "file:line" (or "file:index" for a JSON array), for error messages


@dataclass
class ReadReport:
    skipped: list[str] = field(default_factory=list)  # "file:line: why" for each bad line skipped


DATASET_INFO = "dataset_info.json"


def check_dataset_info(dataset_dir: Path) -> dict:
    """dataset_dir's dataset_info.json, once it is known to be what LLaMA-Factory's is: an object mapping each
    dataset's name to an object (its file_name, formatting, columns, ...); else a DataError naming the file and
    the entry. A missing or unreadable file fails the same way, naming it."""
    path = Path(dataset_dir) / DATASET_INFO
    info = read_json(path, DataError, "dataset_dir must hold a dataset_info.json that names the datasets")
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object mapping each dataset's name to its entry "
                        f"({{\"name\": {{\"file_name\": ...}}}}), got {_json_kind(info)}")
    for name, entry in info.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {name!r} must be an object (with file_name, formatting, columns, "
                            f"...), got {_json_kind(entry)}")
    return info


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null",
             int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def read_records(path: Path, skip_bad_lines: bool = False, report: ReadReport | None = None) -> list[Record]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {', '.join(SUFFIXES)} files")
        return [r for f in files for r in read_records(f, skip_bad_lines, report)]
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, skip_bad_lines, report or ReadReport())
    if path.suffix == ".json":
        return _read_json(path, skip_bad_lines, report or ReadReport())
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [Record(row, f"{path}:{i + 2}") for i, row in enumerate(csv.DictReader(f))]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        rows = pq.read_table(path).to_pylist()
        return [Record(row, f"{path}:row {i}") for i, row in enumerate(rows)]
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {SUFFIXES}")


def _read_jsonl(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            except (json.JSONDecodeError, DataError) as e:
                message = e.args[0] if isinstance(e, DataError) else f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                if not skip:
                    raise DataError(message + " (pass --skip_bad_lines True to skip such lines)") from None
                report.skipped.append(message)
                continue
            records.append(Record(obj, where))
    return records


def _read_json(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON lines in a .json file
            return _read_jsonl(path, skip, report)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    records = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            message = f"{path}: item {i} is {type(obj).__name__}, expected an object"
            if not skip:
                raise DataError(message)
            report.skipped.append(message)
            continue
        records.append(Record(obj, f"{path}:item {i}"))
    return records
