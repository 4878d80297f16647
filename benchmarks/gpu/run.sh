#!/usr/bin/env bash
# The one-shot GPU check (issue 15; benchmarks/gpu/README.md). On a GPU machine with no network:
#
#     bash benchmarks/gpu/run.sh [--out DIR]     # DIR: $OUT, else benchmarks/gpu/out
#     bash benchmarks/gpu/run.sh --cpu           # the same steps on the CPU, tiny model (the test)
#
# 1. installs runnel, the CTranslate2 plugin and the trio load client where they are missing,
#    offline, from benchmarks/gpu/wheels (`make gpu-wheels` fills it);
# 2. GPU only: where the CUDA 12 cuBLAS CTranslate2 needs does not load, points libcublas.so.12
#    and libcublasLt.so.12 at the machine's CUDA 13 libraries (symlinks in a temporary folder
#    on LD_LIBRARY_PATH, which the server it starts inherits);
# 3. runs check.py, which checks that, measures, and writes gpu.md, gpu.json and nvidia-smi.txt.
# Exit status: 0 done, 3 stopped because CTranslate2 cannot use this machine's cuBLAS.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/gpu/wheels
cpu=0
out=${OUT:-benchmarks/gpu/out}
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=1 ;;
    --out) out=$2; shift ;;
  esac
  shift
done
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1
echo "==> $(date -u +%FT%TZ) $($PY --version) at $(command -v "$PY")"

# -- 1. what is missing, from the carried wheels -------------------------------------------
installed() {
  "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as metadata
import ctranslate2, trio, runnel, runnel_ctranslate2  # noqa: F401
assert "ctranslate2" in {entry.name for entry in metadata.entry_points(group="runnel")}
EOF
}
if installed; then
  echo "==> runnel, runnel-ctranslate2 and trio are installed"
else
  [ -d "$WHEELS" ] || { echo "==> $WHEELS is missing: run 'make gpu-wheels' where pip can download"; exit 1; }
  echo "==> installing runnel, runnel-ctranslate2 and what they lack from $WHEELS (offline)"
  start=$(date +%s)
  pip=("$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --disable-pip-version-check)
  "${pip[@]}" "setuptools>=68" wheel                     # the build below runs without isolation
  "${pip[@]}" --no-build-isolation . ./plugins/runnel-ctranslate2 "trio>=0.25"
  installed || { echo "==> the install did not give runnel with its ctranslate2 plugin"; exit 1; }
  echo "==> installed in $(( $(date +%s) - start )) s"
fi

# -- 2. the CUDA 12 cuBLAS, or CUDA 13's under its name --------------------------------------
cublas12_loads() {
  "$PY" -c 'import sys; from runnel_ctranslate2.cuda import cublas_status; s = cublas_status()
print("   ", s.problem or "loaded: " + ", ".join(s.loaded)); sys.exit(not s.ok)'
}
find_cuda13() {  # $1: a library name; prints its path: the Python packages first, then the loader's cache
  local name=$1 dir found
  for dir in $("$PY" -c 'import site, sys; print("\n".join(site.getsitepackages() + sys.path))'); do
    [ -d "$dir/nvidia" ] || continue
    found=$(find "$dir/nvidia" -name "$name" 2>/dev/null | head -1)
    [ -n "$found" ] && { echo "$found"; return; }
  done
  ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n {print $NF; exit}'
}
if [ $cpu = 0 ]; then
  echo "==> CUDA 12 cuBLAS:"
  if ! cublas12_loads; then
    cublas=$(find_cuda13 libcublas.so.13); cublaslt=$(find_cuda13 libcublasLt.so.13)
    if [ -z "$cublas" ] || [ -z "$cublaslt" ]; then
      export RUNNEL_GPU_CUBLAS="no CUDA 12 cuBLAS, and no CUDA 13 libcublas.so.13/libcublasLt.so.13 found"
    else
      links=$(mktemp -d)
      ln -s "$cublas" "$links/libcublas.so.12"
      ln -s "$cublaslt" "$links/libcublasLt.so.12"
      export LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      export RUNNEL_GPU_CUBLAS="CUDA 13's $cublas behind libcublas.so.12 (symlinks on LD_LIBRARY_PATH)"
      echo "==> trying $RUNNEL_GPU_CUBLAS"
      cublas12_loads || true
    fi
  fi
fi

# -- 3. the check ------------------------------------------------------------------------------
status=0
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu/check.py --out "$out" "${args[@]}" || status=$?
echo "==> $(date -u +%FT%TZ) done, exit status $status; $out: $(ls "$out" | tr '\n' ' ')"
exit $status
