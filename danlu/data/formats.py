"""LLaMA-Factory's dataset conventions: dataset_info.json entries, alpaca and sharegpt records.

Every record becomes an Example: an optional system prompt and alternating user/assistant messages.
A pairwise dataset (`"ranking": true`, for rm and dpo) becomes PreferenceExamples: a prompt ending with the
user and two answers to it; a dataset with a `kto_tag` column becomes FeedbackExamples for kto: one answer
marked desirable or not.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from danlu.data.files import DataError, Record, check_dataset_info

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
PAIRWISE_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
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
class PreferenceExample:
    """One prompt and two answers to it, the first preferred (LLaMA-Factory's pairwise example)."""
    prompt: list[dict]  # alternating user / assistant, ending with user
    chosen: str
    rejected: str
    system: Optional[str] = None
    source: str = ""

    def answered(self, answer: str) -> Example:
        return answered(self.prompt, answer, self.system, self.source)


@dataclass
class FeedbackExample:
    """One prompt, one answer and whether that answer is desirable (LLaMA-Factory's kto example)."""
    prompt: list[dict]  # alternating user / assistant, ending with user
    answer: str
    desirable: bool
    system: Optional[str] = None
    source: str = ""

    @property
    def messages(self) -> list[dict]:
        return self.prompt + [{"role": "assistant", "content": self.answer}]

    def answered(self, answer: str) -> Example:
        return answered(self.prompt, answer, self.system, self.source)


def answered(prompt: list[dict], answer: str, system: Optional[str], source: str) -> Example:
    """The conversation of a prompt followed by one answer: what the chat template renders and labels."""
    return Example(prompt + [{"role": "assistant", "content": answer}], system, source)


@dataclass
class DatasetSpec:
    name: str
    file_name: str
    formatting: str = "alpaca"
    columns: dict = field(default_factory=dict)  # LF's column names, chosen/rejected/kto_tag included
    tags: dict = field(default_factory=dict)
    ranking: bool = False  # pairwise data (chosen and rejected answers), for the rm and dpo stages


def load_dataset_info(dataset_dir: Path) -> dict[str, DatasetSpec]:
    path = Path(dataset_dir) / "dataset_info.json"
    info = check_dataset_info(dataset_dir)
    specs = {}
    for name, entry in info.items():
        if "file_name" not in entry:
            remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry]
            why = f"it names {remote[0]}; download it and give its local file_name" if remote else "no file_name"
            specs[name] = DatasetSpec(name, "", formatting=f"unavailable: {why}")
            continue
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(f"{path}: {name}.formatting must be 'alpaca' or 'sharegpt', got {formatting!r}")
        ranking = entry.get("ranking", False)
        if not isinstance(ranking, bool):
            raise DataError(f"{path}: {name}.ranking must be true or false, got {ranking!r}")
        specs[name] = DatasetSpec(name, entry["file_name"], formatting, dict(entry.get("columns") or {}),
                                  dict(entry.get("tags") or {}), ranking)
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
    _refuse_ranking(record, spec, "sft (and pt, ppo)")
    if spec.formatting == "alpaca":
        columns = {**ALPACA_COLUMNS, **spec.columns}
        return answered(_alpaca_prompt(record, columns), _text(record, columns["response"], required=True),
                        _text(record, columns["system"], required=False), record.source)
    columns, tags = _sharegpt_layout(spec)
    messages, system = _sharegpt(record, columns, tags, last_role="assistant")
    return Example(messages, system, record.source)


def to_preference_example(record: Record, spec: DatasetSpec) -> PreferenceExample:
    """A pairwise record: the prompt (ending with the user) and the chosen and rejected answers to it.

    As LLaMA-Factory: alpaca's chosen/rejected are strings; sharegpt's are messages of the assistant role after
    a conversation that ends with the user.
    """
    if not spec.ranking:
        raise DataError(f"{record.source}: dataset {spec.name!r} is not pairwise data, but this stage (rm, dpo) "
                        f"trains on chosen and rejected answers; if its records have them, set \"ranking\": true "
                        f"in its dataset_info.json entry")
    if spec.formatting == "alpaca":
        columns = {**ALPACA_COLUMNS, **PAIRWISE_COLUMNS, **spec.columns}
        chosen, rejected = (_text(record, columns[side], required=True) for side in ("chosen", "rejected"))
        return PreferenceExample(_alpaca_prompt(record, columns), chosen, rejected,
                                 _text(record, columns["system"], required=False), record.source)
    columns, tags = _sharegpt_layout(spec)
    columns = {**PAIRWISE_COLUMNS, **columns}
    prompt, system = _sharegpt(record, columns, tags, last_role="user")
    chosen, rejected = (_answer_message(record, columns[side], tags) for side in ("chosen", "rejected"))
    return PreferenceExample(prompt, chosen, rejected, system, record.source)


