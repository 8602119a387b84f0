#!/usr/bin/env bash
# Wheels of the packages a GPU box without network access typically lacks (diffusers, webdataset and what they
# need that is not there, all pure Python, and simplejpeg, the wds loader's JPEG decoder: a small binary wheel), at
# the versions this machine's .venv tests with, saved to .whl/ (git-ignored): copy the checkout with .whl/ to the
# GPU box. benchmarks/run_gpu_suite.py installs them there with `pip install --no-index --target` before anything
# runs. About 7 MB. DALI's wheel (about 200 MB) is not among them: the dali loader is measured where it is installed.
#   benchmarks/fetch_gpu_wheels.sh            # GPU_PYTHON=3.12 by default (the GPU boxes' python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PACKAGES=(diffusers webdataset braceexpand omegaconf importlib_metadata lazy-importer simplejpeg)
pins=$("$PY" -c 'import sys; from importlib.metadata import version; print(*(f"{n}=={version(n)}" for n in sys.argv[1:]))' "${PACKAGES[@]}")
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls -l .whl
