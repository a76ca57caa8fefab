"""Assign the fixed train/test split of data/danlu_topics.jsonl (the `split` field of each line).

The test set of each label is the quarter of that label's sentences whose keyed hash,
sha256(f"{seed}:{text}"), sorts lowest: a seeded shuffle that depends neither on the order of the lines nor
on the other labels, so adding, removing or editing one sentence moves at most one other sentence between
train and test.

    python scripts/make_topic_split.py            # rewrite the split fields in place
    python scripts/make_topic_split.py --check    # exit 1 if the file's split fields differ from the rule
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from danlu.data.files import DataError, read_records  # noqa: E402
from danlu.utils.atomic import atomic_write_text  # noqa: E402

SEED = 12  # issue 12: distillation
TEST_FRACTION = 0.25
DEFAULT_PATH = REPO / "data" / "danlu_topics.jsonl"


def split_of(rows: list[dict], seed: int = SEED, test_fraction: float = TEST_FRACTION) -> list[str]:
    """"train" or "test" for each row ({"text", "label"}), in the rows' order: per label, the
    round(test_fraction * n) sentences with the lowest keyed hash are the test set."""
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["label"], []).append(i)
    splits = ["train"] * len(rows)
    for indices in by_label.values():
        ranked = sorted(indices, key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['text']}".encode()).hexdigest())
        for i in ranked[:round(test_fraction * len(indices))]:
            splits[i] = "test"
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the split differs")
    args = parser.parse_args(argv)
    records = read_records(args.path)
    for r in records:
        for field in ("text", "label"):
            if not isinstance(r.data.get(field), str) or not r.data[field].strip():
                raise DataError(f"{r.source}: field {field!r} must be a non-empty string")
    rows = [r.data for r in records]
    splits = split_of(rows)
    differ = [r.source for r, s in zip(records, splits) if r.data.get("split") != s]
    if args.check:
        for where in differ[:10]:
            print(f"{where}: split differs from the rule", file=sys.stderr)
        print(f"{args.path}: {len(differ)} of {len(rows)} lines differ from the rule")
        return 1 if differ else 0
    lines = [json.dumps({**row, "split": s}, ensure_ascii=False) for row, s in zip(rows, splits)]
    atomic_write_text(args.path, "\n".join(lines) + "\n")
    counts = {(row["label"], s): 0 for row, s in zip(rows, splits)}
    for row, s in zip(rows, splits):
        counts[row["label"], s] += 1
    print(f"{args.path}: {len(differ)} split field(s) changed; " +
          ", ".join(f"{label} {counts.get((label, 'train'), 0)}/{counts.get((label, 'test'), 0)}"
                    for label in sorted({row["label"] for row in rows})) + " (train/test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
