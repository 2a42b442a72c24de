# Shared by the setup and test scripts: install what capsem needs on Debian/Ubuntu and build it.
# Fails loudly: any missing piece stops the script with a message saying what is missing.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MUSL_TARGET=x86_64-unknown-linux-musl
APT_PACKAGES=(qemu-system-x86 qemu-utils mmdebstrap squashfs-tools e2fsprogs kmod cpio tmux curl ca-certificates)

die() { echo "error: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing_packages() {
    local p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

install_prereqs() {
    local missing updated=0 round
    # Two rounds: installing QEMU can remove a newer qemu-utils that conflicts with it (seen with
    # a backported qemu-utils); the second round puts back the matching one.
    for round in 1 2; do
        mapfile -t missing < <(missing_packages)
        [ ${#missing[@]} -eq 0 ] && break
        echo "==> installing apt packages: ${missing[*]}"
        if [ $updated -eq 0 ]; then
            as_root apt-get update -qq || die "apt-get update failed"
            updated=1
        fi
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    done
    mapfile -t missing < <(missing_packages)
    [ ${#missing[@]} -eq 0 ] || die "apt packages still missing: ${missing[*]}"
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
    if ! rustup target list --installed 2>/dev/null | grep -qx "$MUSL_TARGET"; then
        echo "==> adding the $MUSL_TARGET Rust target"
        rustup target add "$MUSL_TARGET" || die "rustup target add $MUSL_TARGET failed"
    fi
    for tool in qemu-system-x86_64 qemu-img mmdebstrap mksquashfs mkfs.ext4 depmod; do
        command -v "$tool" >/dev/null || die "$tool still missing after installing packages"
    done
}

build_all() {
    echo "==> building capsem (release)"
    (cd "$ROOT" && cargo build --release --workspace --locked) || die "cargo build failed"
    echo "==> building the guest agent ($MUSL_TARGET)"
    (cd "$ROOT" && cargo build --release --locked -p capsem-agent --target "$MUSL_TARGET") \
        || die "building capsem-agent for $MUSL_TARGET failed"
}
