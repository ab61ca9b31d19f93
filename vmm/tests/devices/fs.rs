//! virtio-fs: our vhost-user frontend and QEMU's vhost-user-fs-device, the same
//! virtiofsd behind both.
//!
//! `fs` ([`shares`]): three shares in one boot. `rw` and `ro` are started by
//! beacon-vmm (`--fs tag=..,dir=..`), `ext` is a virtiofsd the host started
//! itself (`--fs tag=ext,socket=..`). The guest checks a tree the host made
//! against its checksums on `rw` and `ro`, writes on `rw` (the host checks the
//! bytes after the boot), sees `ro` refuse writes, reads `ext`. After the boot
//! no virtiofsd is left and the host's own virtiofsd ended with its frontend.
//!
//! `fs-refused` ([`refusals`], no guest): a missing and a dead vhost-user
//! socket are refused before boot, naming it.
//!
//! `fs-kill` ([`kill`]): the host kills the virtiofsd of one share (`victim`)
//! while the guest runs, and tells the guest through a second share (`ctl`).
//! beacon-vmm reports the death; our frontend notices the hang-up, logs it and
//! shows DEVICE_NEEDS_RESET in the device status the guest reads; the other
//! share keeps working, and the guest ends without syncing (the dead share
//! would make Linux wait forever): the VM still stops cleanly. It must be the
//! last part of its boot.

use std::path::Path;

use beacon_tests::assets::beacon_kernel_dir;
use beacon_tests::device_suite::Scenario;
use beacon_tests::script::sh_quote;

use crate::VMM;

const VIRTIOFSD: &str = "/usr/local/bin/virtiofsd";

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

pub fn modules() -> Vec<&'static str> {
    assert!(
        Path::new(VIRTIOFSD).exists(),
        "{VIRTIOFSD} missing: run resources/install.sh"
    );
    vec!["virtio_mmio", "virtiofs"]
}

