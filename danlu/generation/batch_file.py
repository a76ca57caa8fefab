"""Offline batch generation files: prompts from .txt or .jsonl, answers appended to a .jsonl that resumes."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROMPT_KEYS = ("prompt", "instruction", "query", "text", "question")


@dataclass
class PromptRecord:
    index: int
    prompt: Optional[str]  # plain prompt
    messages: Optional[list]  # a chat conversation, when the line has "messages"
    extra: dict


def read_prompts(path: str) -> list[PromptRecord]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records: list[PromptRecord] = []
    with open(file, encoding="utf-8") as f:
        if file.suffix == ".jsonl" or file.suffix == ".json":
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                records.append(_parse_json_line(path, line_no, line, len(records)))
        else:
            for line in f:
                text = line.rstrip("\n")
                if text.strip():
                    records.append(PromptRecord(len(records), text, None, {}))
    if not records:
        raise ValueError(f"{path}: no prompts found")
    return records


def _parse_json_line(path: str, line_no: int, line: str, index: int) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if not isinstance(obj["messages"], list) or not obj["messages"]:
            raise ValueError(f"{path}:{line_no}: 'messages' must be a non-empty list")
        extra = {k: v for k, v in obj.items() if k != "messages"}
        return PromptRecord(index, None, obj["messages"], extra)
    for key in PROMPT_KEYS:
        if isinstance(obj.get(key), str):
            prompt = obj[key]
            if key == "instruction" and isinstance(obj.get("input"), str) and obj["input"]:
                prompt = f"{prompt}\n{obj['input']}"
            extra = {k: v for k, v in obj.items() if k not in (key, "input")}
            return PromptRecord(index, prompt, None, extra)
    raise ValueError(f"{path}:{line_no}: no prompt field; expected one of {list(PROMPT_KEYS)} (a string) "
                     f"or 'messages'")


def answered_indices(output: str) -> set[int]:
    """Indices already in the output file. A torn last line (a crash mid-write) is cut off."""
    file = Path(output)
    if not file.is_file():
        return set()
    done: set[int] = set()
    good_bytes = 0
    with open(file, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
                done.add(int(obj["index"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if raw.endswith(b"\n"):
                    raise ValueError(f"{output}: a line is not a result of danlu generate: "
                                     f"{raw[:80]!r}; choose another --output") from None
                break
            good_bytes += len(raw)
    if good_bytes < file.stat().st_size:
        os.truncate(file, good_bytes)
    return done


def append_results(output: str, results: list[dict]) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
