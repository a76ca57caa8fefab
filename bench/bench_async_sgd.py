"""Sequential, synchronous, asynchronous and delay-compensated SGD on a parameter server (MSRA article, seed 003).

    python bench/bench_async_sgd.py [--quick] [--json OUT] [--plots DIR] [--experiment async]
        [--algorithms sgd,ssgd,asgd,dcasgd-c,dcasgd-a] [--workers K] [--epochs E] [--batch_size B] [--lr LR]
        [--seeds S] [--delay TAU] [--dc_lambda L] [--dc_lambda_a L0] [--dc_momentum M]

Experiment (1) of the article: asynchronous SGD applies gradients computed on stale weights and loses accuracy;
DC-ASGD (Zheng et al., ICML 2017) compensates the delay, g + lambda g (.) g (.) (w - w_bak), and nearly matches
sequential SGD. Here, on a problem small enough to repeat over several seeds on a laptop:

  * data: scikit-learn's bundled digits (1797 8x8 images, 10 classes; offline), standardised with the training
    part's mean and std, a fixed 80/20 train/test split (random_state 0, stratified);
  * model: an MLP 64-H-10 (ReLU, H = --hidden, 128), cross-entropy; every algorithm starts from the same
    weights for a given seed;
  * optimizer: plain SGD (no momentum, no weight decay), learning rate --lr, the same for every algorithm
    (the DC-ASGD formula is for plain SGD); SSGD can be given --ssgd_lr_scale (x K is the linear-scaling rule).
    The default lr 0.3: sequential SGD ends as well at 0.1, 0.3 or 0.6 (about 2.6% test error after 20
    epochs, 3 seeds; 0.03 is slower), and at 0.3 a stale gradient can hurt (at 0.1 ASGD shrugs off even an
    injected delay of 16 here);
  * algorithms:
      sgd       one process, a plain loop (no server, no RPC), one thread;
      ssgd      parameter server, the server waits for one gradient from each of the K workers, averages them
                and steps once (a barrier per round);
      asgd      parameter server, each gradient applied as it arrives (its delay: the updates applied since
                its worker pulled);
      dcasgd-c  asgd + delay compensation with a constant lambda (--dc_lambda, 0.04 as in the paper);
      dcasgd-a  asgd + adaptive lambda_t = lambda_0 / sqrt(MS_t) (--dc_lambda_a, lambda_0 = 2 as in the
                paper; --dc_momentum m = 0.95 for MS_t);
    K = --workers (4) worker processes plus the server, spawned on this machine (torch.distributed.rpc over
    TensorPipe), one thread each; --delay TAU makes every pull hand out the weights of TAU updates ago, on top
    of the delay that free-running workers have anyway (about K - 1 for asgd).
  * the same data budget for every algorithm: --epochs E passes over the training set. Each epoch is
    reshuffled (seed, epoch) and dealt into K shards (example i of the permutation to shard i mod K); worker m
    reads shard m in batches of --batch_size (the last incomplete batch of a shard is dropped), then goes on
    with its shard of the next epoch. Sequential SGD reads the very same batches, one from each shard in turn.
    So asgd, dcasgd-* and sgd apply E x K x (batches per shard) updates of one batch each; ssgd applies one
    averaged update per round of K gradients: K times fewer steps, each on K batches (the same gradients
    consumed, the same lr unless --ssgd_lr_scale). A free-running worker may run ahead of the others into the
    next epoch: the totals are equal, the mix of shards at the end may differ slightly.

Recorded: the server's model is evaluated on the test set (error and cross-entropy) --evals_per_epoch times
per epoch of data consumed, inside the server's on_update callback (under its lock; a few hundred microseconds
here), with the seconds since every process joined (so the processes' start-up and RPC rendezvous are not counted;
sequential SGD: since its loop started; the evaluations are inside both clocks) and the epochs of data consumed
(gradients applied / gradients per epoch). Per algorithm: the final test error (mean, std over seeds, min-max),
test loss, mean and max delay of the applied gradients, the training seconds. Curves: test error vs epochs
and vs seconds (mean over seeds, min-max band); --plots DIR writes them as PNG.

Wall time: K workers + the server share this machine's cores (2 here), and an MLP on 16 digits per batch is
so small that an update costs about as much in RPC (pull the weights, push the gradients) as in arithmetic:
on such a machine no parameter-server run can beat the sequential loop in seconds; the comparison that
carries over is per epoch of data. Other processes' share of the CPU is printed per run (ForeignLoad).

Experiments (2) (ensemble-compression vs model averaging) and (3) (global vs local shuffling) are to come as
other --experiment values (see EXPERIMENTS).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from danlu.utils.jsonfile import dumps_json, finite
from digits import build_mlp, build_sgd, load_digits_split
from machine import ForeignLoad, machine_info, print_aligned, print_foreign_load, save_results

ALGORITHMS = ("sgd", "ssgd", "asgd", "dcasgd-c", "dcasgd-a")
ALGORITHM_LABELS = {"sgd": "sequential SGD", "ssgd": "SSGD", "asgd": "ASGD", "dcasgd-c": "DC-ASGD-c",
                    "dcasgd-a": "DC-ASGD-a"}


# --- data and model ---

def cross_entropy_step(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(test error, mean cross-entropy)."""
    logits = model(x)
    return (logits.argmax(1) != y).float().mean().item(), torch.nn.functional.cross_entropy(logits, y).item()


