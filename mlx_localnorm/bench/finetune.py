"""``mlx-localnorm bench finetune``: LoRA fine-tuning with our trainer vs ``mlx_lm.lora``'s.

The demo-size model (SeeDNorm + Peri-LN, ``PretrainConfig`` defaults; other sizes with
``--vocab``, ``--hidden``, ``--layers``, ``--heads``), saved once with a word-level tokenizer,
is LoRA fine-tuned on the same random ``completions`` examples (prompt masked) with the same
batch, rank, LoRA layers, AdamW (no weight decay, constant learning rate, no clipping) by
``Finetuner`` (``mlx-localnorm finetune``) and by mlx-lm's own ``mlx_lm.tuner.trainer.train``.
The two alternate for ``--rounds`` rounds; each keeps its best round (noise only slows a
round down) and the median round is reported beside it. Tokens/s counts the
trained (unmasked) tokens over the steps after ``--warmup`` (compilation), as mlx-lm reports
them (its count, and its loss, include one padding target past each example's end: that
favours it by one token per example); peak memory is MLX's peak from loading the model to the
end of training. Targets: tokens/s >= 1.0x and peak memory <= 1.0x of mlx-lm's trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .._argparse import OneLineParser
from ..data.sft import load_sft
from ..models import Model, save_model
from ..train.finetune import FinetuneConfig, Finetuner
from ..train.model_dir import load_model_dir
from ._sizes import add_model_size_flags, parse_bench_args
from .common import device, machine, markdown_table, write_csv

LEARNING_RATE = 1e-4


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``<unk> <eos> w2 .. w{V-1}``, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(2, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def write_data(path: Path, vocab_size: int, examples: int, seq_len: int) -> None:
    """Random completions of 3/4 seq_len .. seq_len tokens with EOS, the first third the
    prompt. For a seq_len that is a multiple of 32 every batch has the same padded width in
    both trainers, so neither compiles a new shape while it is timed."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    with open(path / "train.jsonl", "w") as f:
        for _ in range(examples):
            words = [f"w{i}" for i in rng.integers(2, vocab_size, rng.integers(
                seq_len - seq_len // 4, seq_len))]
            cut = len(words) // 3
            f.write(json.dumps({"prompt": " ".join(words[:cut]),
                                "completion": " " + " ".join(words[cut:])}) + "\n")


def measured_rate(cumulative_tokens: list[int], rates: list[float], warmup: int) -> float:
    """Tokens/s over the steps after ``warmup`` from per-step cumulative counts and rates."""
    counts = np.diff([0, *cumulative_tokens])[warmup:]
    return float(counts.sum() / (counts / np.array(rates[warmup:])).sum())


def run_ours(config: FinetuneConfig, warmup: int) -> tuple[float, float]:
    """(tokens/s after the warm-up steps, peak memory in bytes) of ``Finetuner``."""
    mx.reset_peak_memory()
    trainer = Finetuner(config)
    trainer.run()
    records = [r for r in trainer.metrics.records if "loss" in r]  # the training steps
    return (measured_rate([r["tokens"] for r in records],
                          [r["tokens_per_s"] for r in records], warmup), mx.get_peak_memory())


def run_mlx_lm(config: FinetuneConfig, warmup: int, work: Path) -> tuple[float, float]:
    """The same for ``mlx_lm.tuner.trainer.train`` on the same examples and LoRA layers."""
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    reports = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, train_info: dict):
            reports.append(train_info)

    mx.reset_peak_memory()
    model, tokenizer, _ = load_model_dir(config.model)
    examples = load_sft(config.data, tokenizer).train
    dataset = [(e.tokens, int(np.argmax(e.mask))) for e in examples]  # (tokens, prompt length)
    model.freeze()
    mx.random.seed(config.seed)
    linear_to_lora_layers(model, config.num_layers, config.lora_parameters())
    np.random.seed(config.seed)  # mlx-lm's batch order
    args = TrainingArgs(batch_size=config.batch_size, iters=config.steps, steps_per_report=1,
                        steps_per_eval=10**9, steps_per_save=10**9,
                        max_seq_length=config.max_seq_len + 1,
                        adapter_file=str(work / "mlx_lm_adapters.safetensors"))
    with contextlib.redirect_stdout(io.StringIO()):  # its per-step table
        train(model, optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=0.0), dataset,
              args=args, training_callback=Collect())
    return (measured_rate([r["trained_tokens"] for r in reports],
                          [r["tokens_per_second"] for r in reports], warmup), mx.get_peak_memory())


def run(config_of, rounds: int, warmup: int, work: Path) -> dict[str, tuple[list, float]]:
    """Each trainer's tokens/s per round and its peak memory, over alternating rounds."""
    results = {"mlx-localnorm finetune": ([], 0.0), "mlx_lm.lora trainer": ([], 0.0)}
    for r in range(rounds):
        order = list(results) if r % 2 == 0 else list(reversed(results))
        for name in order:
            if name == "mlx_lm.lora trainer":
                speed, peak = run_mlx_lm(config_of(f"mlx_lm{r}"), warmup, work)
            else:
                speed, peak = run_ours(config_of(f"ours{r}"), warmup)
            gc.collect()
            mx.clear_cache()
            speeds, top = results[name]
            results[name] = (speeds + [speed], max(top, peak))
            print(f"  round {r + 1}/{rounds} {name}: {speed:.0f} tokens/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="mlx-localnorm bench finetune", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results", help="output directory")
    add_model_size_flags(parser)
    parser.add_argument("--batch", type=int, default=4, help="examples per step")
    parser.add_argument("--seq-len", type=int, default=128, help="longest example in tokens")
    parser.add_argument("--examples", type=int, default=64, help="training examples")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-layers", type=int, default=None,
                        help="LoRA on the last this many blocks (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args, pretrain = parse_bench_args(parser, argv, ("batch", "seq_len", "examples", "rank",
                                                     "steps", "warmup", "rounds"))
    if args.steps <= args.warmup:
        parser.error(f"--steps must be > --warmup ({args.warmup}), got {args.steps}")
    layers = pretrain.num_layers if args.lora_layers is None else args.lora_layers
    if not 1 <= layers <= pretrain.num_layers:
        parser.error(f"--lora-layers must be in [1, {pretrain.num_layers}], got {layers}")
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        mx.random.seed(0)
        model = Model(pretrain.model_args(args.vocab))
        save_model(model, word_tokenizer(args.vocab), work / "model")
        write_data(work / "data", args.vocab, args.examples, args.seq_len)
        del model

        def config_of(name: str) -> FinetuneConfig:
            return FinetuneConfig(
                model=str(work / "model"), data=str(work / "data"), out_dir=str(work / name),
                mode="lora", rank=args.rank, num_layers=layers, batch_size=args.batch,
                max_seq_len=args.seq_len, learning_rate=LEARNING_RATE, schedule="constant",
                warmup_steps=0, grad_clip=0.0, steps=args.steps, eval_every=0, save_every=0,
                progress=False)

        results = run(config_of, args.rounds, args.warmup, work)
    summary = {name: (max(speeds), float(np.median(speeds)), peak)
               for name, (speeds, peak) in results.items()}
    ours, theirs = summary["mlx-localnorm finetune"], summary["mlx_lm.lora trainer"]
    rows = [{"machine": machine(), "device": device(), "mlx": mx.__version__,
             "trainer": name, "hidden": args.hidden, "layers": args.layers,
             "vocab": args.vocab, "rank": args.rank, "lora_layers": layers,
             "batch": args.batch, "seq_len": args.seq_len, "steps_timed": args.steps - args.warmup,
             "rounds": args.rounds, "tokens_per_s": round(best),
             "tokens_per_s_median": round(median), "peak_memory_mb": round(peak / 2**20, 1),
             "tokens_per_s_vs_mlx_lm": round(best / theirs[0], 3),
             "median_vs_mlx_lm": round(median / theirs[1], 3),
             "memory_vs_mlx_lm": round(peak / theirs[2], 3)}
            for name, (best, median, peak) in summary.items()]
    path = write_csv(rows, Path(args.out) / "finetune.csv")
    print(markdown_table(rows, ["trainer", "tokens_per_s", "tokens_per_s_median",
                                "peak_memory_mb", "tokens_per_s_vs_mlx_lm", "median_vs_mlx_lm",
                                "memory_vs_mlx_lm"]))
    print(f"\nours / mlx-lm: tokens/s {ours[0] / theirs[0]:.3f} best round, "
          f"{ours[1] / theirs[1]:.3f} median (target >= 1.0), peak memory "
          f"{ours[2] / theirs[2]:.3f} (target <= 1.0)\nwrote {path}")
    return 0
