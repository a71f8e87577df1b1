#!/usr/bin/env bash
# The end-to-end GPU check on a lent GPU machine, in one device call (docs/results.md, "The end-to-end
# GPU check"): installs the wheels that bench/gpu_wheels.py put in .gpu-wheels/ (carried with the
# call) into /tmp/ekd-site unless the image already imports them, then runs bench/gpu_e2e.py on the
# GPU and leaves its JSON, its output and the commands' logs in $OUT (else in /tmp/ekd-gpu-e2e-out/).
#
#   bash bench/gpu_e2e.sh [gpu_e2e.py options, e.g. --budget-s 300]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ekd-gpu-e2e-out}
SITE=${EKD_GPU_SITE:-/tmp/ekd-site}
mkdir -p "$OUT"
t0=$(date +%s.%N)
if ! python3 -c "import ray, mlflow, faiss, sqlalchemy, alembic, pydantic" 2>/dev/null; then
  ls .gpu-wheels/*.whl >/dev/null 2>&1 || { echo "gpu_e2e.sh: no .gpu-wheels/*.whl (build them: python bench/gpu_wheels.py; carry .gpu-wheels)"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu-wheels/*.whl \
    || { echo "gpu_e2e.sh: pip install of .gpu-wheels failed"; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
install_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
echo "gpu_e2e.sh: wheels ready in ${install_s}s; python3 $(python3 -c 'import sys; print(sys.version.split()[0])'), PYTHONPATH=$PYTHONPATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 bench/gpu_e2e.py --device cuda --json "$OUT/gpu_e2e.json" --logs "$OUT/gpu_e2e_logs.tar.gz" \
  --install-s "$install_s" "$@" 2>&1 | tee "$OUT/gpu_e2e.log"
