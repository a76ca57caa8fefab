"""The one place progress bars and log messages come from; library code never calls print."""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("danlu")


def progress(total=None, desc: str = "", disable: bool = False, unit: str = "it"):
    return tqdm(total=total, desc=desc, disable=disable, unit=unit, dynamic_ncols=True, file=sys.stderr)


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a message is logged, not as it was when the handler was made: a caller
    that swaps sys.stderr (pytest's capture, a notebook) would otherwise leave the logger writing to a closed
    stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(verbose: bool = False) -> None:
    if not logger.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[danlu] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
