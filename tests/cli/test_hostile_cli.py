"""A careless or hostile user's command lines (issue 16, item 5): each fails with one line naming the file or the
key, before any model loads, and never with a traceback (unless --debug asks for one)."""
import errno
import json
from pathlib import Path

import pytest

from danlu.cli.main import main
from tests.conftest import byte_tokenizer, make_hf_model, save_hf_model

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def loads(monkeypatch):
    """Every model load, recorded (and refused): the checks below must fail before any."""
    import danlu.checkpoints.load
    import danlu.training.train

    calls = []

    def load_pretrained(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(danlu.checkpoints.load, "load_pretrained", load_pretrained)
    monkeypatch.setattr(danlu.training.train, "load_pretrained", load_pretrained)
    return calls


def train_line(out, *extra):
    return ["train", "--model_name_or_path", "tiny-llama", "--dataset", "identity", "--dataset_dir", DATA,
            "--output_dir", out, "--max_steps", "1", *extra]


# ---------------------------------------------------------------- impossible schedules


@pytest.mark.parametrize("key,value", [("num_train_epochs", "-2"), ("num_train_epochs", "0"), ("max_steps", "-5"),
                                       ("learning_rate", "-0.5"), ("learning_rate", "nan"),
                                       ("per_device_train_batch_size", "0"), ("gradient_accumulation_steps", "0"),
                                       ("warmup_steps", "-1"), ("max_grad_norm", "-1"), ("max_samples", "-2")])
def test_an_impossible_schedule_is_refused_before_loading(capsys, tmp_path, loads, key, value):
    argv = ["train", "--model_name_or_path", "tiny-llama", "--dataset", "identity", "--dataset_dir", DATA,
            "--output_dir", tmp_path / "run", f"--{key}", value]
    if key != "max_steps":
        argv += ["--max_steps", "-1"]  # the epochs decide: num_train_epochs' default (3) unless set here
    code, out, err = run(capsys, *argv)
    line = one_line(err)
    assert code == 2 and line.startswith("danlu train: error: ") and key in line and value.lstrip("-") in line
    assert loads == [] and not (tmp_path / "run").exists()


def test_a_run_that_took_no_step_is_an_error_not_a_success(capsys, tmp_path, monkeypatch):
    import danlu.training.train
    from danlu.training.checkpoint import TrainerState
    from danlu.training.train import TrainResult

    monkeypatch.setattr(danlu.training.train, "train",
                        lambda args: TrainResult(TrainerState(), output_dir=Path(args.output_dir)))
    code, out, err = run(capsys, *train_line(tmp_path / "run"))
    line = one_line(err)
    assert code == 2 and "no optimizer step was taken" in line and "untrained" in line


# ---------------------------------------------------------------- outputs checked before the model loads


def test_train_output_dir_that_is_a_file(capsys, tmp_path, loads):
    (tmp_path / "run").write_text("not a directory")
    code, _, err = run(capsys, *train_line(tmp_path / "run"))
    line = one_line(err)
    assert code == 2 and f"output_dir {tmp_path / 'run'} is a file" in line and loads == []


def test_train_output_dir_under_a_file(capsys, tmp_path, loads):
    (tmp_path / "some_file").write_text("x")
    code, _, err = run(capsys, *train_line(tmp_path / "some_file" / "sub" / "run"))
    line = one_line(err)
    assert code == 2 and "output_dir" in line and f"{tmp_path / 'some_file'} is a file" in line and loads == []


def test_train_output_dir_on_a_read_only_file_system(capsys, tmp_path, loads, monkeypatch):
    import danlu.utils.atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(danlu.utils.atomic.tempfile, "TemporaryFile", read_only)
    code, _, err = run(capsys, *train_line(tmp_path / "run"))
    line = one_line(err)
    assert code == 2 and "output_dir" in line and "Read-only file system" in line and loads == []


def test_generate_output_that_is_a_directory(capsys, tmp_path, loads):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    (tmp_path / "answers").mkdir()
    code, _, err = run(capsys, "generate", "--model", "tiny-llama", "--input", prompts,
                       "--output", tmp_path / "answers")
    line = one_line(err)
    assert code == 2 and f"--output {tmp_path / 'answers'} is a directory" in line and loads == []


def test_generate_output_that_cannot_be_created(capsys, tmp_path, loads):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n", encoding="utf-8")
    code, _, err = run(capsys, "generate", "--model", "tiny-llama", "--input", prompts,
                       "--output", prompts / "answers.jsonl")
    line = one_line(err)
    assert code == 2 and "--output" in line and f"{prompts} is a file" in line and loads == []


def test_export_dir_that_is_a_file(capsys, tmp_path, loads):
    (tmp_path / "merged").write_text("x")
    code, _, err = run(capsys, "export", "--model_name_or_path", "tiny-llama", "--export_dir", tmp_path / "merged")
    line = one_line(err)
    assert code == 2 and f"export_dir {tmp_path / 'merged'} is a file" in line and loads == []


# ---------------------------------------------------------------- dataset_info.json


@pytest.mark.parametrize("info,expected", [([{"file_name": "a.json"}], "expected a JSON object"),
                                           ("identity.json", "expected a JSON object"),
                                           ({"identity": ["identity.json"]}, "entry 'identity' must be an object")])
def test_dataset_info_of_the_wrong_shape_names_the_file(capsys, tmp_path, loads, info, expected):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    code, _, err = run(capsys, "train", "--model_name_or_path", "tiny-llama", "--dataset", "identity",
                       "--dataset_dir", tmp_path / "data", "--output_dir", tmp_path / "run")
    line = one_line(err)
    assert code == 2 and str(tmp_path / "data" / "dataset_info.json") in line and expected in line
    assert loads == []


def test_dataset_info_as_a_list_through_the_data_api(tmp_path):
    """The same check where the data is read (the Python API, without the CLI's early one)."""
    from danlu.data.dataset import read_examples
    from danlu.data.files import DataError, ReadReport
    from danlu.data.formats import to_example

    (tmp_path / "dataset_info.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="dataset_info.json: expected a JSON object .* got an array"):
        read_examples(str(tmp_path), ["identity"], to_example, None, False, ReadReport())


# ---------------------------------------------------------------- errors: one line, --debug, exit codes


def failing_train(monkeypatch, error):
    import danlu.training.train

    def train(args):
        raise error

    monkeypatch.setattr(danlu.training.train, "train", train)


def test_a_bug_is_one_line_and_exit_code_1(capsys, tmp_path, monkeypatch):
    failing_train(monkeypatch, TypeError("unsupported operand"))
    code, _, err = run(capsys, *train_line(tmp_path / "run"))
    line = one_line(err)
    assert code == 1
    assert line == "danlu train: internal error: TypeError: unsupported operand (run with --debug for the traceback)"


def test_debug_adds_the_traceback_and_the_train_parser_never_sees_it(capsys, tmp_path, monkeypatch):
    failing_train(monkeypatch, TypeError("unsupported operand"))
    code, _, err = run(capsys, *train_line(tmp_path / "run"), "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err and "unknown argument" not in err
    assert err.rstrip().splitlines()[-1] == "danlu train: internal error: TypeError: unsupported operand"
    code, _, err = run(capsys, "--debug", "generate", "--input", tmp_path / "missing.txt", "--output", tmp_path / "o")
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("missing.txt: no such file")


def test_a_system_error_mid_run_is_one_line_naming_the_file(capsys, tmp_path, monkeypatch):
    failing_train(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x")))
    code, _, err = run(capsys, *train_line(tmp_path / "run"))
    assert code == 2
    assert one_line(err) == f"danlu train: error: {tmp_path / 'run' / 'x'}: No space left on device"


def test_ctrl_c_still_stops_the_command(capsys, tmp_path, monkeypatch):
    failing_train(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in train_line(tmp_path / "run")])


# ---------------------------------------------------------------- a crashed run's leftovers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = make_hf_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return save_hf_model(model, tmp_path_factory.mktemp("model"), tokenizer)


def test_a_crashed_runs_temporaries_are_removed_and_the_run_starts(capsys, tmp_path, model_dir):
    out = tmp_path / "run"
    (out / ".checkpoint-3.0123456789ab.tmp").mkdir(parents=True)
    (out / ".checkpoint-3.0123456789ab.tmp" / "trainable.safetensors").write_bytes(b"half")
    (out / ".staged.ab_cd123.tmp").mkdir()
    (out / ".trainer_log.jsonl.abcdef012345.tmp").write_text("{")
    code, stdout, err = run(capsys, "train", "--model_name_or_path", model_dir, "--dataset", "identity",
                            "--dataset_dir", DATA, "--output_dir", out, "--max_steps", "1", "--cutoff_len", "64",
                            "--lora_rank", "2", "--save_steps", "1")
    assert code == 0, err
    assert "trained 1 steps" in stdout
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-1" / "trainer_state.json").is_file()
    for line in (out / "trainer_log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in trainer_log.jsonl"))
