"""What training writes is strict JSON, is on the disk before it is renamed into place, and a crash's leftovers
(danlu's temporary names only) are cleared at the next start."""
import json
import os

import pytest
import torch

from danlu.training.checkpoint import TrainerState, remove_stale_checkpoint_writes, save_checkpoint
from danlu.training.logs import TrainingLog
from danlu.utils.atomic import atomic_directory
from danlu.utils.jsonfile import dumps_json


def strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_trainer_log_writes_non_finite_numbers_as_null(tmp_path):
    log = TrainingLog(tmp_path)
    log.write({"step": 1, "loss": 0.5, "eval_loss": float("inf"), "grad": float("nan"), "m": [float("-inf")]})
    (record,) = [strict(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert record == {"step": 1, "loss": 0.5, "eval_loss": None, "grad": None, "m": [None]}
    assert log.records() == [record]


def test_trainer_log_resume_skips_a_torn_last_line(tmp_path):
    log = TrainingLog(tmp_path)
    log.write({"step": 1, "loss": 0.5})
    with open(tmp_path / "trainer_log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    resumed = TrainingLog(tmp_path, resume=True)
    resumed.start_progress(3, 1)
    resumed.close_progress()
    assert resumed.records() == [{"step": 1, "loss": 0.5}]


def test_trainer_state_json_is_strict_json(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainerState(global_step=2, best_eval_loss=float("nan"))
    target = save_checkpoint(tmp_path, state, model, optimizer, scheduler)
    assert strict((target / "trainer_state.json").read_text())["best_eval_loss"] is None
    assert dumps_json({"a": (1.0, float("inf"))}) == '{"a": [1.0, null]}'


def test_only_danlus_temporaries_are_removed(tmp_path):
    leftovers = [".checkpoint-3.0123456789ab.tmp", ".staged.ab_cd123.tmp", ".trainer_log.jsonl.abcdef012345.tmp",
                 "..staged.ab_cd123.tmp.old"]
    kept = ["notes.txt", ".my.tmp", ".checkpoint-3.tmp", "checkpoint-3.0123456789ab.tmp", ".cache.old",
            ".checkpoint-1.old"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-1").mkdir()  # complete: its .old (the version it replaced) goes
    (tmp_path / ".checkpoint-2.old").mkdir()  # the crash came between the renames: the old one is all there is
    (tmp_path / ".checkpoint-2.old" / "trainer_state.json").write_text("{}")
    removed = remove_stale_checkpoint_writes(tmp_path)
    assert sorted(p.name for p in removed) == sorted(leftovers + [".checkpoint-1.old", ".checkpoint-2.old"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n in kept if n != ".checkpoint-1.old"] + ["checkpoint-1", "checkpoint-2"])
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()


def test_atomic_directory_fsyncs_files_and_directories_before_the_rename_and_the_parent_after(tmp_path,
                                                                                                monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_directory(tmp_path / "out" / "checkpoint-1") as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    rename = events.index(("rename", "checkpoint-1"))
    before, after = {name for _, name in events[:rename]}, events[rename + 1:]
    assert {"a.bin", "b.bin", "sub", tmp.name} <= before
    assert after == [("fsync", "out")]
