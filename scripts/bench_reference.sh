#!/usr/bin/env bash
# Whole-process comparison of `dladiff protect --method aspl --layers 1` with Anti-DreamBooth's own
# attacks/aspl.py on the CPU, same tiny Stable Diffusion, same photos, same PGD budget (docs/benchmarks.md).
#
#   scripts/bench_reference.sh ANTIDB_DIR PHOTOS_DIR OUT_DIR [EPOCHS ...]      # default epochs: 10 50
#
# ANTIDB_DIR: a copy of https://github.com/VinAIResearch/Anti-DreamBooth (at least attacks/aspl.py; never
# put it in this repository). This script writes attacks/aspl_cpu.py beside it: the three device edits
# (the two `torch.device("cuda")` become "cpu", the VAE's `.cuda()` becomes `.cpu()`), checked by count.
# PHOTOS_DIR: the photos (only image files: the reference reads every file there); both sides protect
# them all, and the reference also trains its f' on them (its set A = set B here).
# Environment: PYTHON (default python: the project's interpreter, which has accelerate, diffusers,
# transformers, torchvision), REF_PYTHONPATH (extra path where the reference finds `datasets`),
# PAIRS (alternating pairs per epoch count, default 2), OMP_NUM_THREADS (default 1, both sides).
# The 200 class images of the reference's prior preservation (its script's --num_class_images) are
# generated once, by the reference itself, into OUT_DIR/class-person before the timed runs.
# Each run goes through `/usr/bin/time -v`; OUT_DIR/results.tsv gets one row per run
# (side, epochs, pair, wall s, user s, sys s, max RSS KB, 1-minute load average before the run).
set -euo pipefail

ANTIDB=$(realpath "$1"); PHOTOS=$(realpath "$2"); OUT=$(realpath -m "$3"); shift 3
if [ $# -gt 0 ]; then EPOCHS=("$@"); else EPOCHS=(10 50); fi
PY=${PYTHON:-python}
PAIRS=${PAIRS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"

sed -e 's/device = torch.device("cuda")/device = torch.device("cpu")/' \
    -e 's/^    )\.cuda()$/    ).cpu()/' "$ANTIDB/attacks/aspl.py" > "$ANTIDB/attacks/aspl_cpu.py"
EDITS=$(diff "$ANTIDB/attacks/aspl.py" "$ANTIDB/attacks/aspl_cpu.py" | grep -c '^>' || true)
[ "$EDITS" -eq 3 ] || { echo "expected 3 device edits in aspl.py, made $EDITS" >&2; exit 2; }

TINY=$(cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" -c "from dladiff.diffusion.tiny import ensure_tiny_sd; print(ensure_tiny_sd())")

ref_run() {  # epochs, output folder: attack_with_aspl.sh's own flags, at resolution 64, without xformers (CPU)
  env PYTHONPATH="${REF_PYTHONPATH:-}" "$PY" "$ANTIDB/attacks/aspl_cpu.py" \
    --pretrained_model_name_or_path="$TINY" \
    --instance_data_dir_for_train="$PHOTOS" --instance_data_dir_for_adversarial="$PHOTOS" \
    --instance_prompt="a photo of sks person" --class_data_dir="$OUT/class-person" --num_class_images=200 \
    --class_prompt="a photo of person" --output_dir="$2" --center_crop --with_prior_preservation \
    --prior_loss_weight=1.0 --resolution=64 --train_text_encoder --train_batch_size=1 --max_train_steps="$1" \
    --max_f_train_steps=3 --max_adv_train_steps=6 --checkpointing_iterations=10 --learning_rate=5e-7 \
    --pgd_alpha=5e-3 --pgd_eps=5e-2
}

ours_config() {  # epochs: the smoke model, ASPL at the reference's budget (6 PGD steps, α 0.005, η 0.05, 3 θ steps)
  printf '%s\n' "inherit: smoke" "method:" "  name: aspl" "layer1:" "  epochs: $1" "  epsilon: 0.05" \
    "  step_size: 0.005" "  stage1_steps: 3" "  stage2_steps: 3" "  stage3_steps: 3" \
    "  stage3_learning_rate: 5.0e-7" "  checkpoint_every: 10" > "$OUT/aspl-$1.yaml"
}

ours_run() {  # epochs, output folder
  env PYTHONPATH="$ROOT" "$PY" -c "from dladiff.cli import app; app()" protect "$PHOTOS" --out "$2" \
    --config "$OUT/aspl-$1.yaml" --method aspl --layers 1 --quiet
}

timed() {  # side (ours | reference), epochs, pair
  local side=$1 epochs=$2 pair=$3 load
  load=$(cut -d' ' -f1 /proc/loadavg)
  local log="$OUT/$side-$epochs-$pair.time" folder="$OUT/$side-$epochs-$pair"
  rm -rf "$folder"
  if [ "$side" = ours ]; then
    ours_config "$epochs"
    /usr/bin/time -v bash -c "$(declare -f ours_run); $(declare -p PY ROOT PHOTOS OUT); ours_run $epochs $folder" \
      > "$folder.log" 2> "$log" || { tail -20 "$log" >&2; exit 1; }
  else
    /usr/bin/time -v bash -c "$(declare -f ref_run); $(declare -p PY ANTIDB TINY PHOTOS OUT); ref_run $epochs $folder" \
      > "$folder.log" 2> "$log" || { tail -20 "$log" >&2; exit 1; }
  fi
  local wall user sys rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; print s}' "$log")
  user=$(awk -F': ' '/User time/ {print $2}' "$log")
  sys=$(awk -F': ' '/System time/ {print $2}' "$log")
  rss=$(awk -F': ' '/Maximum resident/ {print $2}' "$log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$side" "$epochs" "$pair" "$wall" "$user" "$sys" "$rss" "$load" \
    | tee -a "$OUT/results.tsv"
}

if [ "$(find "$OUT/class-person" -type f 2>/dev/null | wc -l)" -lt 200 ]; then
  echo "generating the reference's 200 class images once (not timed)" >&2
  ref_run 0 "$OUT/ref-prep" > "$OUT/ref-prep.log" 2>&1
fi

printf 'side\tepochs\tpair\twall_s\tuser_s\tsys_s\tmax_rss_kb\tload\n' | tee "$OUT/results.tsv"
for pair in $(seq 1 "$PAIRS"); do
  for epochs in "${EPOCHS[@]}"; do
    if [ $((pair % 2)) -eq 1 ]; then
      timed ours "$epochs" "$pair"; timed reference "$epochs" "$pair"
    else
      timed reference "$epochs" "$pair"; timed ours "$epochs" "$pair"
    fi
  done
done

"$PY" - "$OUT/results.tsv" <<'PYEOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
for epochs in sorted({r["epochs"] for r in rows}, key=int):
    pairs = {}
    for r in rows:
        if r["epochs"] == epochs:
            pairs.setdefault(r["pair"], {})[r["side"]] = r
    full = [p for p in pairs.values() if len(p) == 2]
    wall = [float(p["reference"]["wall_s"]) / float(p["ours"]["wall_s"]) for p in full]
    cpu = [(float(p["reference"]["user_s"]) + float(p["reference"]["sys_s"]))
           / (float(p["ours"]["user_s"]) + float(p["ours"]["sys_s"])) for p in full]
    print(f"{epochs} epochs: reference / ours, wall {', '.join(f'{s:.2f}x' for s in wall)} (median "
          f"{statistics.median(wall):.2f}x); user+sys {', '.join(f'{s:.2f}x' for s in cpu)}")
PYEOF
