#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for building, testing and running beaconbox.
# Idempotent: installs only what is missing, so a rerun costs a few dpkg queries.
#
#   resources/install.sh            # Debian packages + virtiofsd
#   VIRTIOFSD_ROOT=/opt/x resources/install.sh   # install virtiofsd elsewhere
set -euo pipefail

die() { echo "resources/install.sh: $*" >&2; exit 1; }

packages=(
    # build: Rust crates with C parts, the beacon kernel
    build-essential pkg-config flex bison bc libelf-dev libssl-dev xz-utils zstd cpio kmod file
    # VMs: QEMU (backend for parity, and the nested KVM lab), Debian kernel source
    qemu-system-x86 linux-source-6.1
    # guest userland packed into the initrd
    busybox-static crun
    # host side: containerd, networking, images
    containerd nftables iproute2 util-linux containernetworking-plugins erofs-utils iperf3
    # tests: another host user (setpriv) probing the VM sockets with Debian's python3;
    # ACPICA's iasl disassembles and recompiles the DSDT (vmm/tests/acpi_iasl.rs)
    python3 acpica-tools
    # make bench with BEACON_FIRECRACKER: unpacking a stock bzImage (Debian's is
    # LZ4) to the ELF vmlinux Firecracker boots
    lz4
    # virtiofsd build dependencies
    libseccomp-dev libcap-ng-dev
    # vminitd / shim ttrpc code generation
    protobuf-compiler
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root (or sudo) to install: ${missing[*]}"
        sudo=sudo
    fi
    echo "install.sh: installing ${missing[*]}" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain (rustup) first"

# virtiofsd 1.x from crates.io (Debian 12's package is older); about a minute to build.
root="${VIRTIOFSD_ROOT:-/usr/local}"
if ! [ -x "$root/bin/virtiofsd" ]; then
    echo "install.sh: building virtiofsd into $root" >&2
    cargo install --quiet --locked --root "$root" virtiofsd
fi
echo "install.sh: ready" >&2
