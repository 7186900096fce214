#!/usr/bin/env bash
# geoseg's GPU checks in one call on a lent GPU machine (the wheels from benchmarks/gpu_kit.sh
# carried in .whl/): the tests that need CUDA, then benchmarks/gpu.py and train.py on the GPU.
# Everything it prints and the results files go to $OUT (or ./gpu-check where that is unset).
#
#   bash benchmarks/gpu_check.sh [--size 8192]   # arguments go to benchmarks/gpu.py
#
# Within one device call of 10 minutes: the tests take about a minute, gpu.py at 8192 px and
# train.py a few (estimated: not yet run on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# the dask CLI for tests that start `dask worker` processes, from the wheels
export PATH=/tmp/site/bin:$PATH
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, rasterio, dask, distributed; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'rasterio', rasterio.__version__, 'GDAL',
rasterio.__gdal_version__, 'dask', dask.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# the CUDA tests: training under mixed precision, predict with two blocks at once against one
# at a time and against the CPU
# (only the files that hold them: no other test module's imports need to be there)
"$PY" -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py) 2>&1 \
  | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}
"$PY" benchmarks/gpu.py "$@" 2>&1 | tee "$OUT/gpu.txt"
bench=${PIPESTATUS[0]}
# training: the loop alone on the GPU, the draws alone, and geoseg train (next batch drawn ahead)
"$PY" benchmarks/train.py --device cuda --steps 128 2>&1 | tee "$OUT/train.txt"
train=${PIPESTATUS[0]}
cp benchmarks/results/gpu.json benchmarks/results/train.json "$OUT/" 2>/dev/null || true
echo "tests rc=$tests, gpu.py rc=$bench, train.py rc=$train" | tee -a "$OUT/gpu.txt"
[ "$tests" = 0 ] && [ "$bench" = 0 ] && [ "$train" = 0 ]
