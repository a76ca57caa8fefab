"""LLaMA-Factory's own Qwen3 LoRA train, merge and inference files, as it ships them (tests/llamafactory_examples.py),
run through danlu with only model_name_or_path pointed at the bundled model and a step limit added: train,
merge with the merge file, chat with the inference file.
"""
import shutil
from pathlib import Path

import pytest

from danlu.cli.main import main
from tests.llamafactory_examples import INFER_YAML, MERGE_YAML, TRAIN_YAML

pytestmark = pytest.mark.real


def write_pointed_at(path: Path, text: str, model: Path) -> Path:
    path.write_text(text.replace("Qwen/Qwen3-4B-Instruct-2507", str(model)))
    return path


def ask(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["chat", *argv, "--query", "Who are you?", "--temperature", "0", "--max_new_tokens", "24"]) == 0
    return capsys.readouterr().out


def test_train_merge_and_chat_with_llama_factory_files(real_gguf, tmp_path, monkeypatch, capsys):
    repo = Path.cwd()
    monkeypatch.chdir(tmp_path)  # the files' relative paths (data/, saves/) as in a LLaMA-Factory checkout
    shutil.copytree(repo / "data", tmp_path / "data")
    train_file = write_pointed_at(tmp_path / "qwen3_lora_sft.yaml", TRAIN_YAML, real_gguf)
    assert main(["train", str(train_file), "--max_steps", "2"]) == 0
    run = tmp_path / "saves/qwen3-4b/lora/sft"
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "trainer_state.json").is_file() and (run / "training_loss.png").is_file()

    assert main(["export", str(write_pointed_at(tmp_path / "merge.yaml", MERGE_YAML, real_gguf))]) == 0
    merged = tmp_path / "saves/qwen3_sft_merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))

    with_adapter = ask(capsys, str(write_pointed_at(tmp_path / "infer.yaml", INFER_YAML, real_gguf)))
    from_merged = ask(capsys, "--model", str(merged), "--template", "qwen3_nothink")
    assert with_adapter.strip() and with_adapter == from_merged
