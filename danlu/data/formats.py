"""LLaMA-Factory's dataset conventions: dataset_info.json entries, alpaca and sharegpt records.

Every record becomes an Example: an optional system prompt and alternating user/assistant messages.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from danlu.data.files import DataError, Record
from danlu.utils.jsonfile import read_json

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


@dataclass
class Example:
    messages: list[dict]  # alternating user / assistant, ending with assistant
    system: Optional[str] = None
    source: str = ""


@dataclass
class DatasetSpec:
    name: str
    file_name: str
    formatting: str = "alpaca"
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


def load_dataset_info(dataset_dir: Path) -> dict[str, DatasetSpec]:
    path = Path(dataset_dir) / "dataset_info.json"
    info = read_json(path, DataError, "dataset_dir must hold a dataset_info.json that names the datasets")
    specs = {}
    for name, entry in info.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {name!r} must be an object")
        if "file_name" not in entry:
            remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry]
            why = f"it names {remote[0]}; download it and give its local file_name" if remote else "no file_name"
            specs[name] = DatasetSpec(name, "", formatting=f"unavailable: {why}")
            continue
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(f"{path}: {name}.formatting must be 'alpaca' or 'sharegpt', got {formatting!r}")
        specs[name] = DatasetSpec(name, entry["file_name"], formatting, dict(entry.get("columns") or {}),
                                  dict(entry.get("tags") or {}))
    return specs


def find_spec(specs: dict[str, DatasetSpec], name: str, dataset_dir: Path) -> DatasetSpec:
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"dataset {name!r} is not in {Path(dataset_dir) / 'dataset_info.json'}{hint} "
                        f"(known: {', '.join(sorted(specs))})")
    spec = specs[name]
    if spec.formatting.startswith("unavailable"):
        raise DataError(f"dataset {name!r} cannot be read offline: {spec.formatting.split(': ', 1)[1]}")
    return spec


def to_example(record: Record, spec: DatasetSpec) -> Example:
    if spec.formatting == "alpaca":
        return _alpaca(record, {**ALPACA_COLUMNS, **spec.columns})
    columns = {**SHAREGPT_COLUMNS, **spec.columns}
    default_tags = OPENAI_TAGS if columns["messages"] == "messages" and not spec.tags else SHAREGPT_TAGS
    return _sharegpt(record, columns, {**default_tags, **spec.tags})


def _text(record: Record, column: str, required: bool) -> Optional[str]:
    value = record.data.get(column)
    if value is None or value == "":
        if required:
            raise DataError(f"{record.source}: missing column {column!r} (columns present: "
                            f"{sorted(record.data)})")
        return None
    if not isinstance(value, str):
        raise DataError(f"{record.source}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca(record: Record, columns: dict) -> Example:
    prompt = _text(record, columns["prompt"], required=True)
    query = _text(record, columns["query"], required=False)
    response = _text(record, columns["response"], required=True)
    messages = []
    history = record.data.get(columns["history"]) or []
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
        raise DataError(f"{record.source}: column {columns['history']!r} must be a list of [query, response] pairs")
    for old_query, old_response in history:
        messages += [{"role": "user", "content": str(old_query)}, {"role": "assistant", "content": str(old_response)}]
    user = f"{prompt}\n{query}" if query else prompt
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return Example(messages, _text(record, columns["system"], required=False), record.source)


def _sharegpt(record: Record, columns: dict, tags: dict) -> Example:
    turns = record.data.get(columns["messages"])
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{record.source}: column {columns['messages']!r} must be a non-empty list of messages")
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    system = _text(record, columns["system"], required=False) if columns.get("system") else None
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or tags["role_tag"] not in turn or tags["content_tag"] not in turn:
            raise DataError(f"{record.source}: message {i} needs {tags['role_tag']!r} and {tags['content_tag']!r}")
        role = role_of.get(turn[tags["role_tag"]])
        if role is None:
            raise DataError(f"{record.source}: message {i} has role {turn[tags['role_tag']]!r}; expected one of "
                            f"{sorted(role_of)}")
        if role == "system":
            if i != 0:
                raise DataError(f"{record.source}: message {i}: a system message may only come first")
            system = str(turn[tags["content_tag"]])
            continue
        messages.append({"role": role, "content": str(turn[tags["content_tag"]])})
    expected = ["user", "assistant"] * (len(messages) // 2)
    if len(messages) < 2 or len(messages) % 2 or [m["role"] for m in messages] != expected:
        raise DataError(f"{record.source}: messages must alternate user, assistant, ... and end with the assistant; "
                        f"got {[m['role'] for m in messages]}")
    return Example(messages, system, record.source)