# --- who reads which batch ---

def batches_per_shard(n_train: int, workers: int, batch_size: int) -> int:
    return (n_train // workers) // batch_size


def epoch_shards(n_train: int, workers: int, batch_size: int, seed: int, epoch: int) -> list[list[np.ndarray]]:
    """Epoch `epoch`'s batches (index arrays), shard by shard: the permutation dealt round-robin into K shards."""
    permutation = np.random.default_rng([seed, epoch]).permutation(n_train)
    per_shard = batches_per_shard(n_train, workers, batch_size)
    shards = [permutation[m::workers] for m in range(workers)]
    return [[shard[j * batch_size:(j + 1) * batch_size] for j in range(per_shard)] for shard in shards]


def worker_batches(data: dict, worker: int, workers: int, batch_size: int, seed: int) -> Iterator[tuple]:
    """Worker `worker`'s endless stream: its shard of epoch 0, then of epoch 1, ..."""
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    epoch = 0
    while True:
        for index in epoch_shards(len(x), workers, batch_size, seed, epoch)[worker]:
            yield x[index], y[index]
        epoch += 1


def sequential_batches(data: dict, workers: int, batch_size: int, seed: int, epochs: int) -> Iterator[tuple]:
    """The workers' batches, one from each shard in turn, epoch after epoch."""
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    for epoch in range(epochs):
        shards = epoch_shards(len(x), workers, batch_size, seed, epoch)
        for j in range(len(shards[0])):
            for shard in shards:
                yield x[shard[j]], y[shard[j]]


# --- what is recorded during a run ---

class Curve:
    """Test error and loss of a model at evenly spaced points of the data consumed, with the seconds so far."""

    def __init__(self, model: torch.nn.Module, data: dict, gradients_per_epoch: int, evals_per_epoch: int):
        self.model = model
        self.x_test, self.y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
        self.gradients_per_epoch, self.evals_per_epoch = gradients_per_epoch, evals_per_epoch
        self.points = {"epochs": [], "seconds": [], "test_error": [], "test_loss": []}
        self.evaluated = 0  # evaluation points passed

    def record(self, gradients: int, seconds: float) -> None:
        error, loss = evaluate(self.model, self.x_test, self.y_test)
        for key, value in (("epochs", gradients / self.gradients_per_epoch), ("seconds", seconds),
                           ("test_error", error), ("test_loss", loss)):
            self.points[key].append(value)

    def maybe_record(self, gradients: int, seconds: float, last: bool = False) -> None:
        """Record when `gradients` has passed the next evaluation point, and at the last update."""
        point = gradients * self.evals_per_epoch // self.gradients_per_epoch
        if point > self.evaluated or last:
            self.evaluated = point
            self.record(gradients, seconds)

    @property
    def final(self) -> tuple[float, float]:
        return self.points["test_error"][-1], self.points["test_loss"][-1]


class ServerLog:
    """What rank 0 keeps of a parameter-server run: the server, the gradients applied, the curve (recorded in
    on_update; seconds from the server's clock, started once every process has joined)."""

    def __init__(self, curve: Curve, max_updates: int):
        self.curve, self.max_updates = curve, max_updates
        self.server = None
        self.gradients = 0

    def attach(self, server) -> None:
        """run_parameter_server's prepare_server hook: keep the server."""
        self.server = server

    def seconds(self) -> float:
        return 0.0 if self.server is None else self.server.elapsed()

    def on_update(self, version: int, pushes: list) -> None:
        self.gradients += len(pushes)
        self.curve.maybe_record(self.gradients, self.seconds(), last=version >= self.max_updates)


# --- one run of one algorithm ---

def run_settings(args: argparse.Namespace, algorithm: str, n_train: int) -> dict:
    """Everything a run needs, as JSON (it crosses into the spawned processes and into the results)."""
    per_shard = batches_per_shard(n_train, args.workers, args.batch_size)
    gradients_per_epoch = args.workers * per_shard
    synchronous = algorithm == "ssgd"
    return {"algorithm": algorithm, "hidden": args.hidden, "batch_size": args.batch_size, "workers": args.workers,
            "epochs": args.epochs, "evals_per_epoch": args.evals_per_epoch,
            "lr": args.lr * (args.ssgd_lr_scale if synchronous else 1.0),
            "delay": args.delay, "dc_momentum": args.dc_momentum,
            "dc_lambda": args.dc_lambda_a if algorithm == "dcasgd-a" else args.dc_lambda,
            "gradients_per_epoch": gradients_per_epoch,
            "updates": args.epochs * (per_shard if synchronous else gradients_per_epoch),
            "worker_timeout": args.worker_timeout}


def train_sequentially(settings: dict, data: dict, seed: int) -> dict:
    """Plain SGD in this process, one thread, on the workers' batches in turn."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_mlp(settings["hidden"], seed)
        optimizer = build_sgd(model, settings["lr"])
        curve = Curve(model, data, settings["gradients_per_epoch"], settings["evals_per_epoch"])
        curve.record(0, 0.0)
        started = time.monotonic()
        updates, diverged = 0, None
        for batch in sequential_batches(data, settings["workers"], settings["batch_size"], seed, settings["epochs"]):
            loss = cross_entropy_step(model, batch)
            if not math.isfinite(loss.item()):  # as the parameter server does: stop a diverged run
                diverged = f"the loss became {loss.item()} at update {updates + 1}"
                curve.record(updates, time.monotonic() - started)
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            curve.maybe_record(updates, time.monotonic() - started, last=updates == settings["updates"])
        seconds = time.monotonic() - started
    finally:
        torch.set_num_threads(threads)
    error, loss = curve.final
    return {"seed": seed, "test_error": error, "test_loss": loss, "seconds": seconds, "updates": updates,
            "gradients": updates, "mean_delay": 0.0, "max_delay": 0, "gradients_per_worker": None,
            "diverged": diverged, "curve": curve.points}


def parameter_server_process(rank: int, world_size: int, settings: dict, data: dict, seed: int,
                             out_path: str) -> None:
    """One process of a parameter-server run (spawned by run_locally); rank 0 writes its results to `out_path`."""
    from danlu.distributed.parameter_server import run as ps_run

    warnings.filterwarnings("ignore", message="You are using a Backend")  # torch's own, at every rpc init
    torch.set_num_threads(1)
    model = build_mlp(settings["hidden"], seed)
    server_settings = ps_run.ServerSettings(max_updates=settings["updates"], rule=settings["algorithm"],
                                            dc_lambda=settings["dc_lambda"], dc_momentum=settings["dc_momentum"],
                                            delay=settings["delay"], worker_timeout=settings["worker_timeout"])
    stream = lambda worker: worker_batches(data, worker, world_size - 1, settings["batch_size"], seed)
    optimizer = lambda m: (build_sgd(m, settings["lr"]), None)
    run = lambda **kw: ps_run.run_parameter_server(rank, world_size, model, server_settings, optimizer, stream,
                                                   ps_run.step_gradient(cross_entropy_step), **kw)
    if rank == 0:
        result = serve_and_record(run, model, settings, data, seed, world_size - 1)
        Path(out_path).write_text(dumps_json(result))
    else:
        run()


def serve_and_record(run, model: torch.nn.Module, settings: dict, data: dict, seed: int, workers: int) -> dict:
    """Rank 0: serve the run, evaluating the model as it trains; the run's figures."""
    curve = Curve(model, data, settings["gradients_per_epoch"], settings["evals_per_epoch"])
    curve.record(0, 0.0)
    log = ServerLog(curve, settings["updates"])
    diverged = None
    try:
        run(on_update=log.on_update, prepare_server=log.attach)
    except FloatingPointError as e:  # the server stops a run whose loss is no longer finite: the run diverged
        diverged = str(e)
        curve.record(log.gradients, log.seconds())
    pushes = log.server.pushes
    delays = [p.delay for p in pushes] or [0]
    error, loss = curve.final
    return {"seed": seed, "test_error": error, "test_loss": loss, "seconds": curve.points["seconds"][-1],
            "updates": log.server.version, "gradients": len(pushes), "mean_delay": float(np.mean(delays)),
            "max_delay": int(max(delays)), "gradients_per_worker": [sum(p.worker == m for p in pushes)
                                                                    for m in range(workers)],
            "diverged": diverged, "curve": curve.points}


def train_on_parameter_server(settings: dict, data: dict, seed: int, timeout: float) -> dict:
    """Spawn the server and K workers on this machine; rank 0's results."""
    from danlu.distributed.parameter_server.local import run_locally

    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # TensorPipe's "eof" warnings at the non-graceful end
    with tempfile.TemporaryDirectory(prefix="bench_async_sgd_") as scratch:
        out_path = Path(scratch) / "result.json"
        codes = run_locally(parameter_server_process, settings["workers"] + 1,
                            (settings, data, seed, str(out_path)), timeout=timeout)
        if codes[0] != 0 or not out_path.exists():
            return {"seed": seed, "error": f"exit codes {codes} (None: killed after {timeout:.0f} s)"}
        result = json.loads(out_path.read_text())
    result["exit_codes"] = codes
    return result


def run_once(settings: dict, data: dict, seed: int, timeout: float) -> dict:
    with ForeignLoad() as load:
        started = time.monotonic()
        if settings["algorithm"] == "sgd":
            result = train_sequentially(settings, data, seed)
        else:
            result = train_on_parameter_server(settings, data, seed, timeout)
        result["job_seconds"] = time.monotonic() - started
    result["foreign_cpu"] = load.share
    return result


# --- summaries ---

def summarise(runs: list[dict], settings: dict) -> dict:
    """Final test error mean/std/min/max over seeds, test loss, delays, seconds."""
    ok = [r for r in runs if "error" not in r]
    errors = np.array([r["test_error"] for r in ok])
    std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0
    summary = {"updates": settings["updates"], "lr": settings["lr"], "failed": [r for r in runs if "error" in r],
               "per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in ok]}
    if settings["algorithm"] in ("dcasgd-c", "dcasgd-a"):
        summary["dc_lambda"] = settings["dc_lambda"]
    if not ok:
        return summary
    losses = np.array([r["test_loss"] for r in ok if r["test_loss"] is not None and math.isfinite(r["test_loss"])])
    summary.update({
        "test_error_mean": float(errors.mean()), "test_error_std": std(errors),
        "test_error_min": float(errors.min()), "test_error_max": float(errors.max()),
        "test_loss_mean": float(losses.mean()) if len(losses) else None, "test_loss_std": std(losses),
        "diverged": sum(bool(r.get("diverged")) for r in ok),
        "gradients": settings["updates"] * (settings["workers"] if settings["algorithm"] == "ssgd" else 1),
        "mean_delay": float(np.mean([r["mean_delay"] for r in ok])),
        "max_delay": int(max(r["max_delay"] for r in ok)),
        "seconds_mean": float(np.mean([r["seconds"] for r in ok])),
        "job_seconds_mean": float(np.mean([r["job_seconds"] for r in ok])),
        "foreign_cpu_max": float(max(r["foreign_cpu"] for r in ok))})
    return summary


def mean_curves(runs: list[dict], epochs: int, evals_per_epoch: int, time_points: int = 60) -> dict:
    """Test error and loss on a common grid of epochs and of seconds: mean, min, max over the seeds (linear
    interpolation of each seed's points; the seconds grid stops at the shortest seed's end)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {}
    grids = {"epochs": np.linspace(0, epochs, epochs * evals_per_epoch + 1),
             "seconds": np.linspace(0, min(r["curve"]["seconds"][-1] for r in ok), time_points)}
    out = {}
    for axis, grid in grids.items():
        out[f"vs_{axis}"] = {axis: grid.tolist()}
        for metric in ("test_error", "test_loss"):
            values = np.array([np.interp(grid, np.array(r["curve"][axis], dtype=float),
                                         np.array(r["curve"][metric], dtype=float)) for r in ok])
            out[f"vs_{axis}"].update({f"{metric}_mean": values.mean(0).tolist(),
                                      f"{metric}_min": values.min(0).tolist(),
                                      f"{metric}_max": values.max(0).tolist()})
    return out


def result_table(results: dict, args: argparse.Namespace) -> tuple[tuple, list[tuple]]:
    header = ("algorithm", "steps", "gradients", "lr", "test error % (mean ± std)", "min-max %",
              "test loss", "diverged", "mean delay", "max delay", "train s", "job s", "other CPU")
    lines = []
    for algorithm, s in results.items():
        label = ALGORITHM_LABELS[algorithm] + (f" (λ={s['dc_lambda']:g})" if "dc_lambda" in s else "")
        if "test_error_mean" not in s:
            lines.append((label, s["updates"], "-", f"{s['lr']:g}", "FAILED", "", "", "", "", "", "", "", ""))
            continue
        lines.append((label, s["updates"], s["gradients"], f"{s['lr']:g}",
                      f"{100 * s['test_error_mean']:.2f} ± {100 * s['test_error_std']:.2f}",
                      f"{100 * s['test_error_min']:.2f}-{100 * s['test_error_max']:.2f}",
                      "-" if s["test_loss_mean"] is None else f"{s['test_loss_mean']:.4g}", s["diverged"],
                      f"{s['mean_delay']:.2f}", s["max_delay"],
                      f"{s['seconds_mean']:.1f}", f"{s['job_seconds_mean']:.1f}", f"{s['foreign_cpu_max']:.0%}"))
    return header, lines


def markdown(header: tuple, lines: list[tuple]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rows += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return "\n".join(rows)


def plot_curves(curves: dict, directory: str, prefix: str, title: str) -> list[str]:
    """Two PNGs, vs epochs and vs seconds: test error (left) and test loss (right), mean over seeds with a
    min-max band, log scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(directory).mkdir(parents=True, exist_ok=True)
    written = []
    for axis, xlabel in (("epochs", "epochs of training data consumed"),
                         ("seconds", "seconds since the first pull (sequential: since its loop started)")):
        fig, panels = plt.subplots(1, 2, figsize=(12, 4.5))
        for panel, metric, scale, ylabel in ((panels[0], "test_error", 100, "test error %"),
                                             (panels[1], "test_loss", 1, "test cross-entropy")):
            for algorithm, c in curves.items():
                if "vs_epochs" not in c:
                    continue
                d = c[f"vs_{axis}"]
                x = np.array(d[axis])
                line, = panel.plot(x, scale * np.array(d[f"{metric}_mean"], dtype=float),
                                   label=ALGORITHM_LABELS[algorithm])
                panel.fill_between(x, scale * np.array(d[f"{metric}_min"], dtype=float),
                                   scale * np.array(d[f"{metric}_max"], dtype=float), color=line.get_color(),
                                   alpha=0.15, linewidth=0)
            panel.set_yscale("log")
            panel.set_xlabel(xlabel)
            panel.set_ylabel(f"{ylabel} (log scale)")
            panel.grid(True, which="both", alpha=0.3)
            panel.legend()
        fig.suptitle(f"{title}; mean over seeds, band: min-max", fontsize=9)
        fig.tight_layout()
        path = str(Path(directory) / f"{prefix}_vs_{axis}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --- experiments ---

def run_async_experiment(args: argparse.Namespace, info: dict) -> dict:
    """Experiment (1): sgd vs ssgd vs asgd vs dcasgd-c vs dcasgd-a, equal epochs of data, several seeds."""
    data = load_digits_split()
    n_train, n_test = len(data["y_train"]), len(data["y_test"])
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    per_shard = batches_per_shard(n_train, args.workers, args.batch_size)
    print(f"data: digits, {n_train} train / {n_test} test, standardised | MLP 64-{args.hidden}-10 | plain SGD lr "
          f"{args.lr:g} | batch {args.batch_size} | K = {args.workers} workers, {per_shard} batches per shard and "
          f"epoch ({args.workers * per_shard * args.batch_size} of {n_train} examples used per epoch) | "
          f"{args.epochs} epochs | seeds {args.seeds} | injected delay {args.delay} | DC lambda {args.dc_lambda:g} "
          f"(-c), lambda_0 {args.dc_lambda_a:g} (-a), momentum {args.dc_momentum:g}")
    print(f"note: sgd, asgd and dcasgd-* apply {args.epochs * args.workers * per_shard} updates of one batch; "
          f"ssgd applies {args.epochs * per_shard} updates, each the average of K = {args.workers} gradients (K times "
          f"fewer, averaged steps; lr x {args.ssgd_lr_scale:g})\n", flush=True)
    runs: dict[str, list[dict]] = {}
    summaries, curves, settings_used = {}, {}, {}
    for algorithm in algorithms:
        settings = run_settings(args, algorithm, n_train)
        settings_used[algorithm] = settings
        runs[algorithm] = []
        for seed in range(args.seeds):
            r = run_once(settings, data, seed, args.timeout)
            runs[algorithm].append(r)
            if "error" in r:
                print(f"{algorithm:9} seed {seed}: FAILED ({r['error']})", flush=True)
                continue
            loss = "-" if r["test_loss"] is None else f"{r['test_loss']:.4g}"
            print(f"{algorithm:9} seed {seed}: " + (f"DIVERGED ({r['diverged']}); " if r["diverged"] else "")
                  + f"test error {100 * r['test_error']:.2f}% (loss {loss}) "
                  f"after {r['updates']} updates / {r['gradients']} gradients, mean delay {r['mean_delay']:.2f} "
                  f"(max {r['max_delay']}), {r['seconds']:.1f} s training, {r['job_seconds']:.1f} s job"
                  + (f", gradients per worker {r['gradients_per_worker']}" if r["gradients_per_worker"] else "")
                  + f", other CPU {r['foreign_cpu']:.0%}", flush=True)
        summaries[algorithm] = summarise(runs[algorithm], settings)
        curves[algorithm] = mean_curves(runs[algorithm], args.epochs, args.evals_per_epoch)
        curves[algorithm]["per_seed"] = [r["curve"] for r in runs[algorithm] if "error" not in r]
    header, lines = result_table(summaries, args)
    print()
    print_aligned(header, lines)
    print("\nmarkdown:\n")
    print(markdown(header, lines))
    print(f"\nsteps, gradients: planned (a diverged run stops early: see its line above); steps: optimizer updates "
          f"(ssgd: rounds, each the mean of K = {args.workers} gradients); test error at the end of training (a "
          f"diverged run: where it stopped), over {args.seeds} seeds (std: sample std); test loss: mean over the "
          f"runs that did not diverge; delay: updates applied "
          f"between a gradient's pull and its application (injected {args.delay} included); train s: the training "
          f"loop (from the first pull), job s: the whole run including spawning the processes and the RPC "
          f"rendezvous")
    print_foreign_load({f"{a}/{r['seed']}": round(r["foreign_cpu"], 2) for a, rs in runs.items() for r in rs
                        if "foreign_cpu" in r}, "run")
    if args.plots:
        title = (f"digits MLP, K={args.workers}, lr {args.lr:g}, batch {args.batch_size}, injected delay "
                 f"{args.delay}, DC λ {args.dc_lambda:g} (-c), λ0 {args.dc_lambda_a:g} (-a), {args.seeds} seeds")
        prefix = args.plot_prefix or ("async_sgd" + (f"_delay{args.delay}" if args.delay else ""))
        for path in plot_curves({a: c for a, c in curves.items()}, args.plots, prefix, title):
            print(f"saved {path}")
    return {"machine": info, "settings": {**vars(args), "n_train": n_train, "n_test": n_test,
                                          "per_algorithm": settings_used},
            "results": summaries, "curves": curves}


# experiments (2) ensemble-compression vs averaging and (3) global vs local shuffling: further entries here
EXPERIMENTS = {"async": run_async_experiment}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=tuple(EXPERIMENTS), default="async")
    p.add_argument("--quick", action="store_true", help="a short run: --epochs 6 --seeds 2 (unless given)")
    p.add_argument("--json", metavar="OUT", help="also save every figure and curve as JSON")
    p.add_argument("--plots", metavar="DIR", help="write the curves as PNG files into DIR")
    p.add_argument("--plot_prefix", help="the PNGs' name prefix (default async_sgd, async_sgd_delayTAU)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"comma-separated subset of "
                                                                      f"{','.join(ALGORITHMS)}")
    p.add_argument("--workers", type=int, default=4, help="K, worker processes beside the server")
    p.add_argument("--epochs", type=int, help="passes over the training data (default 20, --quick 6)")
    p.add_argument("--batch_size", type=int, default=16, help="examples per gradient")
    p.add_argument("--lr", type=float, default=0.3, help="plain SGD's learning rate, every algorithm")
    p.add_argument("--ssgd_lr_scale", type=float, default=1.0,
                   help="ssgd's learning rate is lr x this (K: the linear-scaling rule for its K-fold batch)")
    p.add_argument("--hidden", type=int, default=128, help="the MLP's hidden width")
    p.add_argument("--seeds", type=int, help="seeds 0..S-1 (weights and shuffling; default 3, --quick 2)")
    p.add_argument("--delay", type=int, default=0, metavar="TAU",
                   help="injected staleness: pulls hand out the weights of TAU updates ago")
    p.add_argument("--dc_lambda", type=float, default=0.04,
                   help="dcasgd-c's constant lambda (0.04, the paper's: for this MLP lambda g*g is then tiny and "
                        "dcasgd-c stays close to asgd)")
    p.add_argument("--dc_lambda_a", type=float, default=2.0, help="dcasgd-a's lambda_0")
    p.add_argument("--dc_momentum", type=float, default=0.95, help="dcasgd-a's mean-square momentum")
    p.add_argument("--evals_per_epoch", type=int, default=4, help="test evaluations per epoch of data")
    p.add_argument("--worker_timeout", type=float, default=60.0, help="the server's ps_worker_timeout")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before a run's processes are killed (run_locally waits this long for each process "
                        "in turn)")
    args = p.parse_args(argv)
    args.epochs = args.epochs if args.epochs is not None else (6 if args.quick else 20)
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    unknown = set(a.strip() for a in args.algorithms.split(",") if a.strip()) - set(ALGORITHMS)
    if unknown:
        p.error(f"unknown algorithms {sorted(unknown)}; expected a subset of {','.join(ALGORITHMS)}")
    if args.workers < 1 or args.epochs < 1 or args.seeds < 1 or args.batch_size < 1 or args.delay < 0:
        p.error("--workers, --epochs, --seeds, --batch_size must be >= 1, --delay >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = machine_info()
    print(f"CPU: {info['cpu']} | cores: {info['cores']} | RAM: {info['ram_gb']} GB | python {info['python']} | "
          f"torch {info['torch']} | experiment: {args.experiment}", flush=True)
    started = time.perf_counter()
    out = EXPERIMENTS[args.experiment](args, info)
    out["seconds_total"] = time.perf_counter() - started
    print(f"total {out['seconds_total']:.0f} s")
    save_results(finite(out), args.json)
    return out


if __name__ == "__main__":
    main()
