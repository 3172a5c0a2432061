#!/bin/sh
# The QAT table's 3-bit setting (bench/results/qat.csv: learned scales, lr 3e-5, the
# embedding at 3x, 400 steps x 8 x 64 tokens, KL to the float model, the mean of the last
# 100 steps exported) at data-order seeds 0-4, scored on the whole held-out set with
# bench/qat_rescore.py -> bench/results/qat_3bit_table_seeds.csv: how much of the table's
# 3-bit figure is its seed. Seed 0 is the table's own run (TABLE, default runs/demo-qat/3bit
# as README's command writes it; trained here if missing). A run whose directory already
# holds a finished model is kept. About 11 minutes per run and 1 per scored run on 2 CPU
# cores.
set -eu
table=${TABLE:-runs/demo-qat/3bit}
out=${OUT:-runs/qat-table-seeds}
qat() {
    mlx-localnorm qat --model runs/demo --bits 3 --distill --learn-scales \
        --learning-rate 3e-5 --embedding-lr-ratio 3 --average-last 100 --total-steps 400 \
        --batch-size 8 --seq-len 64 --eval-batches 0 --eval-every 0 --no-compare \
        --no-progress "$@"
}
[ -f "$table/config.json" ] || qat --seed 0 --out "$table"
runs=$table
for seed in 1 2 3 4; do
    [ -f "$out/seed$seed/config.json" ] || qat --seed "$seed" --out "$out/seed$seed"
    runs="$runs $out/seed$seed"
done
python bench/qat_rescore.py --model runs/demo --csv bench/results/qat_3bit_table_seeds.csv $runs
