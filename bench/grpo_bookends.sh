#!/bin/sh
# GRPO on the shipped task bookends ("s..t =" -> a Shakespeare word from s to t): a supervised
# warm-up of a new 0.4M-parameter character-level model (one demonstration in five fits the
# prompt), then GRPO (full weights, KL to the warm-up model) raising its held-out reward.
# Writes OUT_DIR (default runs/grpo-bookends): warmup/, metrics.jsonl, reward.png,
# checkpoints/, model/; then copies the curve to bench/results/. Run from the repository
# root; `time` it to check the 15-minute budget. See docs/rl.md.
set -e
OUT_DIR=${1:-runs/grpo-bookends}
mlx-localnorm grpo --task bookends --warmup-steps 1500 --warmup-config '{"demonstrations": 60000}' \
    --out-dir "$OUT_DIR" --mode full --algorithm grpo --beta 0.04 --learning-rate 1e-4 \
    --group-size 8 --prompts-per-step 16 --max-tokens 10 --steps 400 \
    --eval-every 20 --eval-size 64 --save-every 100
cp "$OUT_DIR/metrics.jsonl" bench/results/grpo_bookends_metrics.jsonl
cp "$OUT_DIR/reward.png" bench/results/grpo_bookends.png
