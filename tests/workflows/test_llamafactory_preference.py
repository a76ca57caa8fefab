"""LLaMA-Factory's rm, dpo and kto example files, as it ships them (tests/llamafactory_examples.py), run on its own
demo data (tests/fixtures/llamafactory) with only model_name_or_path changed and a step limit added; then the RLHF
chain on: a reward model that transformers loads, `danlu reward`, PPO scored by that reward model.

A tiny random model carrying the real tokenizer and chat template keeps these fast.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from danlu.cli.main import main
from tests.llamafactory_examples import DPO_YAML, KTO_YAML, REWARD_YAML
from tests.training.test_train import interrupt_at_step, log_losses

pytestmark = pytest.mark.real
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llamafactory"
REPO_DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture
def lf_checkout(tmp_path, monkeypatch):
    """A directory laid out as LLaMA-Factory's: its demo data in data/, runs written under saves/."""
    shutil.copytree(FIXTURES, tmp_path / "data", ignore=shutil.ignore_patterns("README.md"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text, run, logged", [
    (REWARD_YAML, "saves/qwen3-4b/lora/reward", "accuracy"),
    (DPO_YAML, "saves/qwen3-4b/lora/dpo", "rewards/accuracies"),
    (KTO_YAML, "saves/qwen3-4b/lora/kto", "kl"),
], ids=["rm", "dpo", "kto"])
def test_llama_factory_preference_files_run_as_shipped(lf_checkout, tiny_chat_dir, text, run, logged):
    config = lf_checkout / "config.yaml"
    config.write_text(text.replace("Qwen/Qwen3-4B-Instruct-2507", str(tiny_chat_dir)))
    assert main(["train", str(config), "--max_steps", "2", "--logging_steps", "1"]) == 0
    out = lf_checkout / run
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    assert all(logged in r for r in records(out) if "loss" in r)
    assert (out / "value_head.safetensors").is_file() == ("reward" in run)


def test_dpo_logs_as_trl_and_starts_at_log_2(lf_checkout, tiny_chat_dir):
    config = lf_checkout / "dpo.yaml"
    config.write_text(DPO_YAML.replace("Qwen/Qwen3-4B-Instruct-2507", str(tiny_chat_dir)))
    assert main(["train", str(config), "--max_steps", "1", "--logging_steps", "1"]) == 0
    first = records(lf_checkout / "saves/qwen3-4b/lora/dpo")[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # the adapter starts as the reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in first
    assert first["rewards/chosen"] == first["rewards/margins"] == 0


def train_reward_model(tiny_chat_dir, out: Path, method: str) -> Path:
    assert main(["train", "--model_name_or_path", str(tiny_chat_dir), "--stage", "rm", "--dataset",
                 "identity_preference", "--dataset_dir", str(REPO_DATA), "--finetuning_type", method,
                 "--learning_rate", "1e-3", "--max_steps", "3", "--per_device_train_batch_size", "2",
                 "--cutoff_len", "128", "--output_dir", str(out)]) == 0
    return out


def test_a_full_reward_model_loads_in_transformers_and_scores_as_danlu_reward(tiny_chat_dir, tmp_path, capsys):
    rm = train_reward_model(tiny_chat_dir, tmp_path / "rm", "full")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in json.loads((REPO_DATA / "identity_preference.json")
                                                                      .read_text())[:3]))
    scores = tmp_path / "scores.jsonl"
    assert main(["reward", "--model", str(rm), "--input", str(pairs), "--output", str(scores)]) == 0
    danlu = [json.loads(line) for line in scores.read_text().splitlines()]
    assert "3 pairs: accuracy" in capsys.readouterr().out

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from danlu.cli.reward import record_sides
    from danlu.data.files import read_records
    from danlu.tokenization.chat import resolve_template

    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    for record, line in zip(read_records(pairs), danlu):
        chosen, rejected = record_sides(record, tokenizer, resolve_template(tokenizer), 1024)
        with torch.no_grad():  # the same token ids through transformers' own sequence classifier
            scores = [model(torch.tensor([ids])).logits.item() for ids in (chosen, rejected)]
        assert [line["chosen_score"], line["rejected_score"]] == pytest.approx(scores, abs=1e-4)


def test_ppo_scored_by_a_lora_reward_adapter(tiny_chat_dir, tmp_path):
    rm = train_reward_model(tiny_chat_dir, tmp_path / "rm", "lora")
    out = tmp_path / "ppo"
    assert main(["train", "--model_name_or_path", str(tiny_chat_dir), "--stage", "ppo", "--dataset", "identity",
                 "--dataset_dir", str(REPO_DATA), "--reward_model", str(rm), "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--ppo_epochs", "2",
                 "--max_new_tokens", "8", "--logging_steps", "1", "--learning_rate", "1e-4",
                 "--output_dir", str(out)]) == 0
    logged = [r for r in records(out) if "loss" in r]
    assert len(logged) == 2 and all("reward" in r and "objective/kl" in r for r in logged)
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()


def test_full_dpo_resumes_on_the_same_loss_curve(tiny_chat_dir, tmp_path, monkeypatch):
    def run(out, *extra):
        return main(["train", "--model_name_or_path", str(tiny_chat_dir), "--stage", "dpo", "--dataset",
                     "identity_preference", "--dataset_dir", str(REPO_DATA), "--finetuning_type", "full",
                     "--learning_rate", "1e-4", "--max_steps", "4", "--per_device_train_batch_size", "2",
                     "--save_steps", "2", "--logging_steps", "1", "--cutoff_len", "128", "--output_dir", str(out),
                     *extra])

    assert run(tmp_path / "straight") == 0
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed")
    assert run(tmp_path / "resumed", "--resume_from_checkpoint", "latest") == 0
    assert log_losses(tmp_path / "resumed")[-2:] == pytest.approx(log_losses(tmp_path / "straight")[-2:], abs=1e-5)


def test_reward_refuses_a_model_without_a_value_head(tiny_chat_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.json"
    pairs.write_text((REPO_DATA / "identity_preference.json").read_text())
    assert main(["reward", "--model", str(tiny_chat_dir), "--input", str(pairs)]) == 2
    assert "no value head found" in capsys.readouterr().err
