"""The CLI subcommands, run in-process as a user types them."""
import json

import pytest

from danlu.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("preset,count", [("qwen2-7b", 7_615_616_512), ("qwen2-72b", 72_706_203_648),
                                          ("qwen1.5-7b", 7_721_324_544), ("llama-2-7b", 6_738_415_616),
                                          ("smollm2-135m", 134_515_008)])
def test_model_info_prints_plain_integer_count(capsys, preset, count):
    code, out, _ = run(capsys, "model-info", preset)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("parameters "))
    assert line.split() == ["parameters", str(count)]


def test_model_info_json_memory_and_kv_cache(capsys):
    code, out, _ = run(capsys, "model-info", "qwen2-7b", "--json")
    info = json.loads(out)
    assert info["parameters"] == 7_615_616_512
    assert info["weights_bytes"]["bfloat16"] == 2 * 7_615_616_512
    assert info["kv_cache_bytes_per_token"]["bfloat16"] == 2 * 28 * 4 * 128 * 2


def test_model_info_of_an_encoder_shows_its_positions_and_no_kv_cache(capsys):
    code, out, _ = run(capsys, "model-info", "all-minilm-l6-v2")
    assert code == 0 and "MHA (bidirectional)" in out
    assert "learned absolute embeddings (512)" in out and "rope" not in out and "KV cache" not in out
    assert next(line for line in out.splitlines() if line.startswith("parameters ")).split()[1] == "22713216"


def test_model_info_of_real_gguf_without_loading_weights(capsys, real_gguf):
    code, out, _ = run(capsys, "model-info", str(real_gguf), "--json")
    assert code == 0 and json.loads(out)["parameters"] == 134_515_008


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "model-info", str(tmp_path / "missing.gguf"))
    assert code == 2 and "missing.gguf: no such file or directory" in err


@pytest.fixture
def prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello there\nWhat is 2+2?\n\nName a colour\n", encoding="utf-8")
    return path


def test_generate_txt_then_resume(capsys, tiny_chat_dir, prompts_txt, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["generate", "--model", str(tiny_chat_dir), "--input", str(prompts_txt), "--output", str(out),
            "--max_new_tokens", "5", "--temperature", "0", "--batch_size", "2", "--chat"]
    assert run(capsys, *args)[0] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello there", "What is 2+2?", "Name a colour"]
    assert all(r["completion_tokens"] <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    # A crash mid-write leaves a torn last line: it is dropped and that prompt answered again.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:10])
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "(1 were already there)" in stdout
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in again) == [0, 1, 2]
    assert again == rows  # greedy: the same answers
    code, stdout, _ = run(capsys, *args)
    assert "all 3 prompts already answered" in stdout


def test_seeded_sampling_gives_each_line_its_answer_whatever_the_batches_and_resumes(capsys, tiny_chat_dir,
                                                                                    prompts_txt, tmp_path):
    def answers(out, batch_size):
        args = ["generate", "--model", str(tiny_chat_dir), "--input", str(prompts_txt), "--output", str(out),
                "--max_new_tokens", "8", "--temperature", "1.0", "--top_k", "0", "--seed", "5",
                "--batch_size", str(batch_size), "--chat"]
        assert run(capsys, *args)[0] == 0
        return {r["index"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}

    whole = answers(tmp_path / "whole.jsonl", 3)
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text((tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)[1])  # line 1 answered
    assert answers(resumed, 1) == whole  # lines 0 and 2 sampled alone, after a resume: as in one batch


def test_generate_jsonl_with_messages_and_extra_fields(capsys, tiny_chat_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"}]}) + "\n" +
                   json.dumps({"id": "b", "instruction": "Translate", "input": "你好"}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert run(capsys, "generate", "--model", str(tiny_chat_dir), "--input", str(src), "--output", str(out),
               "--max_new_tokens", "3", "--temperature", "0")[0] == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["prompt"] == "Translate\n你好"


def test_generate_bad_jsonl_names_file_and_line(capsys, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": oops}\n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--input", str(src), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "bad.jsonl:2: invalid JSON" in err


def test_generate_line_without_prompt_field(capsys, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": 1}\n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--input", str(src), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "bad.jsonl:1: no prompt field" in err


def test_generate_refuses_foreign_output_file(capsys, prompts_txt, tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text("my own notes\nmore\n")
    code, _, err = run(capsys, "generate", "--input", str(prompts_txt), "--output", str(out))
    assert code == 2 and "not a result of danlu generate" in err
    assert out.read_text() == "my own notes\nmore\n"


def test_eval_perplexity_cli(capsys, tiny_chat_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("A small text to score. " * 30, encoding="utf-8")
    code, out, _ = run(capsys, "eval", "--task", "perplexity", "--model", str(tiny_chat_dir), "--input", str(text),
                       "--ctx", "64", "--json")
    result = json.loads(out)
    assert code == 0 and result["perplexity"] > 1 and result["windows"] >= 2


def test_eval_missing_input(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--input", str(tmp_path / "none.txt"))
    assert code == 2 and "none.txt: no such file" in err


def test_convert_cli_hf_to_hf(capsys, tiny_chat_dir, tmp_path):
    code, out, _ = run(capsys, "convert", str(tiny_chat_dir), str(tmp_path / "copy"), "--dtype", "float16")
    assert code == 0 and json.loads((tmp_path / "copy" / "config.json").read_text())["torch_dtype"] == "float16"
    assert (tmp_path / "copy" / "tokenizer.json").is_file()
    code, _, err = run(capsys, "convert", str(tiny_chat_dir), str(tmp_path / "copy"))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "convert", str(tiny_chat_dir), str(tmp_path / "x"), "--shard_size", "lots")
    assert code == 2 and "--shard_size" in err



@pytest.mark.parametrize("command", ["generate", "chat"])
def test_compile_flag_chooses_the_compiled_decoding(command):
    """What --compile does is tested where it is done (tests/generation/test_static_decoding.py, and on the real
    model in tests/quantization); here only that the flag reaches it (a compile costs CI ~20 s a model)."""
    from danlu.cli.common import decoding_of
    from danlu.cli.main import build_parser

    parser = build_parser()
    extra = ["--input", "in.txt", "--output", "out.jsonl"] if command == "generate" else []
    assert decoding_of(parser.parse_args([command, *extra, "--compile"])) == "compiled"
    assert decoding_of(parser.parse_args([command, *extra])) == "dynamic"
