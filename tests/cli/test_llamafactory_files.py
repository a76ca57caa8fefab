"""LLaMA-Factory's merge and inference files, exactly as it ships them, through `danlu export`, chat and the rest.

Only the model, adapter and output paths are pointed at local tiny files; everything else is LLaMA-Factory's text.
"""
import json

import pytest
import torch

from danlu.cli.main import main, parse_command_line
from danlu.training import arguments
from tests.conftest import CHATML, byte_tokenizer, make_hf_model, save_hf_model
from tests.llamafactory_examples import GPTQ_YAML, INFER_YAML, MERGE_YAML

# LLaMA-Factory's examples/merge_lora/qwen3_full_sft.yaml is that file without its note and adapter: the model
# is written again.
FULL_SFT_YAML = (MERGE_YAML[MERGE_YAML.index("### model"):]
                 .replace("adapter_name_or_path: saves/qwen3-4b/lora/sft\n", "")
                 .replace("Qwen/Qwen3-4B-Instruct-2507", "saves/qwen3-4b/full/sft"))
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Qwen2 with a chat tokenizer, a LoRA adapter for it made by PEFT, and PEFT's merge as reference."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lf")
    tokenizer = byte_tokenizer()
    hf = make_hf_model("qwen2", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = save_hf_model(hf, root / "base", tokenizer)
    with torch.no_grad():
        base_logits = hf(IDS).logits
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained, and enough to change the answers
    peft_model.save_pretrained(root / "adapter")
    with torch.no_grad():
        merged_logits = peft_model.merge_and_unload().eval()(IDS).logits
    return {"root": root, "base": base, "adapter": root / "adapter", "base_logits": base_logits,
            "merged_logits": merged_logits}


def lf_file(path, text, files, out=None, model=None):
    """LLaMA-Factory's file with its model, adapter and output paths pointed at the local ones."""
    local = {"Qwen/Qwen3-4B-Instruct-2507": str(model or files["base"]), "saves/qwen3-4b/full/sft": str(files["base"]),
             "saves/qwen3-4b/lora/sft": str(files["adapter"]), "saves/qwen3_sft_merged": str(out),
             "saves/qwen3_gptq": str(out)}
    for theirs, ours in local.items():
        text = text.replace(theirs, ours)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def said(monkeypatch, caplog):
    """The 'accepted and ignored' messages logged in this test, each key's as if for the first time."""
    monkeypatch.setattr(arguments, "_SAID_IGNORED", set())
    return lambda key: [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{key}: ")]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def logits_of(directory):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()(IDS).logits


# ---------------------------------------------------------------- danlu export = llamafactory-cli export


def test_merge_yaml_exports_what_peft_merges(files, tmp_path, capsys, said):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    config = lf_file(tmp_path / "merge.yaml", MERGE_YAML, files, out)
    code, stdout, err = run(capsys, "export", config)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))
    assert (logits_of(out) - files["merged_logits"]).abs().max().item() <= 1e-4
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # the base's dtype
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"  # as LLaMA-Factory's export leaves it
    # trust_remote_code: true is said to be ignored, once; flags override the file.
    again = tmp_path / "again"
    code, _, err = run(capsys, "export", config, "--export_dir", again, "--export_size", "1")
    assert code == 0, err
    assert (logits_of(again) - files["merged_logits"]).abs().max().item() <= 1e-4
    assert len(said("trust_remote_code")) == 1 and "runs no code from model repositories" in said("trust_remote_code")[0]
    assert not said("export_device")  # cpu is LLaMA-Factory's default


def test_full_sft_yaml_writes_the_model_again(files, tmp_path, capsys):
    out = tmp_path / "resaved"
    code, _, err = run(capsys, "export", lf_file(tmp_path / "full.yaml", FULL_SFT_YAML, files, out))
    assert code == 0, err
    assert torch.equal(logits_of(out), files["base_logits"])


@pytest.mark.parametrize("text,message", [
    (MERGE_YAML.replace("export_legacy_format: false", "export_legacy_format: true"),
     "export_legacy_format: True is not supported: danlu writes safetensors only"),
    (GPTQ_YAML, "export_quantization_bit: 4 is not supported"),
    (MERGE_YAML + "export_hub_model_id: me/qwen3-sft\n", "export_hub_model_id: 'me/qwen3-sft' is not supported"),
    (MERGE_YAML.replace("export_size", "export_szie"), "unknown argument 'export_szie'; did you mean 'export_size'?"),
    (MERGE_YAML.replace("export_device: cpu", "export_device: cuda"), "export_device must be one of cpu, auto"),
    (MERGE_YAML + "finetuning_type: full\n", "finetuning_type 'full' with adapter_name_or_path: adapters are only"),
    (MERGE_YAML + "infer_dtype: float16\nexport_dtype: bf16\n", "export_dtype 'bf16' and infer_dtype 'float16' disagree"),
])
def test_export_refuses_what_it_cannot_do_before_loading(files, tmp_path, capsys, text, message):
    out = tmp_path / "never"
    config = lf_file(tmp_path / "merge.yaml", text, files, out)
    code, _, err = run(capsys, "export", config)
    assert code == 2 and f"{config}: {message}" in err
    assert not out.exists()


