"""The README's first command end to end on the real model: the answer changes as the identity data teaches."""
import json

import pytest

from danlu.cli.main import main

pytestmark = pytest.mark.real

QUESTION = "Who are you?"


def ask(capsys, *extra):
    assert main(["chat", "--query", QUESTION, "--temperature", "0", "--max_new_tokens", "48", *extra]) == 0
    return capsys.readouterr().out


def test_quickstart_lora_changes_the_answer(capsys, tmp_path):
    before = ask(capsys)
    out = tmp_path / "quickstart"
    # The quick start's own config, shortened to keep CI fast (the README runs 6 epochs).
    assert main(["train", "examples/quickstart_lora.yaml", "--output_dir", str(out), "--num_train_epochs", "4",
                 "--eval_steps", "12"]) == 0
    after = ask(capsys, "--adapter", str(out))
    assert "danlu" not in before.lower()
    assert "danlu" in after.lower() and after != before
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert losses[-1] < losses[0] / 2 and len(evals) >= 2 and evals[-1] < evals[0]
    assert (out / "training_loss.png").is_file() and (out / "eval_loss.png").is_file()
