//! A hostile guest (KVM backend, our devices): after the other parts' checks,
//! the guest unmounts what they mounted, unbinds every virtio-mmio device from
//! its driver and runs `beacon-hostile-guest` (`tests/src/bin/`), which writes
//! garbage to every device's MMIO window and publishes malformed queues. The
//! VMM must keep running, every device must still answer a reset (the program
//! checks; a device whose virtiofsd gave up on the malformed queues may stay
//! "needs reset"), the VMM must have reported what it refused (rate-limited
//! lines of the transport and the queues),
//! and the guest's end (reset or power off) must still stop the VM: the boot's
//! exit code is judged as for any boot.

use std::path::Path;

use beacon_tests::device_suite::Scenario;

/// The `beacon-vmm run` flags that each add one virtio-mmio device.
const DEVICE_FLAGS: [&str; 5] = ["--rng", "--disk", "--fs", "--net", "--vsock"];

/// How many virtio-mmio devices `parts` attach.
pub fn device_count(parts: &[Scenario]) -> usize {
    parts
        .iter()
        .flat_map(|p| &p.vmm_args)
        .filter(|a| DEVICE_FLAGS.contains(&a.as_str()))
        .count()
}

/// The hostile part: last in its boot (the devices are unusable afterwards).
/// `program` is `beacon-hostile-guest`; `windows` the devices the boot has.
pub fn part(program: &Path, windows: usize) -> Scenario {
    Scenario {
        name: "hostile",
        backends: vec!["kvm"],
        checks: format!(
            r#"
set -e
# The shares and disks are about to lose their devices: no sync at the end.
touch /tmp/beacon-no-sync
for m in $(awk '$3=="virtiofs"||$3=="erofs"{{print $2}}' /proc/mounts); do umount -l "$m"; done
drv=/sys/bus/platform/drivers/virtio-mmio
n=0
for d in "$drv"/*; do
  [ -L "$d" ] || continue
  name=${{d##*/}}
  [ "$name" = module ] && continue
  echo "$name" >"$drv/unbind"
  n=$((n + 1))
done
echo "HOSTILE-UNBOUND: $n"
beacon-hostile-guest --min-windows {windows}
"#
        ),
        guest_files: vec![(program.to_path_buf(), "/bin/beacon-hostile-guest".into())],
        expect: vec![
            format!("HOSTILE-DONE windows={windows} "),
            // The VMM's own rate-limited reports of what it refused.
            "virtio-mmio: ".into(),
            "virtqueue: ".into(),
        ],
        ..Scenario::default()
    }
}
