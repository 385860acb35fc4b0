#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs the real
# peers the end-to-end tests drive (skopeo, podman, containerd's ctr, and
# Debian's docker-registry as an upstream; moto_server for S3 + DynamoDB;
# cargo-lambda for the Lambda emulator), then builds and runs every test.
# Everything the tests start listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for tool in skopeo podman ctr containerd docker-registry; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # ctr ships in the containerd package.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    skopeo podman containerd docker-registry >/dev/null
fi

# PyPI tools, pinned: moto_server (S3, DynamoDB, DynamoDB Streams) and
# cargo-lambda (the Lambda runtime and Function URL emulator).
if ! command -v moto_server >/dev/null 2>&1 || ! command -v cargo-lambda >/dev/null 2>&1; then
  echo "tests/run.sh: installing moto[server] and cargo-lambda"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1' 'cargo-lambda==1.9.2'
  hash -r
fi

if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --locked --no-fail-fast "$@"
else
  exec cargo test --locked --no-fail-fast "$@"
fi
