"""`python -m danlu ...` (and `torchrun ... -m danlu train ...`): the same as the `danlu` command."""
import os
import sys

from danlu.cli.main import main

code = main()
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    # torch 2.13's gloo can abort a finished rank during interpreter teardown (about 1 run in 12 measured),
    # turning a completed job into a failed one; the work and its files are done and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
