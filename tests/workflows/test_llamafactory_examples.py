"""LLaMA-Factory's own example files, as it ships them (examples/train_lora/qwen3_lora_sft.yaml,
examples/merge_lora/qwen3_lora_sft.yaml, examples/inference/qwen3_lora_sft.yaml at LLaMA-Factory ff6d4d1),
run through danlu with only model_name_or_path pointed at the bundled model and a step limit added:
train, merge with the merge file, chat with the inference file.
"""
import shutil
from pathlib import Path

import pytest

from danlu.cli.main import main

pytestmark = pytest.mark.real

TRAIN = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

MERGE = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink
trust_remote_code: true

### export
export_dir: saves/qwen3_sft_merged
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""

INFERENCE = """\
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink
infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]
trust_remote_code: true
"""


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
    train_file = write_pointed_at(tmp_path / "qwen3_lora_sft.yaml", TRAIN, real_gguf)
    assert main(["train", str(train_file), "--max_steps", "2"]) == 0
    run = tmp_path / "saves/qwen3-4b/lora/sft"
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "trainer_state.json").is_file() and (run / "training_loss.png").is_file()

    assert main(["export", str(write_pointed_at(tmp_path / "merge.yaml", MERGE, real_gguf))]) == 0
    merged = tmp_path / "saves/qwen3_sft_merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))

    with_adapter = ask(capsys, str(write_pointed_at(tmp_path / "infer.yaml", INFERENCE, real_gguf)))
    from_merged = ask(capsys, "--model", str(merged), "--template", "qwen3_nothink")
    assert with_adapter.strip() and with_adapter == from_merged
