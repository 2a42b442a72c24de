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
export CAPSEM_E2E=1
export CAPSEM_E2E_HOME="$ROOT/target/e2e-home"
# The README's first command, into the e2e home: builds everything and the guest image the e2e
# tests boot, and must end by printing 2 from inside a VM.
echo "==> scripts/setup.sh (the README's first command)"
last=$(CAPSEM_HOME="$CAPSEM_E2E_HOME" bash "$ROOT/scripts/setup.sh" | tail -n 1) \
    || die "scripts/setup.sh failed"
[ "$last" = "2" ] || die "scripts/setup.sh should end by printing 2, printed: $last"
echo "    printed $last from inside a VM"
CAPSEM_HOME="$CAPSEM_E2E_HOME" "$ROOT/target/release/capsem" stop >/dev/null || true
echo "==> cargo test"
cargo test --release --workspace --locked --no-fail-fast -- --test-threads=2
