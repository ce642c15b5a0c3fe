#!/usr/bin/env bash
# Reproduce DLADiff's Tables 1-4 (and the PSNR of Table 9, the per-identity FID of Table 10) on a GPU
# machine that holds the weights. Read docs/evaluate.md ("Reproducing the paper") first.
#
#   DATA=/data/anti-dreambooth WORK=/scratch/dladiff bash scripts/reproduce_paper.sh
#   LAUNCH="accelerate launch --multi_gpu --num_processes 8" bash scripts/reproduce_paper.sh   # 8 GPUs
#
# DATA holds one folder per dataset in the Anti-DreamBooth layout: $DATA/CelebA-HQ/<id>/set_{A,B,C},
# $DATA/VGGFace2/<id>/set_{A,B,C}. Every step is resumable: run the script again after a crash.
set -euo pipefail

DATA=${DATA:?set DATA to the folder holding CelebA-HQ/ and VGGFace2/ (Anti-DreamBooth layout)}
WORK=${WORK:-$PWD/dladiff-repro}
DATASETS=${DATASETS:-"CelebA-HQ VGGFace2"}
LAUNCH=${LAUNCH:-accelerate launch --num_processes 1}
PROTECT_CONFIG=${PROTECT_CONFIG:-default}          # configs/default.yaml: the paper's protection settings
EVAL_CONFIG=${EVAL_CONFIG:-default}                # configs/evaluate/default.yaml: DreamBooth, LoRA, FaceID, InstantID on SD-2.1
TRANSFER_CONFIG=${TRANSFER_CONFIG:-transfer_sd15}  # configs/evaluate/transfer_sd15.yaml: DreamBooth on SD-1.5 (Table 3)
DLADIFF=$(command -v dladiff)

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}         # every weight must already be local (see the docs)

echo "== preflight: which weights are present (attacks whose weights are absent are skipped, with the reason)"
python - "$EVAL_CONFIG" "$TRANSFER_CONFIG" <<'PY'
import sys
from dladiff.evaluate.config import load_evaluate_config
from dladiff.evaluate.run import preflight

required_missing = False
for name in sys.argv[1:]:
    for what, problem in preflight(load_evaluate_config(name)):
        print(f"  {'ok     ' if problem is None else 'MISSING'}  [{name}] {what}" + ("" if problem is None else f": {problem}"))
        required_missing |= problem is not None and "required" in what
sys.exit("the FDR/ISM models are required" if required_missing else 0)
PY

for DS in $DATASETS; do
  echo "== $DS: protect every identity (set_A trains the static surrogate, set_B is protected)"
  $LAUNCH "$DLADIFF" protect "$DATA/$DS" --out "$WORK/$DS/protected" --dataset --config "$PROTECT_CONFIG"

  echo "== $DS: attack the clean photos (the 'w/o Protect' rows)"
  $LAUNCH "$DLADIFF" evaluate "$DATA/$DS" --clean "$DATA/$DS" --out "$WORK/$DS/eval-clean" --dataset \
      --config "$EVAL_CONFIG" --method "w/o Protect"

  echo "== $DS: attack the protected photos (the 'Ours' rows)"
  $LAUNCH "$DLADIFF" evaluate "$WORK/$DS/protected" --clean "$DATA/$DS" --out "$WORK/$DS/eval-ours" --dataset \
      --config "$EVAL_CONFIG" --method "Ours"

  echo "== $DS: model transfer, DreamBooth on SD-1.5 (Table 3)"
  $LAUNCH "$DLADIFF" evaluate "$WORK/$DS/protected" --clean "$DATA/$DS" --out "$WORK/$DS/eval-ours-sd15" --dataset \
      --config "$TRANSFER_CONFIG" --method "Ours (SD-1.5)"
done

echo "== tables"
EVAL_DIRS=()
for DS in $DATASETS; do
  EVAL_DIRS+=("$WORK/$DS/eval-clean" "$WORK/$DS/eval-ours" "$WORK/$DS/eval-ours-sd15")
done
"$DLADIFF" evaluate-tables "${EVAL_DIRS[@]}" --out "$WORK/tables.md"
echo "tables written to $WORK/tables.md (per-run tables and per-identity rows: <eval dir>/results.md, results.csv)"
