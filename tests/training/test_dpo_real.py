"""DPO end to end on the real model with the shipped pairs: the answer moves as the data prefers (README)."""
import json

import pytest

from danlu.cli.main import main

pytestmark = pytest.mark.real


def ask(capsys, question, *extra):
    assert main(["chat", "--query", question, "--temperature", "0", "--max_new_tokens", "48", *extra]) == 0
    return capsys.readouterr().out


def test_dpo_on_identity_preference_moves_the_answer_and_keeps_the_rest(capsys, tmp_path):
    before = ask(capsys, "Who are you?")
    out = tmp_path / "dpo"
    # The README's config, shortened to keep CI fast (the README runs 4 epochs).
    assert main(["train", "examples/train_lora/smollm2_lora_dpo.yaml", "--output_dir", str(out),
                 "--num_train_epochs", "2", "--logging_steps", "3"]) == 0
    after = ask(capsys, "Who are you?", "--adapter", str(out))
    assert "danlu" not in before.lower() and "danlu" in after.lower()
    assert "Paris" in ask(capsys, "What is the capital of France?", "--adapter", str(out))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert log[0]["rewards/margins"] < log[-1]["rewards/margins"] and log[-1]["rewards/accuracies"] == 1.0
    assert log[-1]["logps/chosen"] > log[0]["logps/chosen"]  # pref_ftx: the chosen answers become likely