def test_export_ignored_keys_say_so_once(files, tmp_path, said):
    from danlu.cli.common import parse_keys
    from danlu.cli.export import ExportArguments

    text = MERGE_YAML.replace("export_device: cpu", "export_device: auto") + "export_quantization_nsamples: 64\n"
    config = lf_file(tmp_path / "merge.yaml", text, files, tmp_path / "out")
    for _ in range(2):
        keys = parse_keys([config], ExportArguments)
    assert keys.export_size == 5 and keys.template == "qwen3_nothink"
    assert len(said("export_device")) == 1 and "merges on the CPU" in said("export_device")[0]
    assert len(said("export_quantization_nsamples")) == 1


def test_export_leaves_the_tokenizer_as_llamafactory_does():
    from danlu.cli.export import prepare_tokenizer
    from danlu.tokenization.templates import TEMPLATES
    from danlu.training.arguments import ArgumentError

    tokenizer = byte_tokenizer()
    prepare_tokenizer(tokenizer, "qwen3_nothink")  # the model's own chat template stays
    assert (tokenizer.chat_template, tokenizer.eos_token, tokenizer.padding_side) == (CHATML, "<|im_end|>", "left")
    prepare_tokenizer(tokenizer, "chatml")  # one of LLaMA-Factory's templates that replace the model's own
    assert tokenizer.chat_template == TEMPLATES["chatml"].jinja
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    prepare_tokenizer(tokenizer, "qwen3_nothink")  # replace_eos: the template's stop word becomes the eos
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 259
    with pytest.raises(ArgumentError, match="template 'llama3' makes '<\\|eot_id\\|>' the eos token, but"):
        prepare_tokenizer(byte_tokenizer(), "llama3")
    with pytest.raises(ArgumentError, match="template 'alpaca': LLaMA-Factory writes it, with its default system"):
        prepare_tokenizer(byte_tokenizer(), "alpaca")


def test_export_help_lists_the_keys(capsys):
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0 and "--export_legacy_format (default: False; any other value is refused" in out
    assert "--export_device (default: cpu; ignored: danlu merges on the CPU" in out


# ---------------------------------------------------------------- chat, api, webui, generate FILE.yaml


def test_inference_yaml_chat_answers_as_the_same_flags(files, tmp_path, capsys, said):
    config = lf_file(tmp_path / "infer.yaml", INFER_YAML, files)
    question = ["--query", "Hello there", "--max_new_tokens", "12", "--seed", "7"]
    code, from_file, err = run(capsys, "chat", config, *question)
    assert code == 0, err
    assert from_file.startswith("User: Hello there\nAssistant: ")
    flags = ["--model_name_or_path", files["base"], "--template", "qwen3_nothink"]
    assert run(capsys, "chat", *flags, "--adapter_name_or_path", files["adapter"], *question)[1] == from_file
    assert run(capsys, "chat", *flags, *question)[1] != from_file  # the file's adapter is in use
    assert len(said("trust_remote_code")) == 1
    assert not said("infer_backend")  # huggingface: nothing to say


