#!/bin/sh
# The previous table's 3-bit QAT setting (learned scales, lr 3e-5, the embedding at 3x,
# 200 steps x 4 x 64 tokens, KL to the float model, the last step's weights) again at
# data-order seeds 1 and 2 (seed 0: the same command at seed 0, which
# bench/qat_3bit_average.sh makes as runs/qat-average/last-seed0), then scored on the
# whole held-out set with bench/qat_rescore.py -> bench/results/qat_3bit_seeds.csv, beside
# runs in runs/qat-sweep made by the command below without --embedding-lr-ratio (the
# setting before that): at seeds 0-2, and at seed 0 with --total-steps 400, with
# --no-train-others, and with the embedding at 0.1x (a prototype of --embedding-lr-ratio
# 0.1). About 4 minutes per seed and 1 per scored run on 2 CPU cores.
set -eu
out=${OUT:-runs/qat-seeds}
table=${TABLE:-runs/qat-average/last-seed0}
for seed in 1 2; do
    mlx-localnorm qat --model runs/demo --bits 3 --distill --learn-scales --learning-rate 3e-5 \
        --embedding-lr-ratio 3 --total-steps 200 --batch-size 4 --seq-len 64 \
        --eval-batches 0 --eval-every 0 --no-compare --no-progress --seed "$seed" \
        --out "$out/seed$seed"
done
sweep=runs/qat-sweep
python bench/qat_rescore.py --model runs/demo --csv bench/results/qat_3bit_seeds.csv \
    "$table" "$out/seed1" "$out/seed2" \
    $sweep/lsq-200x4-seed0 $sweep/lsq-200x4-seed1 $sweep/lsq-200x4-seed2 \
    $sweep/lsq-400x4-seed0 $sweep/lsq-200x4-no-others $sweep/lsq-200x4-emb0.1x
