//! vminitd as PID 1 of a real VM, driven over vsock from outside.
//!
//! QEMU microvm (KVM) boots the beacon kernel with an initrd whose `/init`
//! is vminitd, with crun and three busybox root file systems under the
//! shares folder (`/shares/c1`..`c3`, named by `VMINITD_SHARES_DIR=/shares`
//! on the kernel command line, which the kernel hands to init as its
//! environment), and a `vhost-vsock-device`. From the machine running QEMU,
//! `vminitd-vsock-client` connects to `vsock://CID:1024` (Task API) and
//! `vsock://CID:1025` (streams) and runs `/bin/busybox echo
//! hello-from-the-vm` (exit 0, exact stdout).
//!
//! Then the hostile side: container `c3` holds the same client (with its
//! libraries) and runs `probe` from inside the guest against the loopback
//! CID 1 and against the guest's own CID, on both ports, the way a process
//! in a container would try to reach vminitd. Every one of the four must be
//! refused (connection failed, or closed before a byte came back), never
//! served. After that the host is still served: a container that writes to
//! stderr and exits 3, then Shutdown; QEMU must end with exit code 0 (the
//! guest powered off). On hosts without hardware KVM all of this runs
//! inside the nested lab.

use std::path::{Path, PathBuf};
use std::time::Duration;

use beacon_tests::assets::{beacon_kernel_dir, lab_visible_tempdir};
use beacon_tests::lab::run_with_kvm;
use beacon_tests::script::{qemu_microvm_argv, section, sh_command, sh_quote as quote};
use serde_json::Value;

const VMINITD: &str = env!("CARGO_BIN_EXE_vminitd");
const CLIENT: &str = env!("CARGO_BIN_EXE_vminitd-vsock-client");

/// The client's JSON result line in a section.
fn result_of(text: &str) -> Option<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
}

/// `binary` without debug info (debug binaries are ~90 MB; the guest
/// unpacks the initrd into RAM).
fn slim(binary: &str, dir: &Path) -> PathBuf {
    let name = Path::new(binary).file_name().expect("binary name");
    let out = dir.join(name);
    let stripped = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        std::fs::copy(binary, &out).expect("copy binary");
    }
    out
}

/// Where the probing container finds the client.
const PROBE_IN_C3: &str = "/bin/vsock-probe";

fn build_initrd(dir: &Path) -> PathBuf {
    let out = dir.join("vminitd-initrd.gz");
    let busybox = PathBuf::from("/bin/busybox");
    let mut extra: Vec<(PathBuf, String)> = ["c1", "c2", "c3"]
        .iter()
        .map(|c| (busybox.clone(), format!("/shares/{c}/rootfs/bin/busybox")))
        .collect();
    // The client inside c3's root, with every library it loads at the same
    // path there (the container sees only its own root).
    let client = slim(CLIENT, dir);
    for lib in beacon_initrd::ldd::resolve(&client).expect("client libraries") {
        extra.push((lib.clone(), format!("/shares/c3/rootfs{}", lib.display())));
    }
    extra.push((client, format!("/shares/c3/rootfs{PROBE_IN_C3}")));
    let spec = beacon_initrd::InitrdSpec {
        init: slim(VMINITD, dir),
        busybox: None,
        crun: Some(PathBuf::from("/usr/bin/crun")),
        extra,
        ..Default::default()
    };
    let mut f = std::fs::File::create(&out).expect("create initrd");
    beacon_initrd::build(&spec, &mut f).expect("build initrd");
    out
}

