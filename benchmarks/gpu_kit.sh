#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for geoseg's GPU checks (benchmarks/gpu_check.sh), fetched
# here into .whl/ (ignored by git) so that a session lent one spends its device time measuring.
#
#   bash benchmarks/gpu_kit.sh            # for the device's Python (3.12)
#   PYVER=3.11 bash benchmarks/gpu_kit.sh # for a rehearsal on this machine's Python
#
# The device's image has torch, numpy, scipy, pandas, opencv, click, PyYAML, jinja2, psutil,
# msgpack, cloudpickle, toolz, fsspec and the like; these are the rest, at the versions CI tests.
# pyogrio (33 MB) is left out: what travels to the device is capped at 64 MiB, and the checks
# read and write no vector files (geopandas imports it only to read or write them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PKGS=(
  rasterio==1.4.4 affine==3.0.1 click-plugins==1.1.1.2 cligj==0.7.2
  shapely==2.2.0 pyproj==3.7.2 geopandas==1.2.0
  dask==2026.8.0 distributed==2026.8.0 tornado==6.6.1 zict==3.0.0 tblib==3.2.2
  partd==1.4.2 locket==1.0.0
  albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
if [ "$PYVER" != 3.12 ]; then
  PKGS+=(importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0)  # dask asks for it before Python 3.12
fi
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PKGS[@]}"
du -sh .whl
echo "then: the device tool's run with carry [\".whl\"] and command 'bash benchmarks/gpu_check.sh'"
