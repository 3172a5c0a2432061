#!/bin/sh
# GRPO on the shipped task add1 ("3+4=" -> "7"): a supervised warm-up of a new 0.4M-parameter
# character-level model, then GRPO (full weights) raising its held-out reward. Writes
# OUT_DIR (default runs/grpo-add1): warmup/, metrics.jsonl, reward.png, checkpoints/, model/;
# then copies the curve to bench/results/. Run from the repository root. See docs/rl.md.
set -e
OUT_DIR=${1:-runs/grpo-add1}
mlx-localnorm grpo --task add1 --warmup-steps 200 --out-dir "$OUT_DIR" \
    --mode full --algorithm grpo --beta 0 --group-size 8 --prompts-per-step 8 \
    --max-tokens 5 --temperature 1.0 --learning-rate 5e-4 --steps 150 \
    --eval-every 10 --eval-size 64 --save-every 25
cp "$OUT_DIR/metrics.jsonl" bench/results/grpo_add1_metrics.jsonl
cp "$OUT_DIR/reward.png" bench/results/grpo_add1.png
