#!/bin/sh
# The table's 3-bit QAT setting (bench/results/qat.csv: learned scales, lr 3e-5, 200 steps x
# 4 x 64 tokens, KL to the float model) again at data-order seeds 1 and 2 (seed 0 is the
# table's own run in runs/demo-qat/3bit), then every 3-bit run given here and those of
# bench/qat_3bit_sweep.sh found in runs/qat-sweep scored on the whole held-out set with
# bench/qat_rescore.py -> bench/results/qat_3bit_rescored.csv. About 6 minutes per seed on
# 2 CPU cores.
set -eu
out=${OUT:-runs/qat-seeds}
table=${TABLE:-runs/demo-qat/3bit}
for seed in 1 2; do
    mlx-localnorm qat --model runs/demo --bits 3 --distill --learn-scales --learning-rate 3e-5 \
        --total-steps 200 --batch-size 4 --seq-len 64 --eval-batches 0 --eval-every 0 \
        --no-compare --no-progress --seed "$seed" --out "$out/seed$seed"
done
sweep=$(ls -d runs/qat-sweep/*/ 2>/dev/null || true)
python bench/qat_rescore.py --model runs/demo --csv bench/results/qat_3bit_rescored.csv \
    "$table" "$out/seed1" "$out/seed2" $sweep