#[test]
fn container_runs_in_a_vm_over_vsock() {
    let kernel = beacon_kernel_dir().expect("beacon kernel").join("vmlinux");
    let tmp = lab_visible_tempdir().expect("lab-visible tempdir");
    let initrd = build_initrd(tmp.path());
    // Any CID >= 3 works in the lab's fresh VM; on a shared hardware host
    // this keeps parallel runs apart.
    let cid = 1000 + std::process::id() % 50_000;
    let cmdline = "console=ttyS0 panic=-1 quiet VMINITD_SHARES_DIR=/shares beacon.log=debug";
    let mut qemu_argv = vec!["timeout".to_string(), "900".to_string()];
    qemu_argv.extend(qemu_microvm_argv(&kernel, &initrd, cmdline, 2, 512));
    qemu_argv.extend([
        "-device".into(),
        format!("vhost-vsock-device,guest-cid={cid}"),
    ]);
    let qemu = sh_command(&qemu_argv);
    let client = format!(
        "{} --cid {cid} --wait-secs 180 --timeout-secs 300",
        quote(CLIENT)
    );
    // From inside the guest: the loopback CID and the guest's own CID.
    let probes = quote(&format!(
        "{PROBE_IN_C3} --cid 1 probe; {PROBE_IN_C3} --cid {cid} probe"
    ));
    // The guest console streams into the output as `guest| ` lines (also
    // seen live in a lab timeout's console tail); QEMU's exit code follows
    // as `guest| QEMU-EXIT N`.
    let script = format!(
        r#"d=$(mktemp -d) || exit 90
t0=$(date +%s%N)
( sh -c 'echo $$ >"$0/qpid"; exec "$@"' "$d" {qemu} </dev/null 2>&1; echo "QEMU-EXIT $?" ) | sed -u 's/^/guest| /' &
bg=$!
fail=0
echo '=== BEGIN run1'
{client} run --id c1 -- /bin/busybox echo hello-from-the-vm 2>&1 || fail=1
echo '=== END run1'
echo "TIMING first container done after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
if [ $fail = 0 ]; then
  echo '=== BEGIN probe'
  {client} run --id c3 -- /bin/busybox sh -c {probes} 2>&1 || fail=1
  echo '=== END probe'
fi
if [ $fail = 0 ]; then
  echo '=== BEGIN run2'
  {client} run --id c2 -- /bin/busybox sh -c 'echo to-stderr >&2; exit 3' 2>&1 || fail=1
  echo '=== END run2'
fi
if [ $fail = 0 ]; then
  echo '=== BEGIN shutdown'
  {client} shutdown 2>&1 && echo SHUTDOWN-SENT || fail=1
  echo '=== END shutdown'
fi
[ $fail = 0 ] || kill "$(cat "$d/qpid")"
wait $bg
echo "TIMING qemu ended after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
rm -rf "$d"
"#
    );
    let script_path = tmp.path().join("vm-vsock.sh");
    std::fs::write(&script_path, script).expect("write script");
    let out = run_with_kvm(
        &["sh".to_string(), script_path.display().to_string()],
        Duration::from_secs(1200),
    )
    .expect("lab run");
    let text = &out.output;
    let console: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("guest| "))
        .map(|l| format!("{l}\n"))
        .collect();
    let console = console.as_str();
    let fail = |what: &str| -> ! {
        panic!("{what}\n--- output:\n{text}\n--- guest console:\n{console}");
    };

    let run1 = section(text, "run1")
        .and_then(result_of)
        .unwrap_or_else(|| fail("first container: no result"));
    assert_eq!(
        run1["stdout"].as_str(),
        Some("hello-from-the-vm\n"),
        "stdout: {run1}\n{console}"
    );
    assert_eq!(run1["stderr"].as_str(), Some(""), "{run1}");
    assert_eq!(run1["exit_status"].as_u64(), Some(0), "{run1}");

    // No way in from inside the guest, on either port, at either CID.
    let probe = section(text, "probe")
        .and_then(result_of)
        .unwrap_or_else(|| fail("probing container: no result"));
    assert_eq!(probe["exit_status"].as_u64(), Some(0), "{probe}");
    let outcomes: Vec<Value> = probe["stdout"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for target in [1, cid] {
        for port in [1024, 1025] {
            let o = outcomes
                .iter()
                .find(|o| o["cid"] == target && o["port"] == port)
                .unwrap_or_else(|| fail(&format!("no probe of {target}:{port}: {probe}")));
            assert_eq!(
                o["outcome"], "refused",
                "a container reached vminitd at vsock://{target}:{port}: {o}\n{console}"
            );
        }
    }

    let run2 = section(text, "run2")
        .and_then(result_of)
        .unwrap_or_else(|| fail("second container: no result"));
    assert_eq!(run2["exit_status"].as_u64(), Some(3), "{run2}");
    assert_eq!(run2["stderr"].as_str(), Some("to-stderr\n"), "{run2}");
    assert_eq!(run2["stdout"].as_str(), Some(""), "{run2}");

    if !section(text, "shutdown").is_some_and(|s| s.contains("SHUTDOWN-SENT")) {
        fail("Shutdown was not answered");
    }
    if !console.contains("QEMU-EXIT 0\n") {
        fail("QEMU did not exit 0 (no guest power-off)");
    }
    assert!(
        console.contains("powering off"),
        "vminitd did not power off:\n{console}"
    );
    assert_eq!(out.exit_code, 0, "{text}");
    let lines: Vec<&str> = console.lines().collect();
    eprintln!(
        "guest console (last lines):\n{}",
        lines[lines.len().saturating_sub(12)..].join("\n")
    );
    for l in text.lines().filter(|l| l.starts_with("TIMING")) {
        eprintln!("{l}");
    }
    for o in &outcomes {
        eprintln!("probe from inside the guest: {o}");
    }
    eprintln!(
        "VM over vsock: {run1}\n{run2}\nwhole run {:.1} s",
        out.elapsed.as_secs_f64()
    );
}
