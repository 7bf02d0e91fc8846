#!/usr/bin/env bash
# One prepared GPU check for the sparse kernels: tests on CUDA, kernel microbenchmarks,
# end-to-end speed, tables and a plot; everything lands in OUTDIR (JSON, CSV, logs).
#
#   bash scripts/gpu_check.sh OUTDIR                       # on the GPU box, ~8 min at most
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh OUTDIR     # CPU dry run: interpreter, tiny shapes
#
# Made for a fresh box with torch, triton, transformers and pytest preinstalled, a copy of this
# repo, and no network. Each stage runs under `timeout` and its exit status is logged; a stage
# that fails or times out does not stop the next one. The benchmarks write their JSON after
# every case, so a stage killed at its limit still leaves its results. OUTDIR gets at most 8
# files (gpu_check.log, tests_linear.xml, tests_kernels.xml, kernels.json, kernels.csv,
# e2e.json, speed.md, speed.png): the device tool brings back 8 files at most.
#
# Environment:
#   GPU_CHECK_QUICK=1   CPU dry run (sets TRITON_INTERPRET=1, --quick benchmarks)
#   GPU_CHECK_PIP=0     never try `pip install -e`; use the path shim directly
#   PYTHON=python3      interpreter to use
#   LIMIT_{PRECOMPILE,LINEAR,TESTS,KERNELS,E2E,PLOT}=seconds   per-stage limits (GPU defaults:
#                       415 s in all, + setup <= 30 s + version probe and summary: under 8 min)
#   LIMIT_{PRECOMPILE_QUANT,QUANT}=seconds   the quantized-kernel stages (GPU defaults 40 + 45 s;
#                       GPU_CHECK_QUANT=0 skips them and keeps the 8-minute total)
set -uo pipefail

OUTDIR=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

# Stage limits (s). GPU: 60 + 45 + 140 + 65 + 90 + 15 = 415, + setup <= 30 + probe/summary ~15:
# under 8 min. The benchmarks get an internal budget below their limit so they stop cleanly.
if [ "$QUICK" = 1 ]; then
  : "${LIMIT_PRECOMPILE:=200}" "${LIMIT_LINEAR:=400}" "${LIMIT_TESTS:=400}" "${LIMIT_KERNELS:=400}"
  : "${LIMIT_E2E:=400}" "${LIMIT_PLOT:=60}" "${LIMIT_PRECOMPILE_QUANT:=200}" "${LIMIT_QUANT:=400}"
else
  : "${LIMIT_PRECOMPILE:=60}" "${LIMIT_LINEAR:=45}" "${LIMIT_TESTS:=90}" "${LIMIT_KERNELS:=140}"
  : "${LIMIT_E2E:=65}" "${LIMIT_PLOT:=15}" "${LIMIT_PRECOMPILE_QUANT:=40}" "${LIMIT_QUANT:=45}"
fi
QUANT=${GPU_CHECK_QUANT:-1}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Autotune results on disk: the tests' tunings are reused by the benchmarks (same keys).
export TRITON_CACHE_AUTOTUNING=1
if [ "$QUICK" = 1 ]; then
  export TRITON_INTERPRET=1
fi

STATUS=()
T_ALL=$SECONDS
stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== [$name] $(date -u +%H:%M:%S) start (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "=== [$name] TIMED OUT after ${limit}s"
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s"
  STATUS+=("$name: rc=$rc ($((SECONDS - t0))s)")
  return 0
}

echo "=== gpu_check $(date -u +%FT%TZ) quick=$QUICK repo=$REPO out=$OUTDIR"
(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi) || echo "(no nvidia-smi)"
timeout 60 "$PY" - <<'EOF' || echo "(version probe failed)"
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| sm", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| mem GiB", round(p.total_memory / 2**30, 1))
for name in ("triton", "transformers", "pytest", "matplotlib", "safetensors", "setuptools"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__)
EOF

