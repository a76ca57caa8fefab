from danlu.checkpoints.errors import CheckpointError
from danlu.checkpoints.load import Pretrained, load_pretrained

__all__ = ["CheckpointError", "Pretrained", "load_pretrained"]
