#!/usr/bin/env bash
# Build the beacon kernel (vmlinux + bzImage) from Debian's linux-source-6.1
# with kernel-config/beacon.config merged onto `make tinyconfig`.
#
# The result is cached under $BEACON_KERNEL_CACHE (default ~/.cache/beaconbox/kernel)
# in a folder named by the hash of the fragment, this script and the source tarball,
# so a second run with nothing changed costs nothing.
#
# stdout: one line, the folder holding vmlinux, bzImage and config.
# Everything else goes to stderr (and to build.log in the cache folder).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/beacon.config"
source_tar="${BEACON_KERNEL_SOURCE:-/usr/src/linux-source-6.1.tar.xz}"
cache_root="${BEACON_KERNEL_CACHE:-${HOME:-/root}/.cache/beaconbox/kernel}"
jobs="${BEACON_KERNEL_JOBS:-$(nproc)}"

die() { echo "kernel-config/build.sh: $*" >&2; exit 1; }

[ -f "$fragment" ] || die "missing $fragment"
[ -f "$source_tar" ] || die "kernel source $source_tar not found: run resources/install.sh (it installs Debian's linux-source-6.1) or set BEACON_KERNEL_SOURCE"
for tool in make gcc flex bison bc tar xz; do
    command -v "$tool" >/dev/null || die "'$tool' is missing: run resources/install.sh"
done

# The tarball's identity is its name, size and mtime: hashing 130 MiB on every
# call would cost more than the lookup it guards.
tar_id="$(basename "$source_tar") $(stat -c '%s %Y' "$source_tar")"
key="$( { cat "$fragment" "${BASH_SOURCE[0]}"; echo "$tar_id"; } | sha256sum | cut -c1-16)"
out="$cache_root/$key"

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ] && [ -f "$out/config" ]; then
    echo "$out"
    exit 0
fi

work="$cache_root/$key.build"
rm -rf "$work"
mkdir -p "$work"
log="$work/build.log"
start=$(date +%s)
echo "building beacon kernel $key from $source_tar with $jobs jobs (log: $log)" >&2
{
    tar -C "$work" -xf "$source_tar"
    src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)"
    [ -n "$src" ] || { echo "no linux-source-* folder in $source_tar"; exit 1; }
    cd "$src"
    make tinyconfig
    KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$fragment"
    make olddefconfig
    make -j"$jobs" vmlinux bzImage
} >"$log" 2>&1 || { tail -n 40 "$log" >&2; die "kernel build failed; full log in $log"; }

src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)"
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$out.tmp/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$src/.config" "$out.tmp/config"
cp "$log" "$out.tmp/build.log"
echo "$(( $(date +%s) - start ))" >"$out.tmp/build-seconds"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "beacon kernel built in $(cat "$out/build-seconds") s: $out" >&2
echo "$out"
