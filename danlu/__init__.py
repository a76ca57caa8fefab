"""danlu (丹炉): one toolkit to train, compress, convert and serve decoder language models.

    import danlu
    lm = danlu.load()                      # the bundled SmolLM2-135M-Instruct, or a path / preset / hub id
    danlu.chat(lm, "What is the capital of France?")
    danlu.generate(lm, ["Once upon a time"], max_new_tokens=32, temperature=0)
"""
from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import Pretrained, load_pretrained as load
from danlu.generation.pipeline import chat, complete, generate
from danlu.generation.sampling import GenerationConfig
from danlu.models.config import ModelConfig
from danlu.models.presets import PRESETS, get_preset
from danlu.models.transformer import Transformer

__version__ = "0.1.0"
__all__ = ["load", "chat", "generate", "complete", "GenerationConfig", "ModelConfig", "Transformer",
           "Pretrained", "PRESETS", "get_preset", "CheckpointError"]
