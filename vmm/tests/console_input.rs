//! Host input reaches the guest's serial console through our VMM's device event
//! loop: the guest init announces itself, reads one line from its console, echoes
//! it, and resets. The host types only after the announcement (bytes sent before
//! the guest's UART driver starts are flushed by that driver, as on real hardware).

use std::time::Duration;

use beacon_tests::assets::{beacon_kernel_dir, lab_visible_tempdir};
use beacon_tests::lab::run_with_kvm;
use beacon_tests::script::{section, sh_command};

const VMM: &str = env!("CARGO_BIN_EXE_beacon-vmm");

const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo "READY-FOR-INPUT"
read -r line
echo "GOT: [$line]"
reboot -f
"#;

#[test]
fn typed_line_reaches_the_guest_console() {
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let tmp = lab_visible_tempdir().expect("tempdir");
    let init = tmp.path().join("init");
    std::fs::write(&init, INIT).expect("write init");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let initrd = tmp.path().join("initrd.gz");
    let spec = beacon_initrd::InitrdSpec {
        init: init.clone(),
        busybox: Some("/bin/busybox".into()),
        ..Default::default()
    };
    let mut file = std::fs::File::create(&initrd).expect("create initrd");
    beacon_initrd::build(&spec, &mut file).expect("build initrd");

    let vmm = sh_command(&[
        VMM.to_string(),
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--memory".into(),
        "192".into(),
        "--cmdline".into(),
        "console=ttyS0 reboot=k panic=-1 quiet".into(),
    ]);
    // A fifo held open read-write on fd 3 is the VMM's stdin, so it never sees EOF
    // before we type.
    let script = format!(
        r#"d=$(mktemp -d)
mkfifo "$d/in"
exec 3<>"$d/in"
NO_COLOR=1 timeout 200 {vmm} <&3 >"$d/out" 2>&1 &
pid=$!
i=0
while ! grep -q READY-FOR-INPUT "$d/out" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 400 ] && break; sleep 0.5
done
printf 'hello from the host\n' >&3
wait $pid
rc=$?
echo '=== BEGIN vm'
cat "$d/out"
echo "=== END vm rc=$rc"
"#
    );
    let script_path = tmp.path().join("console.sh");
    std::fs::write(&script_path, script).expect("write script");
    let out = run_with_kvm(
        &["sh".to_string(), script_path.display().to_string()],
        Duration::from_secs(400),
    )
    .expect("lab run");
    let vm = section(&out.output, "vm").unwrap_or_else(|| panic!("no VM output:\n{}", out.console));
    assert!(
        vm.contains("GOT: [hello from the host]"),
        "the guest did not receive the typed line:\n{vm}"
    );
    assert!(out.output.contains("=== END vm rc=0"), "{vm}");
}
