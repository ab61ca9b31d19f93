//! virtio-blk: one boot carries three disks, told apart in the guest by size:
//!
//! - an EROFS image made with `mkfs.erofs` from a known tree, mounted
//!   read-only; every file's checksum is compared with the host's, and the
//!   file list must match exactly;
//! - a read-write raw disk the guest writes (with `fsync`, so FLUSH is sent),
//!   reads back after dropping its caches, and the host verifies after the boot
//!   (the written range, the last sector, and the untouched rest);
//! - a read-only raw disk whose known contents the guest reads and to which
//!   writes fail in the guest; the host checks it is unchanged.
//!
//! [`unusable_images_are_refused_before_boot`] (no VM) checks that a missing or
//! unusable image is refused before boot on both backends.

use std::path::{Path, PathBuf};
use std::process::Command;

use beacon_tests::assets::beacon_kernel_dir;
use beacon_tests::device_suite::Scenario;
use beacon_tests::script::sh_quote;

use crate::VMM;

/// Sizes (in 512-byte sectors) the guest tells the raw disks apart by.
const RW_SECTORS: u64 = 16384;
const RO_SECTORS: u64 = 12288;
/// Bytes of the pattern written to the read-write disk and held by the read-only one.
const PATTERN_LEN: usize = 1 << 20;

/// Deterministic, incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The tree the EROFS image is made from.
fn make_tree(root: &Path) {
    let write = |rel: &str, bytes: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write tree file");
    };
    write("hello.txt", b"hello from the host\n");
    write("dir/sub/data.bin", &noise(3 << 20, 7));
    write("dir/odd.bin", &noise(12_345, 11));
    write("dir/empty", b"");
    for i in 0..50 {
        write(&format!("many/f{i:02}"), format!("file {i}\n").as_bytes());
    }
    std::os::unix::fs::symlink("hello.txt", root.join("link")).expect("symlink");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; run resources/install.sh"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Guest checks (the same for every boot).
fn guest_checks() -> String {
    format!(
        r#"
set -e
disk_of_size() {{
    for d in /sys/block/vd*; do
        if [ "$(cat "$d/size")" = "$1" ]; then basename "$d"; return 0; fi
    done
    echo "no disk of $1 sectors" >&2; return 1
}}
RW=$(disk_of_size {RW_SECTORS})
RO=$(disk_of_size {RO_SECTORS})
EROFS=""
for d in /sys/block/vd*; do
    n=$(basename "$d")
    [ "$n" = "$RW" ] || [ "$n" = "$RO" ] || EROFS=$n
done
[ -n "$EROFS" ]
echo "BLK-DISKS: erofs=$EROFS rw=$RW ro=$RO"
echo "BLK-RO-FLAGS: erofs=$(cat /sys/block/$EROFS/ro) rw=$(cat /sys/block/$RW/ro) ro=$(cat /sys/block/$RO/ro)"
echo "BLK-SERIAL: $(cat /sys/block/$RW/serial 2>/dev/null || true)"

# EROFS: every file's checksum as on the host, and no file more or less.
mkdir -p /mnt/erofs
mount -t erofs -o ro /dev/$EROFS /mnt/erofs
cd /mnt/erofs
sha256sum -c -s /etc/blk/erofs.sums
[ "$(find . -type f | wc -l)" = "$(wc -l < /etc/blk/erofs.sums)" ]
[ "$(readlink link)" = hello.txt ]
cd /
umount /mnt/erofs
echo BLK-EROFS-OK

# Read-write disk: the pattern at 4 KiB block 100, a marker in the last sector,
# both synced; read back after dropping the caches.
want=$(sha256sum < /etc/blk/pattern | cut -d' ' -f1)
dd if=/etc/blk/pattern of=/dev/$RW bs=4096 seek=100 conv=fsync 2>/dev/null
printf 'BEACON-LAST-SECTOR' | dd of=/dev/$RW bs=512 seek={last} conv=fsync,notrunc 2>/dev/null
if printf x | dd of=/dev/$RW bs=512 seek={RW_SECTORS} conv=fsync 2>/dev/null; then
    echo "a write past the end succeeded"; exit 1
fi
sync
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/$RW bs=4096 skip=100 count={pattern_blocks} 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ]
echo BLK-RW-READBACK-OK

# Read-only disk: the pattern reads back; writes fail.
got=$(dd if=/dev/$RO bs=4096 count={pattern_blocks} 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ]
if dd if=/dev/zero of=/dev/$RO bs=512 count=1 conv=fsync 2>/dev/null; then
    echo "a write to the read-only disk succeeded"; exit 1
fi
echo BLK-RO-WRITE-REFUSED
"#,
        last = RW_SECTORS - 1,
        pattern_blocks = PATTERN_LEN / 4096,
    )
}

/// The host files every blk part shares: the EROFS image, its checksums and
/// the pattern.
pub struct Assets {
    erofs: PathBuf,
    sums: PathBuf,
    pattern: PathBuf,
}