# --- make llmprune (and llmprune.kernels from kernels/) importable, offline --------------------
setup_import() {
  local check='import llmprune, llmprune.kernels.linear, os, sys; r = os.path.realpath(llmprune.__path__[0]); sys.exit(0 if r.startswith(os.path.realpath(sys.argv[1])) else 3)'
  if [ "${GPU_CHECK_PIP:-1}" = 1 ]; then
    echo "trying: pip install --no-deps --no-build-isolation --no-index -e ."
    if timeout 25 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO"; then
      if (cd /tmp && "$PY" -c "$check" "$REPO"); then
        echo "llmprune importable through the editable install"
        return 0
      fi
      echo "editable install did not make llmprune.kernels importable"
    else
      echo "pip install -e failed (offline build; see above)"
    fi
  fi
  local shim=/tmp/llmprune-shim
  rm -rf "$shim"
  "$PY" "$REPO/scripts/gpu_pathshim.py" "$shim" --repo "$REPO" >/dev/null || return 1
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  if (cd /tmp && "$PY" -c "$check" "$REPO"); then
    echo "llmprune importable through the path shim (PYTHONPATH=$shim)"
    return 0
  fi
  return 1
}
echo
echo "=== [setup] $(date -u +%H:%M:%S)"
t0=$SECONDS
if setup_import; then
  STATUS+=("setup: ok ($((SECONDS - t0))s)")
else
  STATUS+=("setup: FAILED ($((SECONDS - t0))s)")
  echo "cannot import llmprune.kernels: nothing else can run"
fi

# --- compile ahead, in parallel ----------------------------------------------------------------
# ~240 Triton compilations (configs x dtypes x argument specializations) would take minutes one
# after another inside autotuning; here they run on all CPU cores and land in the disk cache.
if [ "$QUICK" = 1 ]; then
  stage precompile "$LIMIT_PRECOMPILE" "$PY" scripts/gpu_precompile.py --procs 2 --k-values 128,528 --m 1,33 --dtype fp16
else
  stage precompile "$LIMIT_PRECOMPILE" "$PY" scripts/gpu_precompile.py
fi

# --- tests -------------------------------------------------------------------------------------
# Two runs, two reports: a timeout in one keeps the other's. SparseLinear first (its CUDA cases
# use the benchmark's shapes: no compilations beyond the precompiled ones); the kernel tests,
# whose odd shapes compile more, after the benchmarks, with what time is left.
# -P: the repo root must not shadow the installed/shimmed llmprune (kernels/ is not a package
# named llmprune.kernels there). Slow tests need the SmolLM2 package, not on the GPU box.
PYTEST=("$PY" -P -m pytest -v -rfEs -p no:cacheprovider -m "not slow" --durations=12 -o faulthandler_timeout=80)
KERNEL_TESTS=()
for f in tests/test_kernel_formats.py tests/test_kernel_matmul.py tests/test_kernel_quant.py; do
  [ -f "$f" ] && KERNEL_TESTS+=("$f")
done
HAVE_PYTEST=1
if ! "$PY" -c "import pytest" 2>/dev/null; then
  HAVE_PYTEST=0
  echo "pytest is not installed here: carry it as wheels (.whl + 'pip install --no-index --target'; see"
  echo "/work/.library/device/README.md, Notes) and run again. Skipping the tests."
  STATUS+=("tests: SKIPPED (no pytest)")
else
  stage tests_linear "$LIMIT_LINEAR" "${PYTEST[@]}" --junitxml="$OUTDIR/tests_linear.xml" tests/test_sparse_linear.py
fi

# --- benchmarks --------------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
  stage bench_kernels "$LIMIT_KERNELS" "$PY" evals/bench_kernels.py --quick --out "$OUTDIR"
  stage bench_e2e "$LIMIT_E2E" "$PY" evals/bench_e2e.py --quick --out "$OUTDIR"
