#!/usr/bin/env bash
# Install what capsem needs, build it, build the guest image, and run a first command in a VM.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
install_prereqs
build_all
"$ROOT/target/release/capsem" setup --non-interactive
"$ROOT/target/release/capsem" run "python3 -c 'print(1+1)'"
