"""The one place progress bars and log messages come from; library code never calls print."""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("danlu")


def progress(total=None, desc: str = "", disable: bool = False, unit: str = "it"):
    return tqdm(total=total, desc=desc, disable=disable, unit=unit, dynamic_ncols=True, file=sys.stderr)


def configure_logging(verbose: bool = False) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[danlu] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
