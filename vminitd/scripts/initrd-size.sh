#!/bin/sh
# Measures the compressed size of a minimal guest initrd: vminitd as /init,
# crun and the shared libraries it links. A measurement aid only; the real
# initrd is built by resources/initrd-builder.
# Usage: initrd-size.sh path/to/vminitd [path/to/crun]
set -eu
VMINITD=${1:?path to the vminitd binary}
CRUN=${2:-/usr/bin/crun}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/usr/bin" "$STAGE/proc" "$STAGE/sys" "$STAGE/dev" "$STAGE/run" "$STAGE/tmp" "$STAGE/etc"
cp "$VMINITD" "$STAGE/init"
strip "$STAGE/init"
cp "$CRUN" "$STAGE/usr/bin/crun"
for lib in $(ldd "$CRUN" "$VMINITD" | awk '/=>/ {print $3} /^\s*\/lib64/ {print $1}' | sort -u); do
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
done
(cd "$STAGE" && find . | cpio -o -H newc --quiet) > "$STAGE.cpio"
gzip -9 -c "$STAGE.cpio" > "$STAGE.cpio.gz"
echo "uncompressed tree: $(du -sb "$STAGE" | cut -f1) bytes"
echo "vminitd (stripped): $(stat -c %s "$STAGE/init") bytes"
echo "initrd cpio.gz (-9): $(stat -c %s "$STAGE.cpio.gz") bytes"
rm -f "$STAGE.cpio" "$STAGE.cpio.gz"
