"""A distributed run that loses one of its processes: recognising it, so that every other rank can say so in one line.

When a rank dies (killed, out of memory, its machine gone), the job cannot go on, and the other ranks learn it
in one of two ways: their next collective fails (gloo raises a RuntimeError from its TCP transport, "Connection
reset by peer" / "Connection closed by peer", or "Timed out waiting ...ms" after --ddp_timeout when the peer
vanished without closing its sockets; nccl a DistBackendError), or torchrun, seeing a worker of its own fail,
sends the others SIGTERM (Python's default for it ends the process without a word). `sigterm_raises()` turns
that SIGTERM into `Terminated`, and `lost_process_reason` names either cause; the CLI reports it as one line.
Nothing here imports torch until an error is examined.
"""
from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

# gloo's transport errors name their source file: "[.../gloo/transport/tcp/pair.cc:537] Read error ..."
_GLOO_TRANSPORT = re.compile(r"gloo/transport/")
_SOURCE_FILE = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


class LostProcess(RuntimeError):
    """This rank's one-line account of a distributed run that lost one of its processes (reported by the CLI)."""


class Terminated(Exception):
    """SIGTERM arrived: torchrun stops a job's other workers so when one of them fails (a scheduler or `kill` can
    send it too). An Exception, not a KeyboardInterrupt, so that the loop does not save a checkpoint mid-step."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated, once; later ones are ignored while the process reports why it
    stops and exits (torchrun sends SIGKILL 30 s after SIGTERM anyway). Only the main thread can set a handler;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the process is ending: let it say why first
        raise
    signal.signal(signal.SIGTERM, previous)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and the ones it was raised from or while handling (a SIGTERM often lands while a collective's
    error unwinds), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_lost_peer(error: BaseException) -> bool:
    """A collective failed because another process or the network between them went away."""
    if not isinstance(error, RuntimeError):
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or bool(_GLOO_TRANSPORT.search(str(error)))


def short_message(error: BaseException) -> str:
    """gloo's message without its source files and its advice: 'Read error [127.0.0.1]:11656: Connection reset
    by peer'."""
    lines = str(error).strip().splitlines()
    text = _SOURCE_FILE.sub("", lines[0] if lines else type(error).__name__)
    return text.split(". ")[0].rstrip(".")


def lost_process_reason(error: BaseException) -> Optional[str]:
    """What ended the run when it lost a process (a failed collective, or torchrun's SIGTERM); None when `error`
    is something else."""
    chain = list(_chain(error))
    for e in chain:
        if is_lost_peer(e):
            return f"lost contact with the other processes (a peer died or the network failed): {short_message(e)}"
    if any(isinstance(e, Terminated) for e in chain):
        return "stopped by SIGTERM (torchrun stops every process of the job when one of them fails)"
    return None
