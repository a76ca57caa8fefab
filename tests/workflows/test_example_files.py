"""Every YAML under examples/ parses with the command it is written for (train, export, chat/api)."""
from pathlib import Path

import pytest

from danlu.cli.common import parse_keys
from danlu.cli.export import ExportArguments
from danlu.cli.main import parse_command_line
from danlu.training.arguments import parse_train_arguments

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted([*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("train_lora/*.yaml")]),
                         ids=lambda p: p.name)
def test_training_examples_parse(path):
    args = parse_train_arguments([str(path)])
    assert args.names("dataset") and args.output_dir.startswith("saves/")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("merge_lora/*.yaml")), ids=lambda p: p.name)
def test_merge_examples_parse(path):
    args = parse_keys([str(path)], ExportArguments)
    assert args.export_dir and args.adapter_name_or_path


@pytest.mark.parametrize("command", ["chat", "api"])
@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("inference/*.yaml")), ids=lambda p: p.name)
def test_inference_examples_parse(path, command):
    args = parse_command_line([command, str(path)])
    assert args.adapter and args.template == "qwen3_nothink"
