#!/usr/bin/env bash
# The benchmark: hubcap against registry:2 (Debian's docker-registry 2.8 in
# proxy mode), side by side in one run on this machine; writes BENCHMARKS.md.
# Installs its tools first (as tests/run.sh does), builds in release, then runs
# the benchmark driver (tests/bench.rs) in full mode. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install-tools.sh
# Where pip put the PyPI tools' commands.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
HUBCAP_BENCH=full cargo test --release --locked --test bench -- --nocapture
# Cold layers per client (Docker's daemon, ctr, podman) through serve, the api
# Lambda and registry:2: its table goes into BENCHMARKS.md's cold section.
HUBCAP_BENCH=full cargo test --release --locked --test bench_cold -- --nocapture
# The herd simulation (SCALING.md): its table goes into BENCHMARKS.md's herd section.
HUBCAP_BENCH=full exec cargo test --release --locked --test herd -- --nocapture
