//! Host input reaches the guest's serial console through our VMM's device event
//! loop: the guest init announces itself, reads one line from its console, echoes
//! it, and resets. The host types only after the announcement (bytes sent before
//! the guest's UART driver starts are flushed by that driver, as on real hardware).
//! A raw section of the device lab run: it needs the lab, not a device guest.

use std::path::Path;

use beacon_tests::device_suite::RawSection;
use beacon_tests::script::{section, sh_command};

use crate::VMM;

/// The section's name.
pub const NAME: &str = "console-input";

const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo "READY-FOR-INPUT"
read -r line
echo "GOT: [$line]"
reboot -f
"#;

/// The section: one beacon-kernel boot with an initrd built in `dir`.
pub fn section_for(kernel: &Path, dir: &Path) -> RawSection {
    let init = dir.join("console-init");
    std::fs::write(&init, INIT).expect("write init");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let initrd = dir.join("console-initrd.gz");
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
cat "$d/out"
echo "CONSOLE-VM-RC: $rc"
"#
    );
    RawSection {
        name: NAME.into(),
        script,
    }
}

/// Problems in the lab output of the section (empty: it passed).
pub fn problems(lab_output: &str) -> Vec<String> {
    let Some(text) = section(lab_output, NAME) else {
        return vec![format!("{NAME}: no output section")];
    };
    let mut p = Vec::new();
    if !text.contains("GOT: [hello from the host]") {
        p.push(format!(
            "{NAME}: the guest did not receive the typed line:\n{text}"
        ));
    }
    if !text.contains("CONSOLE-VM-RC: 0") {
        p.push(format!("{NAME}: the VM did not end cleanly:\n{text}"));
    }
    p
}
