"""Whole runs through `train(args)` on a tiny model (with the real tokenizer and chat template)."""
import json

import pytest
import torch

from danlu.training.arguments import ArgumentError, TrainArguments
from danlu.training.checkpoint import latest_checkpoint, list_checkpoints
from danlu.training.loop import TrainingStopped
from danlu.training.train import train

pytestmark = pytest.mark.real  # the tiny model carries the real tokenizer


def args_for(model_dir, out, **overrides):
    values = dict(model_name_or_path=str(model_dir), dataset="identity,danlu_instruct", dataset_dir="data",
                  finetuning_type="lora", lora_target="all", lora_rank=4, learning_rate=5e-3, max_steps=6,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1, save_steps=3,
                  cutoff_len=128, output_dir=str(out), seed=7)
    values.update(overrides)
    return TrainArguments(**values)


def log_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_falls_and_outputs_are_written(tiny_chat_dir, tmp_path):
    result = train(args_for(tiny_chat_dir, tmp_path / "run", max_steps=12, val_size=0.1, eval_strategy="steps",
                            eval_steps=6, plot_loss=True))
    assert result.state.global_step == 12
    assert sum(result.train_losses[-3:]) / 3 < sum(result.train_losses[:3]) / 3
    assert len(result.eval_losses) == 2 and all(l > 0 for l in result.eval_losses)
    out = tmp_path / "run"  # as LLaMA-Factory: the adapter at the root, beside the checkpoints
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    assert (out / "eval_loss.png").is_file() and (out / "tokenizer.json").is_file()
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9", "checkpoint-12"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def interrupt_at_step(monkeypatch, step):
    """Make the optimizer step number `step` raise KeyboardInterrupt, as Ctrl-C would."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(*a, **k):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_resume_continues_the_same_loss_curve(tiny_chat_dir, tmp_path, monkeypatch):
    train(args_for(tiny_chat_dir, tmp_path / "straight", lr_scheduler_type="cosine", warmup_steps=2))
    straight = log_losses(tmp_path / "straight")
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            train(args_for(tiny_chat_dir, tmp_path / "split", lr_scheduler_type="cosine", warmup_steps=2,
                           save_steps=100))
    assert latest_checkpoint(tmp_path / "split").name == "checkpoint-3"
    train(args_for(tiny_chat_dir, tmp_path / "split", lr_scheduler_type="cosine", warmup_steps=2,
                   resume_from_checkpoint="latest"))
    resumed = log_losses(tmp_path / "split")
    assert len(resumed) == len(straight) == 6
    assert resumed == pytest.approx(straight, abs=1e-5)


@pytest.mark.parametrize("finetuning_type,extra", [("full", {}), ("freeze", {"freeze_trainable_layers": 1})])
def test_full_and_freeze(tiny_chat_dir, tmp_path, finetuning_type, extra):
    result = train(args_for(tiny_chat_dir, tmp_path / finetuning_type, finetuning_type=finetuning_type,
                            learning_rate=1e-3, **extra))
    assert (tmp_path / finetuning_type / "config.json").is_file()
    assert (tmp_path / finetuning_type / "model.safetensors").is_file()
    if finetuning_type == "freeze":
        assert result.trainable_parameters < result.all_parameters / 2


def test_output_dir_with_a_run_is_refused(tiny_chat_dir, tmp_path):
    train(args_for(tiny_chat_dir, tmp_path / "run", max_steps=1))
    with pytest.raises(ArgumentError, match="already holds a run.*overwrite_output_dir"):
        train(args_for(tiny_chat_dir, tmp_path / "run", max_steps=1))
    train(args_for(tiny_chat_dir, tmp_path / "run", max_steps=1, overwrite_output_dir=True))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_chat_dir, tmp_path, monkeypatch):
    import danlu.training.recipes.pt as causal_lm

    real_loss = causal_lm.causal_lm_loss
    calls = []

    def loss_going_nan(logits, labels):
        calls.append(1)
        loss, n = real_loss(logits, labels)
        return (loss * float("nan"), n) if len(calls) > 8 else (loss, n)  # from step 5 on (2 micro-batches/step)

    monkeypatch.setattr(causal_lm, "causal_lm_loss", loss_going_nan)
    with pytest.raises(TrainingStopped, match="the loss became nan at step 5.*checkpoint-3"):
        train(args_for(tiny_chat_dir, tmp_path / "run"))
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-3"]


def test_ctrl_c_saves_a_checkpoint(tiny_chat_dir, tmp_path, monkeypatch):
    interrupt_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(args_for(tiny_chat_dir, tmp_path / "run", save_steps=100))
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"


def test_full_disk_while_saving_leaves_no_partial_checkpoint(tiny_chat_dir, tmp_path, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    saves = []

    def disk_full_on_second(*a, **k):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_second)
    with pytest.raises(OSError, match="No space left"):
        train(args_for(tiny_chat_dir, tmp_path / "run"))
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-3"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".checkpoint")]


def test_packing_trains_on_rows_of_several_examples(tiny_chat_dir, tmp_path):
    result = train(args_for(tiny_chat_dir, tmp_path / "run", packing=True, cutoff_len=256, max_steps=3))
    assert result.state.global_step == 3 and all(l == l for l in result.train_losses)


def test_continued_pretraining_uses_and_reuses_a_token_cache(tiny_chat_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "book.txt").write_text("\n".join(f"Line {i} of a book about furnaces and elixirs." for i in range(200)))
    (corpus / "dataset_info.json").write_text(json.dumps({"book": {"file_name": "book.txt"}}))
    args = dict(stage="pt", dataset="book", dataset_dir=str(corpus), cutoff_len=64, val_size=0.1,
                eval_strategy="steps", eval_steps=3, max_steps=6, finetuning_type="full", learning_rate=1e-3)
    first = train(args_for(tiny_chat_dir, tmp_path / "pt1", **args))
    caches = list((tmp_path / "home" / "token-cache").glob("*.bin"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    train(args_for(tiny_chat_dir, tmp_path / "pt2", **args))
    assert caches[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert first.train_losses[-1] < first.train_losses[0] and first.eval_losses


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_adapters_on_quantized_base(tiny_chat_dir, tmp_path, bits):
    from danlu.tuning.lora import load_adapter

    result = train(args_for(tiny_chat_dir, tmp_path / "run", quantization_bit=bits, max_steps=6))
    assert result.train_losses[-1] < result.train_losses[0]
    from danlu.checkpoints.load import load_pretrained

    lm = load_pretrained(tiny_chat_dir, dtype="float32")
    load_adapter(lm.model, tmp_path / "run")  # a QLoRA adapter applies to the float base


def test_gradient_checkpointing_gives_the_same_losses(tiny_chat_dir, tmp_path):
    plain = train(args_for(tiny_chat_dir, tmp_path / "plain", max_steps=3))
    checkpointed = train(args_for(tiny_chat_dir, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True))
    assert checkpointed.train_losses == pytest.approx(plain.train_losses, abs=1e-5)


def test_sgd_and_constant_schedule_run(tiny_chat_dir, tmp_path):
    result = train(args_for(tiny_chat_dir, tmp_path / "sgd", optim="sgd", lr_scheduler_type="constant_with_warmup",
                            warmup_ratio=0.5, learning_rate=0.1, max_steps=4))
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "sgd" / "trainer_log.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1]) and result.state.global_step == 4


def test_additional_target_is_saved_as_peft_modules_to_save(tiny_chat_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from danlu.checkpoints.load import load_pretrained
    from danlu.tuning.lora import load_adapter

    train(args_for(tiny_chat_dir, tmp_path / "run", lora_target="q_proj", additional_target="norm",
                   max_steps=3, learning_rate=0.05))
    adapter = tmp_path / "run"
    lm = load_pretrained(tiny_chat_dir, dtype="float32")
    before = lm.model.model.norm.weight.clone()
    load_adapter(lm.model, adapter)
    assert not torch.equal(lm.model.model.norm.weight, before)  # the trained norm came with the adapter
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), str(adapter)).eval()
    ids = torch.randint(3, 1000, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - lm.model(ids)).abs().max().item() <= 1e-4


def test_load_best_model_at_end_restores_the_best_eval(tiny_chat_dir, tmp_path):
    from danlu.checkpoints.adapters import read_adapter
    from safetensors.torch import load_file

    result = train(args_for(tiny_chat_dir, tmp_path / "run", max_steps=9, val_size=0.2, eval_strategy="steps",
                            eval_steps=3, learning_rate=0.3, load_best_model_at_end=True, save_total_limit=2))
    best = min(range(len(result.eval_losses)), key=result.eval_losses.__getitem__)
    assert result.state.best_checkpoint == f"checkpoint-{3 * (best + 1)}"
    saved = load_file(str(tmp_path / "run" / result.state.best_checkpoint / "trainable.safetensors"))
    final = read_adapter(tmp_path / "run").lora_state
    key = next(k for k in final if "lora_B" in k)
    assert torch.equal(final[key], saved[key.replace(".lora_B.", ".lora_B.")])
    names = [c.name for c in list_checkpoints(tmp_path / "run")]
    assert result.state.best_checkpoint in names and len(names) <= 2
    assert all("memory_gib" in r for r in map(json.loads, (tmp_path / "run" / "trainer_log.jsonl").read_text()
                                                 .splitlines()) if "loss" in r)


def test_include_num_input_tokens_seen_logs_a_growing_count(tiny_chat_dir, tmp_path):
    train(args_for(tiny_chat_dir, tmp_path / "run", max_steps=3, include_num_input_tokens_seen=True))
    seen = [r["num_input_tokens_seen"] for r in map(json.loads, (tmp_path / "run" / "trainer_log.jsonl")
                                                    .read_text().splitlines())]
    assert len(seen) == 3 and 0 < seen[0] < seen[1] < seen[2]


def test_report_to_tensorboard_writes_scalars(tiny_chat_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(args_for(tiny_chat_dir, tmp_path / "run", report_to="tensorboard", max_steps=3, val_size=0.2,
                   eval_strategy="steps", eval_steps=3))
    events = EventAccumulator(str(tmp_path / "run" / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert len(events.Scalars("eval/loss")) == 1


def test_eval_dataset_is_used_for_validation_as_in_llama_factory(tiny_chat_dir, tmp_path, caplog):
    identity = len(json.loads(open("data/identity.json").read()))
    instruct = len(json.loads(open("data/danlu_instruct.json").read()))
    with caplog.at_level("INFO", logger="danlu"):
        result = train(args_for(tiny_chat_dir, tmp_path / "run", dataset="danlu_instruct", eval_dataset="identity",
                                val_size=0.5, eval_strategy="steps", eval_steps=3, max_steps=3))
    # the named evaluation set replaces the val_size split
    assert f"training examples: {instruct}, validation examples: {identity}" in caplog.text
    assert len(result.eval_losses) == 1 and result.eval_losses[0] > 0


def test_chunked_loss_trains_the_same_curve(tiny_chat_dir, tmp_path):
    plain = train(args_for(tiny_chat_dir, tmp_path / "plain", max_steps=3))
    chunked = train(args_for(tiny_chat_dir, tmp_path / "chunked", max_steps=3, loss_chunk_size=16))
    assert chunked.train_losses == pytest.approx(plain.train_losses, abs=1e-5)


def test_overwrite_output_dir_removes_the_earlier_run_and_nothing_else(tiny_chat_dir, tmp_path):
    out = tmp_path / "run"
    train(args_for(tiny_chat_dir, out, max_steps=3, finetuning_type="full", learning_rate=1e-3))
    (out / "notes.txt").write_text("mine")
    train(args_for(tiny_chat_dir, out, max_steps=3, overwrite_output_dir=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


def test_llama_factory_keys_that_change_nothing_say_so_once(caplog, monkeypatch):
    from danlu.training import arguments
    from danlu.training.arguments import parse_train_arguments

    monkeypatch.setattr(arguments, "_SAID_IGNORED", set())
    argv = ["--dataset", "identity", "--trust_remote_code", "true", "--dataloader_num_workers", "4",
            "--preprocessing_num_workers", "16", "--save_only_model", "false"]
    with caplog.at_level("WARNING", logger="danlu"):
        parse_train_arguments(argv)
        parse_train_arguments(argv)
    said = [r.getMessage() for r in caplog.records]
    assert sum("trust_remote_code" in m for m in said) == 1 and sum("dataloader_num_workers" in m for m in said) == 1
    assert not any("save_only_model" in m for m in said)  # left at its default: nothing to say


def test_train_from_scratch_starts_from_the_published_initialisation(tiny_chat_dir, tmp_path):
    import math

    from danlu.checkpoints.load import load_pretrained

    result = train(args_for(tiny_chat_dir, tmp_path / "run", train_from_scratch=True, finetuning_type="full",
                            learning_rate=1e-3, max_steps=2))
    vocab = load_pretrained(tiny_chat_dir).config.vocab_size
    # weights drawn with std 0.02 give near-uniform predictions: the first loss is about ln(vocab)
    assert result.train_losses[0] == pytest.approx(math.log(vocab), abs=0.05)
    trained = load_pretrained(tmp_path / "run").model
    assert abs(trained.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
