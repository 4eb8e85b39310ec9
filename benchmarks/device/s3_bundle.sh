#!/usr/bin/env bash
# Builds .devbundle/s3-312.tar.xz (~10 MB): moto's S3 server and s3fs with their dependencies, as
# cp312 manylinux wheels, for the GPU host (no registry there). moto is cut to the services its
# S3 backend imports and botocore to their models (a full moto[server] is ~300 MB); checked here
# with a bucket made, written, listed, read and deleted through s3fs. env.sh unpacks it to
# /tmp/site-s3 when present. Run from the project root.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip install -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --target "$work/site" "moto[server]" s3fs 2>&1 | grep -v "WARNING\|dependency conflicts\|requires\|root" || true
cd "$work/site"
# the host has torch (sympy, networkx); the rest serve services an S3 server never imports
rm -rf sympy* mpmath* networkx* cfnlint cfn_lint* graphql* docker* aws_xray_sdk* isympy.py bin \
  pydantic* annotated_types* regex* typing_extensions*
keep() { local dir=$1; shift; for d in "$dir"/*/; do n=$(basename "$d")
  [[ " $* " == *" $n "* ]] || rm -rf "$d"; done; }
S3_DEPS="s3 core moto_server moto_api utilities sts iam cloudwatch events s3bucket_path"
keep moto $S3_DEPS
keep botocore/data s3 sts iam cloudwatch events
find . -name __pycache__ -prune -exec rm -rf {} +
cd - > /dev/null
mkdir -p .devbundle
tar -C "$work/site" -cf - . | xz -T0 -9 > .devbundle/s3-312.tar.xz
ls -la .devbundle/s3-312.tar.xz
