#!/usr/bin/env bash
# The GPU check for a lent CUDA machine (H100/H200): torch is installed there, nothing can be
# downloaded, and the repo arrives as a plain working tree (maybe not pip-installed).
#
#   bash scripts/device_check.sh          # writes under ${OUT:-/tmp/clpd_device_check}
#
# Parts: environment, imports, the gpu-marked tests (fused loss on CUDA included), then on random
# weights in bf16 (clpd.bench.store): one optimizer step SFT / live KD / stored KD, each fused and
# unfused, 0.5B student <- 1.5B and <- 7B teacher shapes (8 x 512 tokens; peak memory, tokens/s);
# on-policy steps 0.5B <- 1.5B (32 prompts, 128 new tokens; samples/s and the step's split); and
# the largest micro-batch of 512-token examples each arm fits, <- 7B and <- 1.5B. Every part runs
# even if an earlier one failed, and prints as it goes; a summary table comes last, and the exit
# status is non-zero if any part failed. Budget: BUDGET_S=480 s for all parts (each capped too),
# about 10 minutes of device time with the machine's start-up; the ordering puts the step and
# on-policy measurements before the memory searches.
#
# The image of the lent H100/H200 machines has torch, transformers, peft and rich but not hydra-core,
# omegaconf and antlr4 (clpd.config and tests/conftest.py import them): carry them as wheels in .whl/
# (or $CLPD_WHEELS), made on a machine with PyPI with
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI
# and pass carry=[".whl"] to the device tool; the imports part installs them into /tmp/clpd_site.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/clpd_device_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

START=$SECONDS
BUDGET_S=${BUDGET_S:-480}  # the whole check stays under 8 minutes, hung parts included
NAMES=()
CODES=()
TIMES=()

header() {
    printf '\n==================== %s ====================\n' "$1"
}

