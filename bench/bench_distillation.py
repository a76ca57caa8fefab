"""Distillation retention: the teacher, a student trained without KD and the same student with each method, side
by side in one run; then DynaBERT's one checkpoint at every (width, depth).

    python bench/bench_distillation.py [--steps N] [--dynabert-steps N] [--methods kd,pkd_skip,...] [--json OUT]

Decoder setting. Teacher: the bundled SmolLM2-135M-Instruct (30 blocks), float32 on the CPU. Every student is
the same 15 blocks cut from it (`--student_layers 15`: blocks 0, 2, ..., 28, DistilBERT's every other layer),
trained for the same steps on the same data: `danlu train --stage kd --kd_stage pt --dataset danlu_text`
(the shipped corpus cut in cutoff_len blocks, the first val_size of them held out), full fine-tuning, AdamW
lr 1e-4, batch --batch (4), constant schedule, seed 42. "no KD" is that run with kd_alpha 0 (the hard labels alone);
the others are the methods with their published default weights; TinyBERT as its paper trains, the intermediate
layers (embedding, hidden and attention-score MSE) for half the steps, then the prediction layer for the rest.

Quality is the perplexity on the held-out blocks (danlu.evaluation.perplexity, one window per block); its
retention is teacher perplexity / student perplexity (1.0 = as good as the teacher). Latency: the median over
10 forward passes of one 256-token sequence after 2 warm-up passes, torch's default threads. Size: float32
parameters (a tied head counted once).

DynaBERT: run 1 trains the bundled model at widths 1.0/0.75/0.5/0.25 (rewired by importance first), run 2
at every (width, depth) for depths 1.0/0.75/0.5; each size is then extracted as a plain model and measured as
above, and the (0.5, 0.5) one is loaded in transformers and its logits compared with danlu's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import ForeignLoad, machine_info, print_aligned, print_foreign_load, save_results  # noqa: E402

from danlu.checkpoints.bundled import danlu_home, ensure_bundled_model  # noqa: E402
from danlu.checkpoints.load import load_pretrained  # noqa: E402
from danlu.data.pretrain import prepare_pretrain_data  # noqa: E402
from danlu.evaluation.perplexity import perplexity  # noqa: E402
from danlu.models.transformer import count_parameters  # noqa: E402
from danlu.training.arguments import TrainArguments  # noqa: E402
from danlu.training.train import train  # noqa: E402

CUTOFF = 256
SEED_FIGURES = "DistilBERT keeps 97% of BERT-base at 60% of its size; TinyBERT-4 keeps 96.8% at 7.5x smaller (seed 002)"


BATCH = 4


def common_args(out: Path, steps: int, **extra) -> TrainArguments:
    values = dict(stage="kd", kd_stage="pt", dataset="danlu_text", dataset_dir="data", finetuning_type="full",
                  learning_rate=1e-4, lr_scheduler_type="constant", max_steps=steps, per_device_train_batch_size=BATCH,
                  cutoff_len=CUTOFF, val_size=0.1, logging_steps=max(1, steps // 5), save_steps=10 ** 6,
                  output_dir=str(out), overwrite_output_dir=True, seed=42)
    values.update(extra)
    return TrainArguments(**values)


def held_out_tokens(tokenizer) -> list[list[int]]:
    _, held_out = prepare_pretrain_data(tokenizer, "data", ["danlu_text"], CUTOFF, danlu_home() / "token-cache",
                                        val_size=0.1)
    return [held_out[i].input_ids for i in range(len(held_out))]


def held_out_perplexity(model, blocks: list[list[int]]) -> float:
    ids = [t for block in blocks for t in block]
    return perplexity(model.eval(), ids, CUTOFF).perplexity


@torch.inference_mode()
def latency_ms(model, warmup: int = 2, runs: int = 10) -> float:
    ids = torch.randint(100, 1000, (1, CUTOFF))
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        model(ids)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(name: str, model, blocks, teacher_ppl: float | None, seconds: float | None = None) -> dict:
    with ForeignLoad() as load:
        ppl = held_out_perplexity(model, blocks)
        latency = latency_ms(model)
    params = count_parameters(model)
    return {"name": name, "params": params, "size_mb": params * 4 / 1e6, "latency_ms": latency, "perplexity": ppl,
            "retention": (teacher_ppl or ppl) / ppl, "train_s": seconds, "foreign_load": round(load.share, 3)}


def student_runs(args) -> list[tuple[str, list[dict]]]:
    """Each row's training, as one or more consecutive runs (each from the previous one's output)."""
    runs = [("no KD (hard labels)", [dict(kd_method="kd", kd_alpha=0.0)])]
    for method in args.methods:
        if method != "tinybert":
            runs.append((method, [dict(kd_method=method)]))
            continue
        # TinyBERT's procedure: the intermediate layers first (prediction weight 0), then the prediction layer
        # alone; half the steps each, so that the row trains as long as the others.
        intermediate = dict(kd_method="tinybert", kd_prediction_weight=0.0, max_steps=args.steps // 2)
        prediction = dict(kd_method="tinybert", kd_attention_weight=0.0, kd_hidden_weight=0.0,
                          kd_embedding_weight=0.0, kd_prediction_weight=1.0, max_steps=args.steps - args.steps // 2)
        runs.append(("tinybert (layers, then prediction)", [intermediate, prediction]))
    return runs


def stage_dir(out: Path, i: int) -> Path:
    return out.with_name(f"{out.name}-stage{i}")


def run_students(args, work: Path, teacher_row: dict, blocks) -> list[dict]:
    rows = []
    for name, stages in student_runs(args):
        out = work / name.split()[0]
        start = time.perf_counter()
        for i, extra in enumerate(stages):
            after_first = {} if i == 0 else dict(model_name_or_path=str(stage_dir(out, i - 1)),
                                                  teacher_model=str(ensure_bundled_model()))
            last = i == len(stages) - 1
            values = {"max_steps": args.steps, "student_layers": None if i else 15, **after_first, **extra}
            steps = values.pop("max_steps")
            train(common_args(out if last else stage_dir(out, i), steps, **values))
        seconds = time.perf_counter() - start
        student = load_pretrained(out, dtype="float32", device="cpu").model
        rows.append(measure(name, student, blocks, teacher_row["perplexity"], seconds))
        print(f"  {name}: ppl {rows[-1]['perplexity']:.2f}, {seconds:.0f} s", flush=True)
    return rows


def run_dynabert(args, work: Path, teacher_row: dict, blocks) -> tuple[list[dict], float]:
    from transformers import AutoModelForCausalLM

    from danlu.checkpoints.hf import save_hf_checkpoint
    from danlu.distillation.dynabert import DEPTHS, WIDTHS, extract, sub_network

    width_run, depth_run = work / "dynabert-width", work / "dynabert-depth"
    train(common_args(width_run, args.dynabert_steps, kd_method="dynabert"))
    train(common_args(depth_run, args.dynabert_steps, kd_method="dynabert", model_name_or_path=str(width_run),
                      teacher_model=str(width_run), dynabert_depths="1.0,0.75,0.5"))
    full = load_pretrained(depth_run, dtype="float32", device="cpu").model
    rows = []
    for depth in DEPTHS:
        for width in WIDTHS:
            small = extract(full, width, depth).eval()
            rows.append(measure(f"width {width}, depth {depth}", small, blocks, teacher_row["perplexity"]))
            print(f"  dynabert ({width}, {depth}): ppl {rows[-1]['perplexity']:.2f}", flush=True)
    half = extract(full, 0.5, 0.5).eval()
    exported = save_hf_checkpoint(half.state_dict(), half.config, work / "dynabert-0.5-0.5", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([blocks[0][:64]])
    with torch.no_grad():
        difference = float((hf(ids).logits - sub_network(full, 0.5, 0.5)(ids)).abs().max())
    return rows, difference


def print_rows(rows: list[dict]) -> None:
    header = ("model", "params", "MB (fp32)", "latency ms", "held-out ppl", "retention", "train s")
    print_aligned(header, [(r["name"], f"{r['params'] / 1e6:.1f}M", f"{r['size_mb']:.0f}", f"{r['latency_ms']:.1f}",
                            f"{r['perplexity']:.2f}", f"{r['retention']:.3f}",
                            "" if r["train_s"] is None else f"{r['train_s']:.0f}") for r in rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dynabert-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", default="kd,pkd_skip,pkd_last,distilbert,tinybert")
    parser.add_argument("--no-dynabert", action="store_true")
    parser.add_argument("--work", default="/tmp/danlu-bench-distillation")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    global BATCH
    BATCH = args.batch
    work = Path(args.work)
    lm = load_pretrained(ensure_bundled_model(), dtype="float32", device="cpu")
    blocks = held_out_tokens(lm.tokenizer)
    print(f"machine: {machine_info()}")
    print(f"held-out: {len(blocks)} blocks of {CUTOFF} tokens; {args.steps} training steps of {BATCH} blocks per "
          f"student")
    teacher_row = measure("teacher SmolLM2-135M-Instruct (30 blocks)", lm.model, blocks, None)
    rows = [teacher_row, *run_students(args, work, teacher_row, blocks)]
    results = {"machine": machine_info(), "steps": args.steps, "decoder": rows}
    print()
    print_rows(rows)
    baseline = rows[1]["perplexity"]
    for row in rows[2:]:
        print(f"{row['name']}: held-out perplexity {row['perplexity']:.2f} vs {baseline:.2f} without KD "
              f"({baseline / row['perplexity']:.2f}x better)")
    print(f"for scale: {SEED_FIGURES}")
    if not args.no_dynabert:
        dyna_rows, difference = run_dynabert(args, work, teacher_row, blocks)
        print()
        print_rows(dyna_rows)
        print(f"DynaBERT (0.5, 0.5) exported: transformers' logits vs danlu's sub-network, max |diff| {difference:.2e}")
        results.update(dynabert=dyna_rows, dynabert_export_max_diff=difference, dynabert_steps=args.dynabert_steps)
    print_foreign_load({r["name"]: r["foreign_load"] for r in results["decoder"]}, "measurement")
    save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
