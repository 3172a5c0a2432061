#!/bin/sh
# Averaging the last steps (qat --average-last 50) against the last step's weights, paired
# by data-order seed 0-4: the previous QAT table's 3-bit setting (learned scales, lr 3e-5,
# the embedding at 3x, 200 steps x 4 x 64 tokens, KL to the float model; the table is now
# at 400 x 8, bench/qat_3bit_table_seeds.sh) with and without the mean of its last 50
# steps, scored on the whole held-out set with bench/qat_rescore.py ->
# bench/results/qat_3bit_average.csv. A run whose directory already holds a finished model
# is kept (that table's own 3-bit run is mean50 at seed 0). About 4 minutes per run and 1
# per scored run on 2 CPU cores.
set -eu
out=${OUT:-runs/qat-average}
runs=""
for seed in 0 1 2 3 4; do
    for average in 0 50; do
        name=$( [ "$average" = 0 ] && echo "last" || echo "mean$average" )-seed$seed
        if [ ! -f "$out/$name/config.json" ]; then
            mlx-localnorm qat --model runs/demo --bits 3 --distill --learn-scales \
                --learning-rate 3e-5 --embedding-lr-ratio 3 --average-last "$average" \
                --total-steps 200 --batch-size 4 --seq-len 64 --eval-batches 0 \
                --eval-every 0 --no-compare --no-progress --seed "$seed" --out "$out/$name"
        fi
        runs="$runs $out/$name"
    done
done
python bench/qat_rescore.py --model runs/demo --csv bench/results/qat_3bit_average.csv $runs
