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
# `capsem setup` ends by saving the default size's warm-start template; the e2e tests (and
# every user's first `capsem run`) start from it.
CAPSEM_HOME="$CAPSEM_E2E_HOME" "$ROOT/target/release/capsem" status | grep -q "^  warm .*restored" || {
    tail -n 40 "$CAPSEM_E2E_HOME/run/warm.log" "$CAPSEM_E2E_HOME"/assets/v*/warm/discarded.log 2>/dev/null
    die "capsem setup left no warm-start template (its build log and any discards are above)"
}
echo "    the default warm-start template is ready"
CAPSEM_HOME="$CAPSEM_E2E_HOME" "$ROOT/target/release/capsem" stop >/dev/null || true
echo "==> cargo test"
cargo test --release --workspace --locked --no-fail-fast -- --test-threads=2
