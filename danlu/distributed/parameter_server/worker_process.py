"""A parameter-server worker under torchrun, run in a child of the process torchrun started, so that its death does
not stop the job.

torchrun's policy is all or nothing: when one of its processes fails it stops every other (or restarts them all,
with --max-restarts). A parameter server is built to go on without a lost worker, so under `--parallel ps=K`
each worker rank forks, and the child is the worker while the parent waits. A child killed by a signal nobody
sent through the parent (SIGKILL, the out-of-memory killer) is reported and the rank ends successfully: torchrun
sees nothing wrong, and the server, no longer hearing from that worker, takes it as lost after
`--ps_worker_timeout` and goes on with the others. A child that exits with an error code (its step raised: the
server was told at once) passes that code on, and signals sent to the parent (torchrun stopping the job) are
passed to the child. The fork comes before the model, the data or any process group is loaded or set up.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from danlu.utils.progress import logger


def fork_worker(rank: int, ps_worker_timeout: float) -> Optional[int]:
    """In the child (the worker): None, and the caller goes on to train. In the parent: the exit code this rank
    should end with, once the child has ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        return None
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        os.kill(child, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _, status = os.waitpid(child, 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = os.waitstatus_to_exitcode(status)
    if code >= 0 or -code in forwarded:
        return code if code >= 0 else 128 - code
    logger.warning("parameter server worker %d (rank %d, pid %d) died of %s; the server takes it as lost after "
                   "ps_worker_timeout (%g s) and goes on with the other workers", rank - 1, rank, child,
                   signal.Signals(-code).name, ps_worker_timeout)
    return 0
