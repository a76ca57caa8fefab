"""Reading a JSON file whose absence or damage gets an error naming the file, line and column."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], missing_hint: str = "") -> Any:
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found" + (f"; {missing_hint}" if missing_hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None


def finite(value: Any) -> Any:
    """`value` with every non-finite float (inf, -inf, nan) made None, in dicts, lists and tuples too: what JSON
    can hold (json.dumps would write Infinity and NaN, which no strict JSON reader takes)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs) -> str:
    """json.dumps of `value`, its non-finite numbers written as null: always valid JSON."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
