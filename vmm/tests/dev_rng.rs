//! virtio-rng in real guests, on both backends, with the beacon kernel and
//! Debian's stock cloud kernel (whose virtio drivers are modules found through
//! ACPI). The guest reads its hwrng and checks the bytes are not all zero.

use std::path::Path;
use std::time::Duration;

use beacon_tests::device_suite::{assert_all_passed, run_scenarios, Scenario};

const VMM: &str = env!("CARGO_BIN_EXE_beacon-vmm");

#[test]
fn rng_works_on_both_backends_with_beacon_and_stock_kernels() {
    let rng = Scenario {
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
    };
    let results = run_scenarios(Path::new(VMM), &[rng], Duration::from_secs(1500));
    assert_all_passed(&results);
}
