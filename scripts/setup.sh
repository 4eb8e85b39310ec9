#!/usr/bin/env bash
# Installs vllm_compile_ray and its test tools on a fresh machine. On a CPU-only machine torch is
# pinned to the local CPU build first: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# A fresh `python3 -m venv` here has pip 23.2, whose resolver gives up (ResolutionImpossible) on
# boto3 against s3fs's aiobotocore pin; pip >= 24 resolves it.
if ! python -c "import sys, pip; sys.exit(int(pip.__version__.split('.')[0]) < 24)"; then
  $PIP "pip>=24"
fi
if ! python -c "import torch" 2>/dev/null; then
  $PIP "torch==2.13.0"
fi
$PIP -e ".[test]"
# Headless Chromium for the dashboard screenshot (tests/test_dashboard.py); CI runs as root.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    echo "setup.sh: chromium is missing and this is not root: the dashboard screenshot test will skip" >&2
  fi
fi
