//! virtio-rng: the guest reads its hwrng and checks the bytes are not all zero.

use beacon_tests::device_suite::Scenario;

/// The rng part of a device boot (`--rng`).
pub fn part() -> Scenario {
    Scenario {
        name: "rng",
        vmm_args: vec!["--rng".into()],
        checks: r#"
set -e
echo "RNG-AVAILABLE: $(cat /sys/class/misc/hw_random/rng_available)"
echo "RNG-CURRENT: $(cat /sys/class/misc/hw_random/rng_current)"
bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
echo "RNG-BYTES: $bytes"
[ ${#bytes} -eq 128 ]
[ "$bytes" != "$(printf '0%.0s' $(seq 128))" ]
"#
        .into(),
        stock_modules: vec!["virtio_mmio", "virtio_rng"],
        expect: vec!["RNG-CURRENT: virtio_rng".into()],
        ..Scenario::default()
    }
}
