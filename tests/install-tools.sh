#!/usr/bin/env bash
# Installs what the tests and the benchmark need on a fresh Debian machine;
# does nothing for tools already there. Used by tests/run.sh and bench/run.sh.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for tool in skopeo podman ctr containerd docker-registry dockerd wrk ab; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # ctr ships in the containerd package.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    skopeo podman containerd docker-registry docker.io wrk apache2-utils >/dev/null
fi

# PyPI tools, pinned: moto_server (S3, DynamoDB, DynamoDB Streams, Secrets
# Manager), cargo-lambda (the Lambda runtime and Function URL emulator, and
# the Lambda build with Zig), cfn-lint, the SAM CLI and checkov (template
# checks, build).
need_pip=0
for tool in moto_server cargo-lambda cfn-lint sam checkov python-zig; do
  command -v "$tool" >/dev/null 2>&1 || need_pip=1
done
if [ "$need_pip" = 1 ]; then
  echo "tests/run.sh: installing moto[server], cargo-lambda, ziglang, cfn-lint, aws-sam-cli, checkov"
  python3 -m pip install --quiet --disable-pip-version-check \
    'moto[server]==5.2.1' 'cargo-lambda==1.9.2' 'ziglang==0.17.1' 'cfn-lint==1.58.0' 'aws-sam-cli==1.170.0' \
    'checkov==3.2.459'
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
fi

