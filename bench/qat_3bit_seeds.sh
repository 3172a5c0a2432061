#!/bin/sh
# The previous table's 3-bit QAT setting (learned scales, lr 3e-5, the embedding at 3x,
# 200 steps x 4 x 64 tokens, KL to the float model, the last step's weights) at data-order
# seeds 0-2, as bench/qat_3bit_average.sh makes them (runs/qat-average/last-seed*; run it
# first), scored on the whole held-out set with bench/qat_rescore.py ->
# bench/results/qat_3bit_seeds.csv, beside runs in runs/qat-sweep made by the same command
# without --embedding-lr-ratio (the setting before that): at seeds 0-2, and at seed 0 with
# --total-steps 400, with --no-train-others, and with the embedding at 0.1x (a prototype of
# --embedding-lr-ratio 0.1). About 1 minute per scored run on 2 CPU cores.
set -eu
runs=${RUNS:-runs/qat-average}
sweep=runs/qat-sweep
python bench/qat_rescore.py --model runs/demo --csv bench/results/qat_3bit_seeds.csv \
    $runs/last-seed0 $runs/last-seed1 $runs/last-seed2 \
    $sweep/lsq-200x4-seed0 $sweep/lsq-200x4-seed1 $sweep/lsq-200x4-seed2 \
    $sweep/lsq-400x4-seed0 $sweep/lsq-200x4-no-others $sweep/lsq-200x4-emb0.1x
