#!/bin/sh
# Learned scales started from each group's least-squared-error range (qat --scale-init mse)
# against mx.quantize's min-max grid, paired by data-order seed 0-4: the table's 3-bit QAT
# setting otherwise (bench/results/qat.csv: lr 3e-5, the embedding at 3x, 200 steps x 4 x 64
# tokens, KL to the float model, the mean of the last 50 steps exported), scored on the whole
# held-out set with bench/qat_rescore.py -> bench/results/qat_3bit_init.csv. The min-max
# runs are bench/qat_3bit_average.sh's (made here if missing). About 4 minutes per run and 1
# per scored run on 2 CPU cores.
set -eu
out=${OUT:-runs/qat-init}
minmax=${MINMAX:-runs/qat-average}
runs=""
for seed in 0 1 2 3 4; do
    for init in minmax mse; do
        dir=$( [ "$init" = minmax ] && echo "$minmax/mean50-seed$seed" || echo "$out/mse-seed$seed" )
        if [ ! -f "$dir/config.json" ]; then
            mlx-localnorm qat --model runs/demo --bits 3 --distill --learn-scales \
                --scale-init "$init" --learning-rate 3e-5 --embedding-lr-ratio 3 \
                --average-last 50 --total-steps 200 --batch-size 4 --seq-len 64 \
                --eval-batches 0 --eval-every 0 --no-compare --no-progress --seed "$seed" \
                --out "$dir"
        fi
        runs="$runs $dir"
    done
done
python bench/qat_rescore.py --model runs/demo --csv bench/results/qat_3bit_init.csv $runs
