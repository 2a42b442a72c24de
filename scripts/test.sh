#!/usr/bin/env bash
# The whole test suite: lints, unit tests, and end-to-end tests that boot real VMs.
# The e2e tests use the guest image built here (in target/e2e-home) and fail if it is missing.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
install_prereqs
cd "$ROOT"
echo "==> cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run cargo fmt --all"
echo "==> cargo clippy"
cargo clippy --release --workspace --all-targets --locked -- -D warnings || die "clippy found problems"
build_all
export CAPSEM_E2E=1
export CAPSEM_E2E_HOME="$ROOT/target/e2e-home"
echo "==> building the guest image for the e2e tests"
CAPSEM_HOME="$CAPSEM_E2E_HOME" "$ROOT/target/release/capsem" setup --non-interactive \
    || die "building the guest image failed"
echo "==> cargo test"
cargo test --release --workspace --locked -- --test-threads=2