# limit CAP: seconds a timed part may take, CAP or what is left of the budget if that is less.
limit() {
    local left=$((BUDGET_S - (SECONDS - START)))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

# part NAME LOGFILE COMMAND...: run COMMAND, tee its output to $OUT/LOGFILE, record its exit code.
part() {
    local name=$1 log=$2 t0=$SECONDS rc
    shift 2
    header "$name"
    echo "\$ $*"
    if [ "${1:-}" = timeout ] && [ "${2:-0}" -lt 5 ]; then
        echo "!! no time left in the ${BUDGET_S}s budget: skipped" | tee "$OUT/$log"
        rc=124
    else
        "$@" 2>&1 | tee "$OUT/$log"
        rc=${PIPESTATUS[0]}
        [ "$rc" -eq 124 ] && echo "!! $name timed out"
    fi
    NAMES+=("$name")
    CODES+=("$rc")
    TIMES+=($((SECONDS - t0)))
    echo "-- $name: exit $rc in $((SECONDS - t0))s"
}

env_info() {
    local rc=0
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,utilization.gpu --format=csv || rc=1
    nvidia-smi -L || rc=1
    "$PY" --version
    # get_device_name() raises without a CUDA device, so this part fails where the GPU tests would only skip.
    "$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name()); print("cuda", torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())' || rc=1
    return $rc
}

NEEDED="torch transformers peft hydra omegaconf rich tokenizers"
WHEELS="${CLPD_WHEELS:-$REPO/.whl}"  # pure-Python wheels carried along for packages the image lacks
SITE=/tmp/clpd_site

have_all() {
    # clpd.conf (the configs) is a package only once clpd is installed (conf/ ships as clpd.conf).
    "$PY" -c "import transformers, peft, hydra, omegaconf, rich, clpd, clpd.conf; print('transformers', transformers.__version__, 'peft', peft.__version__, 'hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)"
}

# Runs in this shell (not in a pipe) so that the PYTHONPATH it extends holds for the later parts.
imports() {
    have_all && return 0
    echo "missing packages:"
    # find_spec only looks the packages up: one cold import of torch & co. costs ~10 s there.
    "$PY" -c "import importlib.util, sys
for name in sys.argv[1:]:
    print('  ok     ' if importlib.util.find_spec(name) else '  MISSING', name)" $NEEDED
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "installing the carried wheels from $WHEELS into $SITE (offline, no deps):"
        ls "$WHEELS"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        echo "no wheels in $WHEELS: see the top of this script for how to bring them"
    fi
    have_all && return 0
    # Registers the clpd package (no dependencies, no index): it cannot supply a missing
    # third-party package, only clpd itself if that was not importable.
    echo "trying: pip install -e . --no-deps (offline)"
    timeout 30 "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . || echo "pip install -e . failed"
    have_all
}

header "clpd device check: $REPO -> $OUT"
date -u +"%Y-%m-%dT%H:%M:%SZ"
git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true

part "environment" env.txt env_info
header "imports"
t0=$SECONDS
imports >"$OUT/imports.txt" 2>&1
rc=$?
cat "$OUT/imports.txt"
NAMES+=("imports"); CODES+=("$rc"); TIMES+=($((SECONDS - t0)))
echo "-- imports: exit $rc in $((SECONDS - t0))s"
part "gpu tests" test_gpu.txt timeout "$(limit 70)" "$PY" -m pytest -q -m gpu tests/test_gpu.py
STEP="$PY -m clpd.bench.store step --preset qwen --student qwen2.5-0.5b --batch-size 8 --seq-len 512 --rounds 2 --steps 3 --device cuda --precision bf16"
# shellcheck disable=SC2086
part "step 0.5b <- 1.5b" step_0.5b_1.5b.txt timeout "$(limit 75)" $STEP --teacher qwen2.5-1.5b \
    --json "$OUT/step_0.5b_1.5b.json"
part "on-policy 0.5b <- 1.5b" onpolicy_0.5b_1.5b.txt timeout "$(limit 60)" "$PY" -m clpd.bench.store onpolicy \
    --student qwen2.5-0.5b --teacher qwen2.5-1.5b --batch-size 32 --grad-accum 4 --seq-len 256 --max-new-tokens 128 \
    --rounds 2 --steps 2 --device cuda --precision bf16 --json "$OUT/onpolicy_0.5b_1.5b.json"
# shellcheck disable=SC2086
part "step 0.5b <- 7b" step_0.5b_7b.txt timeout "$(limit 90)" $STEP --teacher qwen2.5-7b \
    --json "$OUT/step_0.5b_7b.json"
LARGEST="$PY -m clpd.bench.store largest --student qwen2.5-0.5b --seq-len 512 --start 16 --max-batch 256 --refine 2 --device cuda --precision bf16"
# shellcheck disable=SC2086
part "largest 0.5b <- 7b" largest_0.5b_7b.txt timeout "$(limit 110)" $LARGEST --teacher qwen2.5-7b \
    --arms live,live_fused,stored,stored_fused,sft,sft_fused --json "$OUT/largest_0.5b_7b.json"
# shellcheck disable=SC2086
part "largest 0.5b <- 1.5b" largest_0.5b_1.5b.txt timeout "$(limit 90)" $LARGEST --teacher qwen2.5-1.5b \
    --arms live,live_fused,stored,stored_fused --json "$OUT/largest_0.5b_1.5b.json"

header "summary ($((SECONDS - START))s in all)"
failed=0
{
    printf '%-22s %6s %6s  %s\n' part exit secs result
    for i in "${!NAMES[@]}"; do
        if [ "${CODES[$i]}" -eq 0 ]; then result=ok; else result=FAILED; failed=1; fi
        [ "${CODES[$i]}" -eq 124 ] && result="FAILED (timeout)"
        printf '%-22s %6s %6s  %s\n' "${NAMES[$i]}" "${CODES[$i]}" "${TIMES[$i]}" "$result"
    done
} | tee "$OUT/summary.txt"
# The table is built in a subshell (the pipe to tee): recompute the overall status here.
for code in "${CODES[@]}"; do [ "$code" -ne 0 ] && failed=1; done
echo "outputs in $OUT"
exit "$failed"