/// Make [`Assets`] in `dir` (a folder the lab can see).
pub fn assets(dir: &Path) -> Assets {
    let tree = dir.join("tree");
    make_tree(&tree);
    let erofs = dir.join("tree.erofs");
    run(Command::new("mkfs.erofs")
        .args(["--quiet", "-T0", "--all-root"])
        .arg(&erofs)
        .arg(&tree));
    let sums = dir.join("erofs.sums");
    let listing = run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . -type f | LC_ALL=C sort | xargs sha256sum",
        sh_quote(&tree.display().to_string())
    )));
    assert_eq!(listing.lines().count(), 54, "{listing}");
    std::fs::write(&sums, listing).expect("sums");
    let pattern = dir.join("pattern");
    std::fs::write(&pattern, noise(PATTERN_LEN, 3)).expect("pattern");
    Assets {
        erofs,
        sums,
        pattern,
    }
}

/// The blk part of a device boot on `backend`.
pub fn part(a: &Assets, backend: &'static str) -> Scenario {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    // In a subshell: a failure fails this part, not the whole case's shell.
    let host_before = format!(
        r#"(
set -e
truncate -s {rw_bytes} "$WORK/rw.img"
{{ cat {pattern}; head -c {ro_rest} /dev/zero; }} > "$WORK/ro.img"
sha256sum "$WORK/ro.img" {erofs} > "$WORK/before.sums"
)"#,
        rw_bytes = RW_SECTORS * 512,
        ro_rest = RO_SECTORS * 512 - PATTERN_LEN as u64,
        pattern = q(&a.pattern),
        erofs = q(&a.erofs),
    );
    let host_after = format!(
        r#"(
set -e
sha256sum -c --quiet "$WORK/before.sums" || {{ echo "HOST: a read-only image changed"; exit 1; }}
dd if="$WORK/rw.img" bs=4096 skip=100 count={blocks} 2>/dev/null | cmp - {pattern}
echo HOST-RW-PATTERN-OK
tail -c 512 "$WORK/rw.img" | head -c 18 | grep -q '^BEACON-LAST-SECTOR$'
echo HOST-LAST-SECTOR-OK
cmp -n {head_bytes} "$WORK/rw.img" /dev/zero
[ "$(stat -c %s "$WORK/rw.img")" = {rw_bytes} ]
echo HOST-RW-REST-UNTOUCHED
rm -f "$WORK/rw.img" "$WORK/ro.img"
)"#,
        blocks = PATTERN_LEN / 4096,
        pattern = q(&a.pattern),
        head_bytes = 100 * 4096,
        rw_bytes = RW_SECTORS * 512,
    );
    let mut expect: Vec<String> = [
        "BLK-RO-FLAGS: erofs=1 rw=0 ro=1",
        "BLK-EROFS-OK",
        "BLK-RW-READBACK-OK",
        "BLK-RO-WRITE-REFUSED",
        "HOST-RW-PATTERN-OK",
        "HOST-LAST-SECTOR-OK",
        "HOST-RW-REST-UNTOUCHED",
    ]
    .map(String::from)
    .to_vec();
    // Our device answers GET_ID with its stable serial; QEMU's has none set.
    if backend == "kvm" {
        expect.push("BLK-SERIAL: bcn-".into());
    }
    Scenario {
        name: "blk",
        backends: vec![backend],
        vmm_args: vec![
            "--disk".into(),
            format!("path={},ro", a.erofs.display()),
            "--disk".into(),
            "path={WORK}/rw.img".into(),
            "--disk".into(),
            "path={WORK}/ro.img,ro".into(),
        ],
        checks: guest_checks(),
        stock_modules: vec!["virtio_mmio", "virtio_blk", "erofs"],
        guest_files: vec![
            (a.sums.clone(), "/etc/blk/erofs.sums".into()),
            (a.pattern.clone(), "/etc/blk/pattern".into()),
        ],
        host_before,
        host_after,
        expect,
        ..Scenario::default()
    }
}

/// Host-side bad input: refused before boot (exit code 2), naming the file.
#[test]
fn unusable_images_are_refused_before_boot() {
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let tmp = tempfile::tempdir().expect("tempdir");
    let tiny = tmp.path().join("tiny.img");
    std::fs::write(&tiny, [0u8; 100]).expect("tiny");
    let dir: PathBuf = tmp.path().join("adir");
    std::fs::create_dir(&dir).expect("dir");
    let cases = [
        (
            format!("path={}", tmp.path().join("missing.img").display()),
            "missing.img",
        ),
        (
            format!("path={},ro", tiny.display()),
            "less than one 512-byte sector",
        ),
        (format!("path={},ro", dir.display()), "adir"),
    ];
    for backend in ["kvm", "qemu"] {
        for (arg, says) in &cases {
            let out = Command::new(VMM)
                .args(["run", "--backend", backend, "--kernel"])
                .arg(&kernel)
                .args(["--disk", arg])
                .output()
                .expect("run beacon-vmm");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{backend} {arg}: {stderr}");
            assert!(stderr.contains(says), "{backend} {arg}: {stderr}");
        }
    }
    // Nothing was made next to the images.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}
