#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine: installs the real
# peers the end-to-end tests drive (skopeo, podman, containerd's ctr, and
# Debian's docker-registry as an upstream; moto_server for S3 + DynamoDB;
# cargo-lambda for the Lambda emulator), then builds and runs every test.
# Everything the tests start listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install-tools.sh
# Where pip put the PyPI tools' commands.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

# The SAM build of the three Lambdas (cargo lambda, release). The template's
# default is arm64; where the aarch64 Rust target is not installed (this
# project's CI machines cannot download it) build x86_64 instead.
export SAM_CLI_TELEMETRY=0
arch=arm64
rustup target list --installed 2>/dev/null | grep -q '^aarch64-unknown-linux-gnu$' || arch=x86_64
if [ "${HUBCAP_SKIP_SAM_BUILD:-0}" != 1 ]; then
  echo "tests/run.sh: sam build (Architecture=$arch)"
  mkdir -p target
  sam build --beta-features --parameter-overrides "Architecture=$arch" >target/sam-build.log 2>&1 \
    || { tail -50 target/sam-build.log; echo "sam build failed"; exit 1; }
  echo "tests/run.sh: sam build succeeded: $(ls .aws-sam/build | tr '\n' ' ')"
fi

# nextest, never plain `cargo test`: it runs each test in a process of its
# own (the index clock's test offset, `storage::clock::advance`, belongs to
# the process, so under `cargo test` one test's advance would move time
# under its neighbours), and it runs the heavy tests one at a time
# (.config/nextest.toml).
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "tests/run.sh: installing cargo-nextest (crates.io)"
  mkdir -p target
  cargo install --locked cargo-nextest >target/nextest-install.log 2>&1 \
    || { tail -30 target/nextest-install.log; echo "tests/run.sh: cargo-nextest is needed (cargo install --locked cargo-nextest) and could not be installed"; exit 1; }
fi
exec cargo nextest run --locked --no-fail-fast "$@"
