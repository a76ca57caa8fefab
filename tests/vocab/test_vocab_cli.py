"""`danlu vocab extend`: the report it prints, and one clear line for each bad input."""
import json

import pytest

from danlu.cli import main as cli_main
from tests.vocab.conftest import ZH_CORPUS


def run(capsys, *argv):
    code = cli_main.main(["vocab", "extend", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_tokens_prints_the_report(capsys, byte_model_dir, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("天气\n北京\n天气\n", encoding="utf-8")
    code, out, _ = run(capsys, byte_model_dir, "--add-tokens", tokens, "--output", tmp_path / "out",
                       "--eval-text", ZH_CORPUS)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "added 2 tokens: 天气 北京"
    assert lines[1] == "skipped 1: 1 duplicates, 0 already in the vocabulary, 0 unreachable by one merge"
    assert lines[2] == "vocabulary size 259 -> 261" and lines[3].startswith("tokens per character ")
    assert lines[4] == f"wrote {tmp_path / 'out'}"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def bad_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("天气\n".encode() + "café\n".encode("latin-1"))
    return path


def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n", encoding="utf-8")
    return path


def no_tokenizer_dir(tmp_path, byte_model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((byte_model_dir / name).read_bytes())
    return bare


@pytest.mark.parametrize("case, argv, message", [
    ("missing token file", lambda t, m: [m, "--add-tokens", t / "nope.txt"], r"nope.txt: no such token file"),
    ("empty token file", lambda t, m: [m, "--add-tokens", empty_file(t)], r"empty.txt: no tokens \(expected one"),
    ("bad line", lambda t, m: [m, "--add-tokens", bad_utf8_file(t)], r"latin1.txt:2: not UTF-8 text"),
    ("missing corpus", lambda t, m: [m, "--train-merges", t / "c.txt", "--size", "300"], r"c.txt: no such corpus"),
    ("no size", lambda t, m: [m, "--train-merges", ZH_CORPUS], r"--train-merges needs --size"),
    ("zero size", lambda t, m: [m, "--train-merges", ZH_CORPUS, "--size", "0"],
     r"--size must be a positive number of pieces to learn, got 0"),
    ("size below the bytes", lambda t, m: [m, "--train-merges", ZH_CORPUS, "--size", "200"],
     r"--size 200: a byte-level BPE starts from 256 byte symbols, so it learns nothing below 257 pieces"),
    ("no tokenizer", lambda t, m: [no_tokenizer_dir(t, m), "--add-tokens", ZH_CORPUS],
     r"bare: no tokenizer \(looked for tokenizer.json, tokenizer.model, tokenizer_config.json\)"),
    ("a preset", lambda t, m: ["qwen2-0.5b", "--add-tokens", ZH_CORPUS],
     r"qwen2-0.5b: a preset has random weights and no tokenizer"),
    ("bad padding", lambda t, m: [m, "--add-tokens", ZH_CORPUS, "--pad-to-multiple-of", "0"],
     r"--pad-to-multiple-of must be a positive integer, got 0"),
])
def test_bad_input_is_one_line(capsys, byte_model_dir, tmp_path, case, argv, message):
    code, out, err = run(capsys, *argv(tmp_path, byte_model_dir), "--output", tmp_path / "out")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("danlu vocab: error: "), err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_nothing_new_and_an_existing_output_are_refused(capsys, byte_model_dir, tmp_path):
    known = tmp_path / "known.txt"
    known.write_text("a\nb\n", encoding="utf-8")
    code, _, err = run(capsys, byte_model_dir, "--add-tokens", known, "--output", tmp_path / "out")
    assert code == 2 and "nothing to add, every token is already in the vocabulary" in err
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, byte_model_dir, "--add-tokens", ZH_CORPUS, "--output", tmp_path / "out")
    assert code == 2 and "out: already exists; pass --force to replace it" in err


def test_add_tokens_and_train_merges_exclude_each_other(capsys, byte_model_dir, tmp_path):
    with pytest.raises(SystemExit):
        run(capsys, byte_model_dir, "--add-tokens", ZH_CORPUS, "--train-merges", ZH_CORPUS, "--output", tmp_path)
    assert "not allowed with argument" in capsys.readouterr().err