def to_feedback_example(record: Record, spec: DatasetSpec) -> FeedbackExample:
    """A kto record: a conversation ending with the assistant's answer, and in the kto_tag column whether that
    answer is desirable (true) or not (false)."""
    _refuse_ranking(record, spec, "kto")
    tag_column = spec.columns.get("kto_tag")
    if not tag_column:
        raise DataError(f"{record.source}: dataset {spec.name!r} has no kto_tag column; kto needs each answer "
                        f"marked desirable or not: add \"kto_tag\": \"<column of true/false>\" to the columns of "
                        f"its dataset_info.json entry")
    example = to_example(record, spec)
    return FeedbackExample(example.messages[:-1], example.messages[-1]["content"],
                           _boolean(record, tag_column), example.system, record.source)


def _refuse_ranking(record: Record, spec: DatasetSpec, stage: str) -> None:
    """As LLaMA-Factory: pairwise data is for rm and dpo only; other stages would read a column it lacks."""
    if spec.ranking:
        raise DataError(f"{record.source}: dataset {spec.name!r} is pairwise data (\"ranking\": true in "
                        f"dataset_info.json), for the rm and dpo stages; {stage} needs one answer per record")


def _sharegpt_layout(spec: DatasetSpec) -> tuple[dict, dict]:
    """Column names and role tags: sharegpt's by default, OpenAI's when the messages column is `messages`."""
    columns = {**SHAREGPT_COLUMNS, **spec.columns}
    default_tags = OPENAI_TAGS if columns["messages"] == "messages" and not spec.tags else SHAREGPT_TAGS
    return columns, {**default_tags, **spec.tags}


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


def _boolean(record: Record, column: str) -> bool:
    value = record.data.get(column)
    if value is None:
        raise DataError(f"{record.source}: missing column {column!r} (the kto_tag: true for a desirable answer, "
                        f"false for an undesirable one; columns present: {sorted(record.data)})")
    if not isinstance(value, bool):
        raise DataError(f"{record.source}: column {column!r} (the kto_tag) must be true or false, got "
                        f"{type(value).__name__} {value!r}")
    return value


def _alpaca_prompt(record: Record, columns: dict) -> list[dict]:
    """The history's turns and the user's instruction (with its input on the next line)."""
    prompt = _text(record, columns["prompt"], required=True)
    query = _text(record, columns["query"], required=False)
    messages = []
    history = record.data.get(columns["history"]) or []
    if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
        raise DataError(f"{record.source}: column {columns['history']!r} must be a list of [query, response] pairs")
    for old_query, old_response in history:
        messages += [{"role": "user", "content": str(old_query)}, {"role": "assistant", "content": str(old_response)}]
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    return messages


def _sharegpt(record: Record, columns: dict, tags: dict, last_role: str) -> tuple[list[dict], Optional[str]]:
    """The messages (alternating user, assistant from the user on, ending with `last_role`) and the system
    prompt, from a leading system message or the system column."""
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
    expected = (["user", "assistant"] * len(messages))[:len(messages)]
    if not messages or expected != [m["role"] for m in messages] or messages[-1]["role"] != last_role:
        raise DataError(f"{record.source}: messages must alternate user, assistant, ... and end with the "
                        f"{last_role}; got {[m['role'] for m in messages]}")
    return messages, system


def _answer_message(record: Record, column: str, tags: dict) -> str:
    """The content of a sharegpt chosen/rejected answer: one message of the assistant role."""
    value = record.data.get(column)
    role, content = tags["role_tag"], tags["content_tag"]
    shape = f"{{{role!r}: {tags['assistant_tag']!r}, {content!r}: \"...\"}}"
    if value is None:
        raise DataError(f"{record.source}: missing column {column!r}: a pairwise record needs the answer as a "
                        f"message {shape} (columns present: {sorted(record.data)})")
    if not isinstance(value, dict) or role not in value or not isinstance(value.get(content), str):
        raise DataError(f"{record.source}: column {column!r} must be a message {shape}, got {value!r:.80}")
    if value[role] != tags["assistant_tag"]:
        raise DataError(f"{record.source}: column {column!r} has role {value[role]!r}; an answer must have the "
                        f"assistant's role {tags['assistant_tag']!r}")
    return value[content]
