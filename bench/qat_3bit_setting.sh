#!/bin/sh
# One change to the previous QAT table's 3-bit setting, paired with that setting by
# data-order seed (0-4 unless SEEDS says otherwise):
#     sh bench/qat_3bit_setting.sh NAME QAT_FLAG...
# trains runs/qat-setting/NAME-seed0..4 with that table's command (learned scales, lr 3e-5,
# the embedding at 3x, 200 steps x 4 x 64 tokens, KL to the float model, the mean of the
# last 50 steps exported; `400x8 --total-steps 400 --batch-size 8 --average-last 100` is
# the current table's) plus QAT_FLAG... (later flags win), and scores them beside it at
# the same seeds (bench/qat_3bit_average.sh's runs/qat-average/mean50-seed*, made first if
# missing) on the whole held-out set with bench/qat_rescore.py ->
# bench/results/qat_3bit_NAME.csv. A run whose directory already holds a finished model is
# kept. About 4 minutes per run and 1 per scored run on 2 CPU cores. E.g.
# `sh bench/qat_3bit_setting.sh mse --scale-init mse`; SEEDS="0 1 2" for fewer.
set -eu
[ $# -ge 2 ] || { echo "usage: sh $0 NAME QAT_FLAG..." >&2; exit 2; }
name=$1
shift
out=${OUT:-runs/qat-setting}
table=runs/qat-average
qat() {
    mlx-localnorm qat --model runs/demo --bits 3 --distill --learn-scales \
        --learning-rate 3e-5 --embedding-lr-ratio 3 --average-last 50 --total-steps 200 \
        --batch-size 4 --seq-len 64 --eval-batches 0 --eval-every 0 --no-compare \
        --no-progress "$@"
}
runs=""
for seed in ${SEEDS:-0 1 2 3 4}; do
    [ -f "$table/mean50-seed$seed/config.json" ] || qat --seed "$seed" --out "$table/mean50-seed$seed"
    [ -f "$out/$name-seed$seed/config.json" ] || qat --seed "$seed" "$@" --out "$out/$name-seed$seed"
    runs="$runs $table/mean50-seed$seed $out/$name-seed$seed"
done
python bench/qat_rescore.py --model runs/demo --csv "bench/results/qat_3bit_$name.csv" $runs
