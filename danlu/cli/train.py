"""`danlu train CONFIG.yaml [--key value ...]`: LLaMA-Factory's `llamafactory-cli train`, same keys."""
from __future__ import annotations

import argparse


def add_parser(sub, name):
    parser = sub.add_parser(name, help="fine-tune (sft, pt) with lora, freeze or full; LLaMA-Factory's arguments",
                            add_help=False)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="[CONFIG.yaml] --key value ...")
    parser.set_defaults(run=run)


def run(args) -> int:
    from danlu.distributed.parameter_server import worker_process
    from danlu.training.arguments import parse_train_arguments
    from danlu.training.topology import Topology

    if not args.argv or args.argv[0] in ("-h", "--help"):
        from danlu.training.arguments import TrainArguments
        import dataclasses

        print("usage: danlu train [CONFIG.yaml] [--key value ...]\nkeys (LLaMA-Factory's names):")
        for f in dataclasses.fields(TrainArguments):
            default = f.default if f.default is not dataclasses.MISSING else None
            print(f"  --{f.name} (default: {default})")
        return 0
    train_args = parse_train_arguments(args.argv)
    topology = Topology.from_environment()
    if topology.rank > 0 and train_args.parallel_layout(topology.world_size).ps:
        code = worker_process.fork_worker(topology.rank, train_args.ps_worker_timeout)
        if code is not None:  # the parent: the worker (its child) has ended
            return code
    check_before_loading(train_args)
    from danlu.training.train import train

    result = train_telling_a_lost_process(train, train_args)
    if not topology.is_main:  # under torchrun the main rank speaks for the run
        return 0
    if result.state.global_step == 0:
        raise ValueError(f"no optimizer step was taken (num_train_epochs {train_args.num_train_epochs}, max_steps "
                         f"{train_args.max_steps}): what {result.output_dir} holds is untrained")
    final = result.train_losses[-1] if result.train_losses else float("nan")
    print(f"trained {result.state.global_step} steps; last loss {final:.4f}"
          + (f"; last eval_loss {result.eval_losses[-1]:.4f}" if result.eval_losses else "")
          + f"; outputs in {result.output_dir}")
    return 0


def check_before_loading(train_args) -> None:
    """What can be known wrong before the model loads fails now, not after minutes of loading and tokenizing:
    an output_dir that cannot be written, a dataset_info.json of the wrong shape or without the datasets named.
    Then what an earlier run's unfinished writes left in output_dir is removed (every rank, before any joins the
    job: none writes there before all have started)."""
    from pathlib import Path

    from danlu.data.formats import find_spec, load_dataset_info
    from danlu.training.checkpoint import remove_stale_checkpoint_writes
    from danlu.utils.atomic import check_output_directory

    output_dir = check_output_directory(train_args.output_dir, "output_dir")
    names = train_args.names("dataset") + train_args.names("eval_dataset")
    if names:
        dataset_dir = Path(train_args.dataset_dir)
        specs = load_dataset_info(dataset_dir)
        for name in names:
            find_spec(specs, name, dataset_dir)
    remove_stale_checkpoint_writes(output_dir)


def train_telling_a_lost_process(train, train_args):
    """train(train_args); under torchrun, when the job loses a process (one killed or out of memory, a machine or
    the network gone) every rank left ends with one line saying so and naming the checkpoint to resume from."""
    import os
    from pathlib import Path

    from danlu.training.topology import Topology

    topology = Topology.from_environment()
    if topology.world_size == 1:
        return train(train_args)
    from danlu.distributed.failures import LostProcess, lost_process_reason, sigterm_raises

    try:
        with sigterm_raises():
            return train(train_args)
    except Exception as e:
        reason = lost_process_reason(e)
        if reason is None:
            raise
        from danlu.training.checkpoint import latest_checkpoint

        output_dir = Path(train_args.output_dir)
        last = latest_checkpoint(output_dir)
        restarts_left = (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
                         - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
        if last is None:
            found = f"no complete checkpoint in {output_dir}"
            if topology.rank:
                found += " on this machine (rank 0's machine writes them)"
            then = "; torchrun restarts the job from the start (--max-restarts)" if restarts_left > 0 else ""
        else:
            found = f"the last complete checkpoint is {last}"
            then = ("; torchrun restarts the job from it (--max-restarts)" if restarts_left > 0
                    else "; resume with --resume_from_checkpoint latest")
        raise LostProcess(f"rank {topology.rank}: {reason}; {found}{then}") from e