/// A missing and a dead vhost-user socket are errors naming the socket
/// before anything boots, on the case's backend.
const REFUSALS: &str = r#"
dead="$WORK/dead.sock"
# A socket file whose listener is gone, as a dead virtiofsd leaves it.
perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Local => $ARGV[0], Listen => 1) or die' "$dead"
for sock in "$WORK/missing.sock" "$dead"; do
    out=$(timeout 120 "$VMM" run --backend "$BACKEND" --kernel "$KERNEL" --memory 128 \
        --console off --fs "tag=x,socket=$sock" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "$out" | grep -q "$sock"; then
        echo "HOST-REFUSED-BAD-SOCKET $(basename "$sock") on $BACKEND"
    else
        echo "HOST-BAD-SOCKET-NOT-REFUSED ($rc): $out"
    fi
done
"#;

/// The refusal part (host shell only) for `backend`.
pub fn refusals(backend: &'static str) -> Scenario {
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    Scenario {
        name: "fs-refused",
        backends: vec![backend],
        host_before: format!(
            "VMM={}\nKERNEL={}\n{REFUSALS}",
            sh_quote(VMM),
            sh_quote(&kernel.display().to_string())
        ),
        expect: strings(&[
            "HOST-REFUSED-BAD-SOCKET missing.sock",
            "HOST-REFUSED-BAD-SOCKET dead.sock",
        ]),
        ..Scenario::default()
    }
}

/// Host side of the shares: a tree with its checksums (in a subshell, so a
/// failure fails the part, not the case's shell), and a host-run virtiofsd.
const SHARES_BEFORE: &str = r#"
(
set -e
mkdir -p "$WORK/rw/tree/a/b/c" "$WORK/ro" "$WORK/ext"
t="$WORK/rw/tree"
dd if=/dev/urandom of="$t/a/one" bs=1k count=300 2>/dev/null
dd if=/dev/urandom of="$t/a/b/two" bs=64k count=8 2>/dev/null
dd if=/dev/urandom of="$t/a/b/c/three" bs=1 count=4097 2>/dev/null
: >"$t/empty"
seq 1 5000 >"$t/a/b/c/numbers"
(cd "$t" && find . -type f | sort | xargs sha256sum) >"$WORK/rw/SUMS"
cp -a "$t" "$WORK/ro/tree"
cp "$WORK/rw/SUMS" "$WORK/ro/SUMS"
echo "hello from a host-run virtiofsd" >"$WORK/ext/hello"
)
# Its output must not hold the lab's console pipe open (the lab waits for it).
/usr/local/bin/virtiofsd --socket-path "$WORK/ext.sock" --shared-dir "$WORK/ext" \
    --sandbox none --cache auto >/dev/null 2>"$WORK/ext.log" &
EXT_PID=$!
i=0; while [ ! -S "$WORK/ext.sock" ]; do
    i=$((i + 1)); [ $i -lt 500 ] || { cat "$WORK/ext.log"; break; }; sleep 0.02
done
"#;

const SHARES_CHECKS: &str = r#"
set -e
mkdir -p /mnt/rw /mnt/ro /mnt/ext
mount -t virtiofs rw /mnt/rw
mount -t virtiofs ro /mnt/ro
mount -t virtiofs ext /mnt/ext
grep virtiofs /proc/mounts
(cd /mnt/rw/tree && sha256sum -c /mnt/rw/SUMS >/dev/null) && echo FS-RW-SUMS-OK
(cd /mnt/ro/tree && sha256sum -c /mnt/ro/SUMS >/dev/null) && echo FS-RO-SUMS-OK
[ "$(find /mnt/rw/tree -type f | wc -l)" -eq 5 ]
# Writes on the read-write share: new files, a rename, a removal.
mkdir /mnt/rw/from-guest
seq 1 20000 >/mnt/rw/from-guest/numbers
dd if=/dev/urandom of=/mnt/rw/from-guest/blob.tmp bs=64k count=4 2>/dev/null
mv /mnt/rw/from-guest/blob.tmp /mnt/rw/from-guest/blob
sha256sum /mnt/rw/from-guest/blob | cut -d' ' -f1 >/mnt/rw/from-guest/blob.sha
rm /mnt/rw/tree/empty
sync
echo FS-RW-WROTE
# The read-only share refuses every kind of write.
for w in "touch /mnt/ro/new" "rm /mnt/ro/tree/empty" "mkdir /mnt/ro/d" "sh -c 'echo x >>/mnt/ro/tree/a/one'"; do
    if eval "$w" 2>/dev/null; then echo "FS-RO-ALLOWED: $w"; exit 1; fi
done
echo FS-RO-REFUSED
[ "$(cat /mnt/ext/hello)" = "hello from a host-run virtiofsd" ] && echo FS-EXT-OK
umount /mnt/rw /mnt/ro /mnt/ext
echo FS-UNMOUNTED
"#;

const SHARES_AFTER: &str = r#"
# The host's own virtiofsd ends when its frontend (the VM) goes away; it is
# killed here in any case, so a failed boot cannot leave it behind.
ext_ended=no
for i in $(seq 50); do
    kill -0 $EXT_PID 2>/dev/null || { ext_ended=yes; break; }
    sleep 0.1
done
kill -9 $EXT_PID 2>/dev/null
wait $EXT_PID
(
set -e
f="$WORK/rw/from-guest"
[ "$(sha256sum <"$f/numbers")" = "$(seq 1 20000 | sha256sum)" ]
[ "$(sha256sum "$f/blob" | cut -d' ' -f1)" = "$(cat "$f/blob.sha")" ]
[ "$(stat -c %s "$f/blob")" -eq 262144 ]
[ ! -e "$WORK/rw/tree/empty" ] && [ -e "$WORK/ro/tree/empty" ]
[ ! -e "$WORK/ro/new" ] && [ ! -e "$WORK/ro/d" ]
cmp -s "$WORK/rw/tree/a/one" "$WORK/ro/tree/a/one"
echo HOST-SAW-GUEST-WRITES
[ $ext_ended = yes ] && echo HOST-EXT-VIRTIOFSD-ENDED
# Nothing beacon-vmm started is left (one pgrep: a fork per process costs
# tens of seconds in the emulated lab).
if left=$(pgrep -af -- "--shared-dir $WORK/r"); then
    echo "LEFTOVER: $left"; exit 1
fi
echo HOST-NO-LEFTOVER
)
"#;

/// The shares part of a device boot.
pub fn shares() -> Scenario {
    Scenario {
        name: "fs",
        vmm_args: strings(&[
            "--fs",
            "tag=rw,dir={WORK}/rw",
            "--fs",
            "tag=ro,dir={WORK}/ro,ro",
            "--fs",
            "tag=ext,socket={WORK}/ext.sock",
        ]),
        host_before: SHARES_BEFORE.into(),
        checks: SHARES_CHECKS.into(),
        host_after: SHARES_AFTER.into(),
        stock_modules: modules(),
        expect: strings(&[
            "FS-RW-SUMS-OK",
            "FS-RO-SUMS-OK",
            "FS-RW-WROTE",
            "FS-RO-REFUSED",
            "FS-EXT-OK",
            "FS-UNMOUNTED",
            "HOST-SAW-GUEST-WRITES",
            "HOST-EXT-VIRTIOFSD-ENDED",
            "HOST-NO-LEFTOVER",
        ]),
        ..Scenario::default()
    }
}

/// Host side of `kill`: kill the victim's virtiofsd once the guest is using it.
const KILL_BEFORE: &str = r#"
mkdir -p "$WORK/victim" "$WORK/ctl"
echo "$BACKEND" >"$WORK/ctl/backend"
(
    i=0
    while [ ! -e "$WORK/victim/ready" ]; do
        # Up to 25 min: it is the boot's last part; a failed boot stops it sooner.
        i=$((i + 1)); [ $i -lt 3000 ] || exit 1; sleep 0.5
    done
    # Lowest pid first: virtiofsd itself before its sandbox child. (A glob
    # sorts /proc/1000 before /proc/999; the child killed first makes the
    # parent exit 247 on its own before its own SIGKILL lands.)
    for p in $(pgrep -f -- "--shared-dir $WORK/victim " | sort -n); do
        kill -9 "$p" && echo "HOST-KILLED-VIRTIOFSD $p"
    done
    touch "$WORK/ctl/killed"
) 2>/dev/null &
KILLER=$!
"#;

const KILL_CHECKS: &str = r#"
set -e
mkdir -p /mnt/v /mnt/c
mount -t virtiofs victim /mnt/v
mount -t virtiofs ctl /mnt/c
backend=$(cat /mnt/c/backend)
# From here on the guest must not sync at its end: the victim's backend dies.
touch /tmp/beacon-no-sync
echo ready >/mnt/v/ready
i=0
while [ ! -e /mnt/c/killed ]; do
    i=$((i + 1)); [ $i -lt 600 ] || { echo FS-NEVER-KILLED; exit 1; }; sleep 0.2
done
echo FS-HOST-KILLED-IT
if [ "$backend" = kvm ]; then
    # Our frontend reports the dead backend in the device status.
    i=0
    while :; do
        for d in /sys/bus/virtio/devices/virtio*; do
            [ "$(cat "$d/device")" = 0x001a ] || continue
            s=$(cat "$d/status")
            [ $((s & 0x40)) -ne 0 ] && echo "FS-NEEDS-RESET-SEEN: $s" && break 2
        done
        i=$((i + 1)); [ $i -lt 300 ] || { echo FS-NO-NEEDS-RESET; exit 1; }; sleep 0.1
    done
fi
[ "$(cat /mnt/c/backend)" = "$backend" ] && echo FS-OTHER-SHARE-STILL-WORKS
umount /mnt/c
# Linux waits forever for a dead virtiofs backend (sync, umount: virtiofs has
# no forced unmount and no fusectl abort), so the guest never touches the dead
# share again and its init ends it without syncing.
"#;

const KILL_AFTER: &str = r#"
# Done unless the boot failed before the guest was ready.
kill $KILLER 2>/dev/null
wait $KILLER
if left=$(pgrep -af -- "--shared-dir $WORK/"); then
    echo "LEFTOVER: $left"; false
else
    echo HOST-NO-LEFTOVER
fi
"#;

/// The kill part of a device boot on `backend` (the boot's last part).
pub fn kill(backend: &'static str) -> Scenario {
    let mut expect = strings(&[
        "HOST-KILLED-VIRTIOFSD",
        "FS-HOST-KILLED-IT",
        // beacon-vmm reports the death of the virtiofsd it started.
        "virtiofsd for share \"victim\"",
        "died: signal 9",
        "FS-OTHER-SHARE-STILL-WORKS",
        "HOST-NO-LEFTOVER",
    ]);
    if backend == "kvm" {
        expect.extend(strings(&[
            "FS-NEEDS-RESET-SEEN",
            "the vhost-user backend hung up",
        ]));
    }
    Scenario {
        name: "fs-kill",
        backends: vec![backend],
        vmm_args: strings(&[
            "--fs",
            "tag=victim,dir={WORK}/victim",
            "--fs",
            "tag=ctl,dir={WORK}/ctl",
        ]),
        host_before: KILL_BEFORE.into(),
        checks: KILL_CHECKS.into(),
        host_after: KILL_AFTER.into(),
        stock_modules: modules(),
        expect,
        ..Scenario::default()
    }
}
