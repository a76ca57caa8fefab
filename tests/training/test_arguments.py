import pytest

from danlu.training.arguments import ArgumentError, parse_train_arguments

# The command of the Qwen2 article, with only `llamafactory-cli` -> `danlu` and the model path changed.
ARTICLE_COMMAND = """--stage sft --do_train True --model_name_or_path MODEL --finetuning_type lora
  --template qwen --flash_attn auto --dataset_dir data --dataset alpaca_zh --cutoff_len 4096
  --learning_rate 5e-05 --num_train_epochs 5.0 --max_samples 100000 --per_device_train_batch_size 4
  --gradient_accumulation_steps 4 --lr_scheduler_type cosine --max_grad_norm 1.0 --logging_steps 10
  --save_steps 1000 --warmup_steps 0 --optim adamw_torch --packing False --report_to none
  --output_dir saves/Qwen2-7B-Instruct/lora/train_x --fp16 True --lora_rank 32 --lora_alpha 16
  --lora_dropout 0 --lora_target q_proj,v_proj --val_size 0.1 --evaluation_strategy steps
  --eval_steps 1000 --per_device_eval_batch_size 2 --load_best_model_at_end True --plot_loss True""".split()


def test_article_command_parses_with_llama_factory_meanings():
    args = parse_train_arguments(ARTICLE_COMMAND)
    assert args.learning_rate == 5e-5 and args.num_train_epochs == 5.0 and args.max_samples == 100000
    assert args.names("lora_target") == ["q_proj", "v_proj"] and args.lora_rank == 32 and args.lora_alpha == 16
    assert args.eval_strategy == "steps" and args.load_best_model_at_end and args.fp16 and args.packing is False
    assert args.template == "qwen" and args.names("dataset") == ["alpaca_zh"]


def test_yaml_then_flags_override(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("stage: sft\ndataset: identity\nlearning_rate: 1.0e-4\nlora_rank: 4\nbf16: true\n")
    args = parse_train_arguments([str(config), "--lora_rank", "16", "--max_steps=20"])
    assert args.learning_rate == 1e-4 and args.lora_rank == 16 and args.max_steps == 20 and args.bf16
    assert args.lora_alpha == 32  # LLaMA-Factory's default: twice the rank


def test_unknown_key_suggests_the_close_match():
    with pytest.raises(ArgumentError, match="unknown argument 'lerning_rate'; did you mean 'learning_rate'"):
        parse_train_arguments(["--dataset", "x", "--lerning_rate", "1e-4"])


@pytest.mark.parametrize("flags,message", [
    (["--num_train_epochs", "many"], "num_train_epochs: expected a number"),
    (["--fp16", "maybe"], "fp16: expected True or False"),
    (["--per_device_train_batch_size", "2.5"], "per_device_train_batch_size: expected an integer"),
    (["--finetuning_type", "lorra"], "did you mean 'lora'"),
    (["--lr_scheduler_type", "cosin"], "did you mean 'cosine'"),
    (["--quantization_bit", "3"], "quantization_bit must be 4 or 8"),
    (["--val_size", "1.5"], "val_size must be"),
    (["--fp16", "True", "--bf16", "True"], "choose one"),
])
def test_wrong_values_fail_before_any_work(flags, message):
    with pytest.raises(ArgumentError, match=message):
        parse_train_arguments(["--dataset", "identity", *flags])


def test_dataset_is_required():
    with pytest.raises(ArgumentError, match="dataset is required"):
        parse_train_arguments(["--stage", "sft"])


def test_bad_yaml_names_file_and_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("stage: sft\ndataset: [unclosed\nlr: 1\n")
    with pytest.raises(ArgumentError, match=r"bad.yaml: invalid YAML at line \d"):
        parse_train_arguments([str(config)])


@pytest.mark.parametrize("flags, message", [
    (["--stage", "dpo", "--pref_loss", "sigmiod"], "pref_loss must be one of .*did you mean 'sigmoid'"),
    (["--stage", "dpo", "--pref_loss", "ipo", "--dpo_label_smoothing", "0.1"], "only valid with pref_loss sigmoid"),
    (["--stage", "dpo", "--dpo_label_smoothing", "0.7"], r"dpo_label_smoothing must be in \[0, 0.5\]"),
    (["--stage", "dpo", "--pref_beta", "0"], "pref_beta must be positive"),
    (["--stage", "dpo", "--pref_bco_weight", "0.5"], "pref_bco_weight: 0.5 is not supported"),
    (["--stage", "dpo", "--ld_alpha", "0.5"], "ld_alpha: 0.5 is not supported"),
    (["--stage", "ppo"], "reward_model is necessary for PPO"),
    (["--stage", "ppo", "--reward_model", "x", "--reward_model_type", "api"], "reward_model_type must be one of"),
    (["--stage", "ppo", "--reward_model", "x", "--ppo_epochs", "0"], "ppo_epochs must be positive"),
    (["--stage", "ppo", "--reward_model", "x", "--top_p", "0"], r"top_p in \(0, 1\]"),
    (["--stage", "dpo", "--ref_model_adapters", "a"], "ref_model_adapters needs ref_model"),
])
def test_preference_keys_are_checked_before_any_work(flags, message):
    with pytest.raises(ArgumentError, match=message):
        parse_train_arguments(["--dataset", "d", *flags])


def test_preference_keys_take_llama_factory_defaults():
    args = parse_train_arguments(["--dataset", "d", "--stage", "dpo"])
    assert (args.pref_beta, args.pref_loss, args.pref_ftx, args.simpo_gamma) == (0.1, "sigmoid", 0.0, 0.5)
    assert args.uses_reference
    assert not parse_train_arguments(["--dataset", "d", "--stage", "dpo", "--pref_loss", "orpo"]).uses_reference
    ppo = parse_train_arguments(["--dataset", "d", "--stage", "ppo", "--reward_model", "r"])
    assert (ppo.ppo_epochs, ppo.ppo_buffer_size, ppo.ppo_target, ppo.reward_model_type) == (4, 1, 6.0, "lora")
    assert (ppo.temperature, ppo.top_p, ppo.top_k, ppo.max_new_tokens) == (0.95, 0.7, 50, 1024)
