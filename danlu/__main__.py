"""`python -m danlu ...` (and `torchrun ... -m danlu train ...`): the same as the `danlu` command."""
from danlu.cli.main import run

run()