else
  # 6 shapes x 6 M x 5 variants x 2 dtypes = 360 cases; with the kernels precompiled, autotuning
  # (3 + 12 ms per config, ~800 configs) and timing (2 + 8 ms, >= 8 runs per case) remain. The
  # budget stops new cases 20 s before the stage limit; results are written after every case.
  stage bench_kernels "$LIMIT_KERNELS" "$PY" evals/bench_kernels.py --out "$OUTDIR" \
    --warmup-ms 2 --rep-ms 8 --min-reps 8 --autotune-ms 3,12 --budget-s $((LIMIT_KERNELS - 20))
  stage bench_e2e "$LIMIT_E2E" "$PY" evals/bench_e2e.py --out "$OUTDIR" \
    --warmup-ms 5 --rep-ms 25 --budget-s $((LIMIT_E2E - 20))
fi

# --- quantized weights at decode -----------------------------------------------------------------
# The 2:4 and bitmap kernels on int8 (per channel) and int4 (g128) codes against dense fp16 and the
# same kernels on fp16 values, side by side in one run (dense and the float kernels are timed
# again here), at M = 1, 4, 16 where the weight bytes decide; appended to kernels.json/.csv
# (rows tagged "quant"), so OUTDIR keeps its 8 files. 3 shapes x 3 M x 7 variants = 63 cases.
QVARIANTS=dense,sparse24_triton,bitmap50_triton,sparse24_w8_triton,sparse24_w4g128_triton,bitmap50_w8_triton,bitmap50_w4g128_triton
if [ "$QUANT" = 1 ]; then
  if [ "$QUICK" = 1 ]; then
    stage precompile_quant "$LIMIT_PRECOMPILE_QUANT" "$PY" scripts/gpu_precompile.py --procs 2 \
      --formats q24w8,q24w4g128,qbmw8,qbmw4g128 --k-values 256 --m 1 --dtype fp16
    stage bench_quant "$LIMIT_QUANT" "$PY" evals/bench_kernels.py --out "$OUTDIR" --append --tag quant \
      --shapes 48x256,40x128 --m 1,5 --dtype fp16 --variants "$QVARIANTS"
  else
    stage precompile_quant "$LIMIT_PRECOMPILE_QUANT" "$PY" scripts/gpu_precompile.py \
      --formats q24w8,q24w4g128,qbmw8,qbmw4g128 --k-values 4096,11008 --m 1,4,16 --dtype fp16
    stage bench_quant "$LIMIT_QUANT" "$PY" evals/bench_kernels.py --out "$OUTDIR" --append --tag quant \
      --shapes 4096x4096,11008x4096,4096x11008 --m 1,4,16 --dtype fp16 --variants "$QVARIANTS" \
      --warmup-ms 2 --rep-ms 8 --min-reps 8 --autotune-ms 3,12 --budget-s $((LIMIT_QUANT - 10))
  fi
fi

if [ "$HAVE_PYTEST" = 1 ] && [ ${#KERNEL_TESTS[@]} -gt 0 ]; then
  stage tests_kernels "$LIMIT_TESTS" "${PYTEST[@]}" --junitxml="$OUTDIR/tests_kernels.xml" "${KERNEL_TESTS[@]}"
fi

PLOT_ARGS=()
[ -f "$OUTDIR/kernels.json" ] && PLOT_ARGS+=(--kernels "$OUTDIR/kernels.json")
[ -f "$OUTDIR/e2e.json" ] && PLOT_ARGS+=(--e2e "$OUTDIR/e2e.json")
if [ ${#PLOT_ARGS[@]} -gt 0 ]; then
  stage plot "$LIMIT_PLOT" "$PY" evals/plot_speed.py "${PLOT_ARGS[@]}" --out "$OUTDIR" --quiet
fi
rm -f "$OUTDIR"/*.tmp

echo
echo "=== gpu_check summary ($((SECONDS - T_ALL))s total, quick=$QUICK)"
for s in "${STATUS[@]}"; do echo "  $s"; done
for xml in "$OUTDIR"/tests_*.xml; do
  [ -f "$xml" ] || continue
  "$PY" - "$xml" <<'EOF' || true
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
name = sys.argv[1].rsplit("/", 1)[-1]
print(f"  {name}: {s.get('tests')} run, {s.get('failures')} failed, {s.get('errors')} errors, {s.get('skipped')} skipped")
EOF
done
timeout 30 "$PY" scripts/gpu_summary.py "$OUTDIR" || true
ls -la "$OUTDIR"
