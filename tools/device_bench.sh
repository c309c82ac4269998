#!/usr/bin/env bash
# GPU benchmark on a lent device machine: run from the repo root as `bash tools/device_bench.sh`.
# Installs the carried wheels (.whl/: transformers 4.57.6 and the huggingface_hub and tokenizers
# it accepts) into /tmp/site, which PYTHONPATH puts before the image's site-packages, prints the
# versions, then runs tools/bench.py --device cuda (at most 330 s). Writes to $OUT:
# BENCHMARKS-gpu.md (rewritten after every stage), bench.log, setup.log.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
start=$(date +%s)
{
  echo "== $(date -u) in $PWD, OUT=$OUT"
  ls -l .whl/ 2>&1
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    echo "pip install rc=$?"
  else
    echo "no pip for python3: unpacking the wheels into /tmp/site instead"
    mkdir -p /tmp/site
    for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site/ && echo "unpacked $w"; done
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1
} 2>&1 | tee "$OUT/setup.log"
export PYTHONPATH="/tmp/site:$PWD"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/setup.log"
import sys
import jax, jaxlib, torch, transformers, tokenizers, huggingface_hub
print("python", sys.version.split()[0])
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "devices", jax.devices())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__, transformers.__file__)
print("tokenizers", tokenizers.__version__, "huggingface_hub", huggingface_hub.__version__)
EOF
found=$(python3 -c "import transformers; print(transformers.__version__)" 2>/dev/null)
if [ "$found" != "4.57.6" ]; then
  echo "transformers is '$found', not 4.57.6 (the wheels in .whl/ did not install): not running the benchmark" \
    | tee -a "$OUT/setup.log"
  exit 3
fi
echo "== setup took $(( $(date +%s) - start )) s; running tools/bench.py --device cuda" | tee -a "$OUT/setup.log"
PYTHONUNBUFFERED=1 timeout 330 python3 tools/bench.py --device cuda --out "$OUT/BENCHMARKS-gpu.md" 2>&1 \
  | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
echo "== bench exit status $rc (124: cut off at 330 s; 1: a stage failed, see the report); total $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/bench.log"
exit "$rc"
