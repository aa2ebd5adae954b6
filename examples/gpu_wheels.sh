#!/usr/bin/env bash
# Download, on a machine with the package index, the Python 3.12 x86-64 wheels that a bare GPU machine
# (torch, triton, transformers, huggingface_hub, numpy, scipy, pillow, imageio, pyyaml, tqdm installed)
# lacks for examples/gpu_session.py: diffusers and its small needs, accelerate (loads weights without a
# random initialisation first), the mesh exporters, open_clip (its CLIP vocabulary file; the bench's
# evaluator), pytest and gsplat (DreamGaussian's splatting; its kernels build on the GPU machine, which has
# nvcc and ninja) with its small needs. Versions are the ones the test suite runs with. Not included: imageio-ffmpeg
# (~68 MB, the video encoder: the video test skips without it) and nerfacc (the session measures the
# PyTorch renderer; nerfacc JIT-builds CUDA code).
#
#     bash examples/gpu_wheels.sh [DIR]        # default DIR: .whl (add /.whl/ to .git/info/exclude)
#
# On the GPU machine (examples/gpu_session.py does this itself):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
DIR="${1:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 filelock==4.3.1
  accelerate==1.15.0 psutil==7.2.2
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  trimesh==5.2.0 PyMCubes==0.1.6 fast_simplification==0.2.0
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 Pygments==2.21.0 packaging==26.4
  gsplat==1.5.3 jaxtyping==0.3.11 wadler_lindig==0.1.8 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
ls -la "$DIR"
du -sh "$DIR"
