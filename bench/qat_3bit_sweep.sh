#!/bin/sh
# 3-bit QAT of the demo model at the first table's budget (100 steps x 8 x 64 tokens, KL to
# the float model) under several settings; one CSV per setting, merged into
# bench/results/qat_3bit_sweep.csv with a `setting` column. About 5-7 minutes per setting on
# 2 CPU cores. Scored on the first 16 held-out batches (8,192 tokens), where the settings
# were chosen: a noisy sample (bench/qat_3bit_seeds.sh rescores the runs left in
# runs/qat-sweep on the whole held-out set, bench/results/qat_3bit_rescored.csv).
set -eu
out=${OUT:-runs/qat-sweep}
common="--model runs/demo --bits 3 --distill --total-steps 100 --batch-size 8 --seq-len 64
        --eval-batches 16 --no-dwq --no-progress"
run() {
    name=$1; shift
    mlx-localnorm qat $common --out "$out/$name" --csv "$out/$name.csv" "$@"
}
run lr3e-4 --learning-rate 3e-4
run lr1e-4 --learning-rate 1e-4
run lr3e-5 --learning-rate 3e-5
run lr1e-5 --learning-rate 1e-5
run lsq-lr3e-5 --learning-rate 3e-5 --learn-scales
run lsq-lr3e-5-ratio3 --learning-rate 3e-5 --learn-scales --scale-lr-ratio 3
run lsq-lr3e-5-ratio0.3 --learning-rate 3e-5 --learn-scales --scale-lr-ratio 0.3
run lsq-lr2e-5 --learning-rate 2e-5 --learn-scales
run lsq-lr4e-5 --learning-rate 4e-5 --learn-scales
run lsq-lr5e-5 --learning-rate 5e-5 --learn-scales
python - "$out" <<'PY'
import csv, sys
from pathlib import Path

out = Path(sys.argv[1])
names = ["lr3e-4", "lr1e-4", "lr3e-5", "lr1e-5", "lsq-lr3e-5", "lsq-lr3e-5-ratio3",
         "lsq-lr3e-5-ratio0.3", "lsq-lr2e-5", "lsq-lr4e-5", "lsq-lr5e-5"]
rows = []
for name in names:
    for row in csv.DictReader(open(out / f"{name}.csv")):
        if row["method"] == "qat" or (name == names[0] and row["method"] != "qat"):
            rows.append({"setting": name if row["method"] == "qat" else "", **row})
with open("bench/results/qat_3bit_sweep.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
PY