def test_inference_yaml_generate_writes_the_same_answers(files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nName a colour\n", encoding="utf-8")
    config = lf_file(tmp_path / "infer.yaml", INFER_YAML + "do_sample: false\nmax_new_tokens: 6\n", files)
    code, _, err = run(capsys, "generate", config, "--input", prompts, "--output", tmp_path / "a.jsonl", "--chat")
    assert code == 0, err
    assert run(capsys, "generate", "--model", files["base"], "--adapter", files["adapter"], "--template",
               "qwen3_nothink", "--temperature", "0", "--max_new_tokens", "6", "--input", prompts,
               "--output", tmp_path / "b.jsonl", "--chat")[0] == 0
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert answers == [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert all(a["completion_tokens"] <= 6 for a in answers)


GENERATING = """\
default_system: You are terse.
infer_dtype: float32
do_sample: true
temperature: 0.3
top_p: 0.8
top_k: 20
max_new_tokens: 99
repetition_penalty: 1.1
"""


@pytest.mark.parametrize("command,extra", [("chat", []), ("webui", []),
                                           ("generate", ["--input", "p.txt", "--output", "o.jsonl"])])
def test_inference_keys_become_the_options(files, tmp_path, command, extra):
    config = lf_file(tmp_path / "infer.yaml", INFER_YAML + GENERATING, files)
    args = parse_command_line([command, config, *extra])
    assert (args.model, args.adapter, args.template, args.system, args.dtype) == (
        str(files["base"]), str(files["adapter"]), "qwen3_nothink", "You are terse.", "float32")
    assert (args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.repetition_penalty) == (
        0.3, 0.8, 20, 99, 1.1)
    flags = parse_command_line([command, *extra, "--temperature", "0.9", "--template", "chatml", "--model", "m",
                                "--system", "Be kind.", config, "--top_k", "0"])
    assert (flags.temperature, flags.template, flags.model, flags.system, flags.top_k, flags.top_p) == (
        0.9, "chatml", "m", "Be kind.", 0, 0.8)


def test_api_takes_the_model_keys_and_max_new_tokens(files, tmp_path):
    config = lf_file(tmp_path / "infer.yaml", INFER_YAML + "max_new_tokens: 64\n", files)
    args = parse_command_line(["api", config, "--port", "8123"])
    assert (args.model, args.adapter, args.template, args.max_tokens, args.port) == (
        str(files["base"]), str(files["adapter"]), "qwen3_nothink", 64, 8123)


@pytest.mark.parametrize("command,default,extra", [("chat", 0.7, []),
                                                   ("generate", 0.0, ["--input", "p", "--output", "o"])])
def test_do_sample(files, tmp_path, command, default, extra):
    def temperature(text, *flags):
        config = lf_file(tmp_path / "infer.yaml", INFER_YAML + text, files)
        return parse_command_line([command, config, *extra, *flags]).temperature

    assert temperature("") == default
    assert temperature("do_sample: false\ntemperature: 0.5\n") == 0  # greedy, as LLaMA-Factory
    assert temperature("do_sample: false\n", "--temperature", "0.5") == 0.5  # the flag wins
    assert temperature("do_sample: true\n") == (default or 0.95)  # sampling, LLaMA-Factory's temperature if need be
    assert temperature("do_sample: true\ntemperature: 0\n") == 0  # LLaMA-Factory: temperature 0 is greedy


def test_other_backends_are_said_once_to_be_ignored(files, tmp_path, said):
    config = lf_file(tmp_path / "infer.yaml", INFER_YAML.replace("infer_backend: huggingface", "infer_backend: vllm")
                     + "vllm_enforce_eager: true\n", files)
    for _ in range(2):
        parse_command_line(["chat", config])
    assert said("infer_backend") == ["infer_backend: 'vllm' is accepted for LLaMA-Factory compatibility and "
                                     "ignored: danlu's own engine serves instead"]
    assert len(said("vllm_enforce_eager")) == 1


def test_enable_thinking_false_turns_a_reasoning_template_off(files, tmp_path):
    config = lf_file(tmp_path / "infer.yaml",
                     INFER_YAML.replace("qwen3_nothink", "qwen3") + "enable_thinking: false\n", files)
    args = parse_command_line(["chat", config])
    assert args.template.name == "qwen3" and args.template.enable_thinking is False
    assert parse_command_line(["chat", config, "--template", "chatml"]).template.name == "chatml"


@pytest.mark.parametrize("command,text,message", [
    ("chat", INFER_YAML.replace("infer_backend", "infer_backnd"),
     "unknown argument 'infer_backnd'; did you mean 'infer_backend'?"),
    ("chat", INFER_YAML.replace("huggingface", "tgi"), "infer_backend must be one of huggingface, vllm, sglang"),
    ("chat", INFER_YAML.replace("qwen3_nothink", "qwen9"), "template: unknown template 'qwen9'"),
    ("chat", INFER_YAML + "num_beams: 4\n", "num_beams: 4 is not supported: danlu decodes greedily or by sampling"),
    ("chat", INFER_YAML + "quantization_bit: 4\n", "quantization_bit: 4 is not supported"),
    ("webui", INFER_YAML + "skip_special_tokens: false\n", "skip_special_tokens: False is not supported"),
    ("generate", INFER_YAML + "finetuning_type: freeze\n", "finetuning_type 'freeze' with adapter_name_or_path"),
    ("chat", "enable_thinking: false\n", "enable_thinking: false needs a named template"),
    ("chat", INFER_YAML + "top_k: many\n", "top_k: expected an integer, got 'many'"),
    ("api", INFER_YAML + "temperature: 0.2\n", "temperature: danlu api has no server-wide setting for it"),
    ("api", INFER_YAML + "default_system: Hi\n", "default_system: danlu api has no server-wide setting for it"),
])
def test_inference_file_errors_name_file_and_key(files, tmp_path, capsys, command, text, message):
    config = lf_file(tmp_path / "infer.yaml", text, files)
    extra = ["--input", "p.txt", "--output", "o.jsonl"] if command == "generate" else []
    code, _, err = run(capsys, command, config, *extra)
    assert code == 2 and f"danlu {command}: error: {config}: {message}" in err


def test_missing_inference_file(capsys, tmp_path):
    code, _, err = run(capsys, "chat", tmp_path / "none.yaml", "--query", "hi")
    assert code == 2 and "none.yaml: no such config file" in err
