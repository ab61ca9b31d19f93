//! Tests of the assembled backend: the boot path end to end in test memory (with
//! fabricated kernels), and the VM lifecycle with tiny hand-written guests (reset,
//! triple fault with registers, pause/resume/kill, a console flood nobody reads,
//! no leaked threads or fds).
//!
//! The lifecycle tests need a `/dev/kvm` that runs such guests: this host's when
//! it can be opened (hardware KVM, or a paravirtual PVM `/dev/kvm`, which runs
//! these guests too), and otherwise they run themselves again inside the nested
//! lab (all of them in one lab run) and pass only if they passed there
//! ([`kvm_here_or_in_lab`]). They never pass without having run.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::boot::layout::{
    CMDLINE_ADDR, GDT_ADDR, PML4_ADDR, PVH_INFO_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use std::os::unix::fs::OpenOptionsExt;

use super::boot::{self, BootEntry};
use super::KvmVm;
use crate::backend::{VmBackend, VmError, VmExit};
use crate::config::{ConsoleConfig, KernelFormat, VmConfig};

const MIB: u64 = 1 << 20;
const KERNEL_PADDR: u64 = 0x100_0000;

/// A minimal x86_64 ELF "kernel": one PT_LOAD of `code` at 16 MiB with `memsz`
/// bytes in memory, and optionally a PVH note pointing at `code + 0x10`.
fn fake_elf(code: &[u8], memsz: u64, pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&KERNEL_PADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, phnum, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let note_off = 64 + 56 * u64::from(phnum);
    let code_off = 0x1000u64;
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes());
        for v in [
            off,
            paddr | 0xffff_ffff_8000_0000,
            paddr,
            filesz,
            memsz,
            0x1000,
        ] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, code_off, KERNEL_PADDR, code.len() as u64, memsz);
    if pvh {
        phdr(&mut f, 4, note_off, 0, 20, 20);
        // namesz, descsz, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
        for v in [4u32, 4, 18] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&((KERNEL_PADDR + 0x10) as u32).to_le_bytes());
    }
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write test file");
    p
}

fn test_memory(bytes: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), bytes as usize)]).expect("memory")
}

#[test]
fn elf_with_pvh_note_boots_through_pvh() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = VmConfig::new(write(
        tmp.path(),
        "vmlinux",
        &fake_elf(&[0x90; 64], 4 * MIB, true),
    ));
    let initrd: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    config.initrd = Some(write(tmp.path(), "initrd", &initrd));
    config.cmdline = "console=ttyS0 reboot=k".into();
    config.memory.size_mib = 64;
    let mem = test_memory(64 * MIB);
    let entry = boot::load(&mem, 64 * MIB, &config, KernelFormat::Elf).expect("load");
    assert_eq!(
        entry,
        BootEntry::Pvh {
            entry: KERNEL_PADDR + 0x10
        }
    );

    let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).expect("read");
    assert_eq!(magic, 0x336e_c578);
    let cmdline_paddr: u64 = mem
        .read_obj(GuestAddress(PVH_INFO_ADDR + 24))
        .expect("read");
    assert_eq!(cmdline_paddr, CMDLINE_ADDR);
    let mut cmdline = vec![0u8; 23];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
        .expect("read");
    assert_eq!(&cmdline, b"console=ttyS0 reboot=k\0");

    // The module list names the initrd, which sits high, page-aligned, intact.
    let addr: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).expect("read");
    let size: u64 = mem
        .read_obj(GuestAddress(PVH_MODLIST_ADDR + 8))
        .expect("read");
    assert_eq!(size, 5000);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= 64 * MIB && addr + size > 64 * MIB - 4096);
    let mut back = vec![0u8; 5000];
    mem.read_slice(&mut back, GuestAddress(addr)).expect("read");
    assert_eq!(back, initrd);

    // PVH GDT (32-bit code) and the MP table.
    let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).expect("read");
    assert_eq!(code, 0x00cf_9b00_0000_ffff);
    let mut mp = [0u8; 4];
    mem.read_slice(&mut mp, GuestAddress(0x9fc00))
        .expect("read");
    assert_eq!(&mp, b"_MP_");
}

#[test]
fn elf_without_note_boots_through_the_64_bit_entry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = VmConfig::new(write(
        tmp.path(),
        "vmlinux",
        &fake_elf(&[0x90; 64], 4 * MIB, false),
    ));
    config.initrd = Some(write(tmp.path(), "initrd", &[7u8; 10000]));
    config.cmdline = "panic=-1".into();
    let mem = test_memory(128 * MIB);
    let entry = boot::load(&mem, 128 * MIB, &config, KernelFormat::Elf).expect("load");
    assert_eq!(
        entry,
        BootEntry::Linux64 {
            entry: KERNEL_PADDR
        }
    );

    let params: linux_loader::loader::bootparam::boot_params =
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).expect("read");
    assert_eq!({ params.hdr.header }, 0x5372_6448);
    assert_eq!({ params.hdr.boot_flag }, 0xaa55);
    assert_eq!({ params.hdr.type_of_loader }, 0xff);
    assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    assert_eq!({ params.hdr.cmdline_size }, 8);
    assert_eq!({ params.hdr.ramdisk_size }, 10000);
    let image = u64::from(params.hdr.ramdisk_image);
    assert_eq!(image % 4096, 0);
    let mut byte = [0u8; 1];
    mem.read_slice(&mut byte, GuestAddress(image + 9999))
        .expect("read");
    assert_eq!(byte, [7]);
    assert_eq!({ params.e820_entries }, 2);
    // Long-mode GDT and page tables are in place.
    let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).expect("read");
    assert_eq!(code, 0x00af_9b00_0000_ffff);
    let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).expect("read");
    assert_eq!(pml4 & !0xfff, 0xa000);
}

#[test]
fn initrd_that_does_not_fit_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The kernel occupies 16..48 MiB; a 32 MiB initrd cannot fit in 64 MiB.
    let mut config = VmConfig::new(write(
        tmp.path(),
        "vmlinux",
        &fake_elf(&[0x90; 16], 32 * MIB, false),
    ));
    let initrd = tmp.path().join("initrd");
    std::fs::File::create(&initrd)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("sparse initrd");
    config.initrd = Some(initrd);
    config.memory.size_mib = 64;
    config.validate().expect("the config itself is valid");
    let mem = test_memory(64 * MIB);
    let err = boot::load(&mem, 64 * MIB, &config, KernelFormat::Elf).expect_err("must not fit");
    assert!(matches!(err, VmError::Memory(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("does not fit") && msg.contains("more memory"),
        "{msg}"
    );

    // Through the backend: the same error before any vCPU exists (or, on a host
    // without usable KVM, the error saying so).
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let before = vcpu_threads_and_kvm_fds();
    match KvmVm::create(config.clone()) {
        Err(VmError::Memory(msg)) => assert!(msg.contains("does not fit"), "{msg}"),
        Err(VmError::KvmUnavailable(msg)) => assert!(msg.contains("/dev/kvm"), "{msg}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("an initrd that does not fit was accepted"),
    }

    // Guest RAM larger than the host (1 TiB passes config validation).
    config.initrd = None;
    config.memory.size_mib = crate::config::MAX_MEMORY_MIB;
    config.validate().expect("valid as a config");
    match KvmVm::create(config) {
        Err(VmError::Memory(msg)) => assert!(msg.contains("lower --memory"), "{msg}"),
        Err(VmError::KvmUnavailable(msg)) => assert!(msg.contains("/dev/kvm"), "{msg}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("1 TiB of guest RAM was accepted on this host"),
    }
    assert_eq!(settle_to(before), before, "nothing left behind");
}

#[test]
fn kernel_larger_than_memory_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = VmConfig::new(write(
        tmp.path(),
        "vmlinux",
        &fake_elf(&[0x90; 16], MIB, false),
    ));
    // RAM ends below the kernel's load address.
    let mem = test_memory(8 * MIB);
    let err = boot::load(&mem, 8 * MIB, &config, KernelFormat::Elf).expect_err("no room");
    assert!(matches!(err, VmError::KernelLoad(_)), "{err:?}");
    assert!(
        err.to_string().contains("larger than guest memory"),
        "{err}"
    );
}

/// Wait (up to 2 s) until this process's vCPU threads and KVM fds are back to
/// `expected`, and return what was seen last. A joined thread can stay listed in
/// /proc for a moment while the kernel reaps it, hence the short poll.
fn settle_to(expected: (usize, usize)) -> (usize, usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let now = vcpu_threads_and_kvm_fds();
        if now == expected || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// How many vCPU threads this process has and how many KVM fds it holds.
fn vcpu_threads_and_kvm_fds() -> (usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("beacon-vcpu"))
        .count();
    let fds = std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("kvm"))
        .count();
    (threads, fds)
}

/// 64-bit guest code: mark the boot timer (123 to port 0x440), then reset
/// through the i8042 (0xfe to port 0x64), then halt forever.
const TIMER_THEN_RESET: &[u8] = &[
    0xb0, 0x7b, // mov al, 123
    0x66, 0xba, 0x40, 0x04, // mov dx, 0x440
    0xee, // out dx, al
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp back to hlt
];

/// 64-bit guest code that faults with no IDT: a triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b]; // ud2

/// 64-bit guest code that spins forever.
const SPIN: &[u8] = &[0xeb, 0xfe]; // jmp $

/// 64-bit guest code that halts forever with interrupts off (what a Linux
/// `poweroff` without ACPI ends in).
const HALT_FOREVER: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd]; // cli; hlt; jmp back

/// VM tests count this process's vCPU threads and KVM fds: one at a time.
static VM_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// True when this process can run tiny guests itself; otherwise the test runs
/// inside the nested lab and the caller returns. All of this module's tests share
/// one lab run (one lab VM start).
fn kvm_here_or_in_lab(test: &str) -> bool {
    beacon_tests::lab::here_or_in_lab_shared(
        kvm_ioctls::Kvm::new().is_ok(),
        "/dev/kvm cannot be opened",
        test,
        "kvm::tests::",
        &[],
    )
}

fn guest_config(code: &[u8], vcpus: u8, dir: &Path) -> VmConfig {
    let mut config = VmConfig::new(write(dir, "vmlinux", &fake_elf(code, MIB, false)));
    config.memory.size_mib = 64;
    config.vcpus.boot = vcpus;
    config.vcpus.max = vcpus;
    config.console = ConsoleConfig::Off;
    config
}

/// A config that demands confinement with a mode that does not confine is
/// refused before KVM is opened (so this runs anywhere), and so is one for
/// the QEMU backend, whose threads are not ours.
#[test]
fn a_demand_for_confinement_that_cannot_hold_is_refused_before_kvm_opens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for mode in [
        crate::seccomp::SeccompMode::Off,
        crate::seccomp::SeccompMode::Log,
    ] {
        let mut config = guest_config(&[0xf4], 1, tmp.path());
        config.require_confinement = true;
        config.seccomp = mode;
        let err = KvmVm::create(config.clone())
            .err()
            .expect("refused by the kvm backend");
        assert!(matches!(err, VmError::Confinement(_)), "{mode}: {err}");
        assert!(err.to_string().contains("require_confinement"), "{err}");
        config.seccomp = crate::seccomp::SeccompMode::Kill;
        let err = crate::qemu::QemuVm::create(config)
            .err()
            .expect("refused by the qemu backend");
        assert!(matches!(err, VmError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("require_confinement"), "{err}");
    }
}

/// A created (not started) VM running `code` (callers made sure KVM is usable).
fn guest(code: &[u8], vcpus: u8) -> KvmVm {
    let tmp = tempfile::tempdir().expect("tempdir");
    KvmVm::create(guest_config(code, vcpus, tmp.path()))
        .unwrap_or_else(|e| panic!("creating the VM failed: {e}"))
}

/// Run `code` to its end.
fn run_guest(code: &[u8], vcpus: u8) -> (VmExit, crate::backend::BootTimes) {
    let vm = guest(code, vcpus);
    assert!(
        matches!(vm.wait(), Err(VmError::WrongState { .. })),
        "wait before start"
    );
    vm.start().expect("start");
    assert!(
        matches!(vm.start(), Err(VmError::WrongState { .. })),
        "second start"
    );
    let exit = vm.wait().expect("wait");
    let times = vm.boot_times();
    eprintln!(
        "guest {:02x?} on {vcpus} vCPU(s) ended: {exit:?}, {times:?}",
        &code[..2]
    );
    assert!(times.first_run.is_some(), "first KVM_RUN recorded");
    drop(vm);
    (exit, times)
}

#[test]
fn guest_exits_end_the_vm_and_leave_nothing_behind() {
    if !kvm_here_or_in_lab("kvm::tests::guest_exits_end_the_vm_and_leave_nothing_behind") {
        return;
    }
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let (threads_before, fds_before) = vcpu_threads_and_kvm_fds();
    // Two vCPUs: the second never gets a SIPI and sits in KVM_RUN until kicked.
    let (exit, times) = run_guest(TIMER_THEN_RESET, 2);
    assert_eq!(exit, VmExit::Reboot);
    assert!(times.init_reached.is_some(), "boot timer seen");
    assert!(times.init_reached >= times.first_run);
    let (exit, times) = run_guest(TRIPLE_FAULT, 1);
    let VmExit::Crashed(msg) = exit else {
        panic!("a faulting guest must crash, got {exit:?}");
    };
    assert!(msg.contains("triple fault"), "{msg}");
    assert!(
        msg.contains("rip=0x1000000") && msg.contains("efer=0x500"),
        "{msg}"
    );
    assert!(times.init_reached.is_none());
    assert_eq!(
        settle_to((threads_before, fds_before)),
        (threads_before, fds_before)
    );
}

#[test]
fn pause_resume_kill_and_shutdown_never_hang() {
    if !kvm_here_or_in_lab("kvm::tests::pause_resume_kill_and_shutdown_never_hang") {
        return;
    }
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let (threads_before, fds_before) = vcpu_threads_and_kvm_fds();
    let vm = guest(SPIN, 2);
    assert!(matches!(
        vm.pause(),
        Err(VmError::WrongState {
            actual: "created",
            ..
        })
    ));
    vm.start().expect("start");
    vm.pause().expect("pause");
    assert!(matches!(
        vm.pause(),
        Err(VmError::WrongState {
            actual: "paused",
            ..
        })
    ));
    vm.resume().expect("resume");
    assert!(matches!(
        vm.resume(),
        Err(VmError::WrongState {
            actual: "running",
            ..
        })
    ));
    vm.pause().expect("pause again");
    vm.kill().expect("kill while paused");
    assert_eq!(vm.wait().expect("wait"), VmExit::PowerOff);
    assert_eq!(vm.wait().expect("wait twice"), VmExit::PowerOff);
    drop(vm);

    // Halted with interrupts off: KVM keeps the vCPU inside KVM_RUN.
    let vm = guest(HALT_FOREVER, 1);
    vm.start().expect("start");
    wait_until(
        || vm.boot_times().first_run.is_some(),
        "the vCPU entered the guest",
    );
    vm.shutdown().expect("shutdown");
    assert_eq!(vm.wait().expect("wait"), VmExit::PowerOff);
    drop(vm);

    // Dropped while running, without wait: threads are still joined.
    let vm = guest(SPIN, 1);
    vm.start().expect("start");
    drop(vm);
    assert_eq!(
        settle_to((threads_before, fds_before)),
        (threads_before, fds_before)
    );
}

/// Poll `cond` until it holds (120 s at most, then fail naming `what`).
fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// 64-bit guest code that writes to COM1 forever.
const FLOOD_COM1: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x41, // mov al, 'A'
    0xee, // out dx, al
    0xeb, 0xfd, // jmp back to out
];

#[test]
fn a_console_flood_nobody_reads_cannot_keep_kill_from_ending_the_vm() {
    if !kvm_here_or_in_lab(
        "kvm::tests::a_console_flood_nobody_reads_cannot_keep_kill_from_ending_the_vm",
    ) {
        return;
    }
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let (threads_before, fds_before) = vcpu_threads_and_kvm_fds();
    // stdout of a VM is a pipe whose reader never reads.
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just returned these fds; nobody else owns them.
    let (reader, writer) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = guest_config(FLOOD_COM1, 1, tmp.path());
    config.console = ConsoleConfig::Stdout;
    let vm = super::builder::build_with_console(
        config,
        super::console::ConsoleOutput::NonBlocking(
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&writer)
                ))
                .expect("non-blocking write end"),
        ),
    )
    .expect("create");
    drop(writer);
    vm.start().expect("start");
    // More than the pipe and the console buffer hold: the rest is dropped.
    wait_until(
        || vm.console_dropped() > 0,
        "the guest overflowed the console",
    );
    vm.kill().expect("kill");
    assert_eq!(vm.wait().expect("wait returns"), VmExit::PowerOff);
    drop(vm);
    drop(reader);
    assert_eq!(
        settle_to((threads_before, fds_before)),
        (threads_before, fds_before)
    );
}

#[test]
fn vcpu_limit_check() {
    assert!(super::builder::check_vcpu_limit(8, 8).is_ok());
    let err = super::builder::check_vcpu_limit(9, 8).expect_err("over the limit");
    let msg = err.to_string();
    assert!(
        msg.contains("at most 8 vCPUs") && msg.contains("lower --cpus"),
        "{msg}"
    );
}

#[test]
fn a_panicking_vcpu_thread_crashes_the_vm_and_stops_the_others() {
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::Arc;

    use super::control::{install_kick_handler, VcpuControl};
    use super::cpu_manager::FinishGuard;

    install_kick_handler().expect("handler");
    let control = Arc::new(VcpuControl::new());
    // A healthy "vCPU" blocked until told to stop, and one that panics.
    let c = control.clone();
    let healthy = std::thread::spawn(move || {
        let _guard = FinishGuard {
            control: c.clone(),
            id: 0,
        };
        while !c.should_stop() {
            // SAFETY: plain libc call with a valid timespec; a kick interrupts it.
            unsafe {
                let ts = libc::timespec {
                    tv_sec: 30,
                    tv_nsec: 0,
                };
                libc::nanosleep(&ts, std::ptr::null_mut());
            }
        }
    });
    control.register_thread(healthy.as_pthread_t());
    let c = control.clone();
    let broken = std::thread::spawn(move || {
        let _guard = FinishGuard { control: c, id: 1 };
        std::thread::sleep(std::time::Duration::from_millis(10));
        panic!("device model bug");
    });
    control.register_thread(broken.as_pthread_t());

    control.wait_all_finished();
    assert!(healthy.join().is_ok());
    assert!(broken.join().is_err());
    assert_eq!(
        control.exit(),
        Some(VmExit::Crashed("vCPU 1 thread panicked".into()))
    );
}

/// A virtio-fs share whose vhost-user socket is missing, or has nobody
/// listening (virtiofsd died), is refused while the VM is built, before any
/// vCPU runs, with an error naming the socket, and nothing is left behind.
#[test]
fn a_missing_or_dead_virtio_fs_socket_is_refused_before_boot() {
    if !kvm_here_or_in_lab("kvm::tests::a_missing_or_dead_virtio_fs_socket_is_refused_before_boot")
    {
        return;
    }
    let _serial = VM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tempdir");
    let dead = tmp.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
    for (socket, says) in [
        (tmp.path().join("missing.sock"), "does not exist"),
        (dead, "nothing is listening"),
    ] {
        let mut config = guest_config(HALT_FOREVER, 1, tmp.path());
        config.devices = vec![crate::config::DeviceConfig::Fs {
            tag: "share".into(),
            socket: socket.clone(),
            queue_size: 1024,
        }];
        let err = match KvmVm::create(config) {
            Ok(_) => panic!("a VM was built with fs socket {socket:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(says), "{err}");
        assert!(err.contains(&socket.display().to_string()), "{err}");
        assert!(err.contains("virtio-fs \"share\""), "{err}");
    }
    assert_eq!(vcpu_threads_and_kvm_fds(), (0, 0), "nothing left behind");
}

/// 64-bit guest code standing in for the guest's ACPI hotplug methods, on the
/// hotplug controller's page at `base`: forever read the GED events, select
/// CPU 1, acknowledge its insertion, and acknowledge and eject it when asked.
fn hotplug_stand_in(base: u64) -> Vec<u8> {
    let mut code = vec![0x48, 0xbb]; // mov rbx, imm64
    code.extend_from_slice(&base.to_le_bytes());
    code.extend_from_slice(&[
        0x8b, 0x03, // loop (10): mov eax, [rbx]          GED events
        0xb9, 0x01, 0x00, 0x00, 0x00, // mov ecx, 1
        0x89, 0x4b, 0x10, // mov [rbx + 0x10], ecx         select CPU 1
        0x8a, 0x43, 0x14, // mov al, [rbx + 0x14]          its status
        0xa8, 0x02, // test al, INSERTING
        0x74, 0x04, // jz +4
        0xc6, 0x43, 0x14, 0x02, // mov byte [rbx + 0x14], INSERTING (ack)
        0xa8, 0x04, // test al, REMOVING
        0x74, 0xe7, // jz loop
        0xc6, 0x43, 0x14, 0x04, // mov byte [rbx + 0x14], REMOVING (ack)
        0xc6, 0x43, 0x14, 0x08, // mov byte [rbx + 0x14], EJECT
        0xeb, 0xdd, // jmp loop
    ]);
    code
}

/// vCPU hotplug against a guest that answers like Linux's ACPI code: add,
/// remove (the thread ends, nothing leaks), add again (the vCPU fd is
/// reused), and every refusal: beyond the maximum, zero, while paused, no
/// room, and a guest that never answers (the VM keeps its vCPUs).
#[test]
fn vcpus_are_hot_added_removed_and_refused_clearly() {
    if !kvm_here_or_in_lab("kvm::tests::vcpus_are_hot_added_removed_and_refused_clearly") {
        return;
    }
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let (threads_before, fds_before) = vcpu_threads_and_kvm_fds();
    let tmp = tempfile::tempdir().expect("tempdir");

    // No room above the boot vCPUs.
    let vm = guest(HALT_FOREVER, 1);
    assert!(matches!(
        vm.resize_vcpus(1),
        Err(VmError::WrongState {
            actual: "created",
            ..
        })
    ));
    vm.start().expect("start");
    let err = vm.resize_vcpus(2).expect_err("no room");
    assert!(err.to_string().contains("--max-cpus"), "{err}");
    vm.kill().expect("kill");
    vm.wait().expect("wait");
    drop(vm);

    // The controller is the first MMIO allocation of a VM without virtio devices.
    let base = crate::kvm::boot::layout::MMIO_GAP_START;
    let mut config = guest_config(&hotplug_stand_in(base), 1, tmp.path());
    config.vcpus.max = 2;
    let vm = KvmVm::create(config).expect("create");
    assert_eq!(
        beacon_common::lock(&vm.devices)
            .hotplug_info()
            .map(|h| h.base),
        Some(base),
        "the stand-in guest polls the right page"
    );
    vm.start().expect("start");
    assert_eq!(vm.resize_vcpus(1).expect("no change"), 1);
    for round in 0..2 {
        assert_eq!(vm.resize_vcpus(2).expect("add"), 2, "round {round}");
        assert_eq!(vm.vcpu_count(), 2);
        // A new thread takes its name as it starts.
        wait_until(
            || vcpu_threads_and_kvm_fds().0 == threads_before + 2,
            "the added vCPU's thread runs",
        );
        assert!(vm.control.exit().is_none(), "{:?}", vm.control.exit());
        assert_eq!(vm.resize_vcpus(1).expect("remove"), 1, "round {round}");
        assert_eq!(vm.vcpu_count(), 1);
        wait_until(
            || vcpu_threads_and_kvm_fds().0 == threads_before + 1,
            "the removed vCPU's thread ended",
        );
    }
    for bad in [0, 3, 255] {
        let err = vm.resize_vcpus(bad).expect_err("out of range");
        assert!(matches!(err, VmError::Unsupported(_)), "{bad}: {err}");
    }
    vm.pause().expect("pause");
    assert!(matches!(
        vm.resize_vcpus(2),
        Err(VmError::WrongState {
            actual: "paused",
            ..
        })
    ));
    vm.resume().expect("resume");
    assert_eq!(vm.vcpu_count(), 1, "refusals changed nothing");
    vm.kill().expect("kill");
    assert_eq!(vm.wait().expect("wait"), VmExit::PowerOff);
    drop(vm);

    // A guest that never answers: the request is undone.
    let mut config = guest_config(HALT_FOREVER, 1, tmp.path());
    config.vcpus.max = 2;
    let vm = KvmVm::create(config).expect("create");
    vm.cpus
        .set_ack_timeout(std::time::Duration::from_millis(500));
    vm.start().expect("start");
    let err = vm.resize_vcpus(2).expect_err("never acknowledged");
    assert!(err.to_string().contains("did not acknowledge"), "{err}");
    assert_eq!(vm.vcpu_count(), 1);
    vm.kill().expect("kill");
    vm.wait().expect("wait");
    drop(vm);
    assert_eq!(
        settle_to((threads_before, fds_before)),
        (threads_before, fds_before)
    );
}

/// 64-bit guest code standing in for the guest's ACPI memory hotplug methods
/// on the controller's page at `base`: forever read the GED events and, for
/// memory blocks 0 and 1, acknowledge insertions and removal requests, and
/// (when `eject`) eject blocks asked back, as Linux does once it offlined them.
fn memory_stand_in(base: u64, eject: bool) -> Vec<u8> {
    let mut code = vec![0x48, 0xbb]; // mov rbx, imm64
    code.extend_from_slice(&base.to_le_bytes());
    code.extend_from_slice(&[
        0x8b, 0x03, // loop (0): mov eax, [rbx]           GED events
        0x31, 0xc9, // xor ecx, ecx                       block 0
        0x89, 0x4b, 0x20, // block (4): mov [rbx + 0x20], ecx   select it
        0x8a, 0x43, 0x24, // mov al, [rbx + 0x24]         its status
        0xa8, 0x02, // test al, INSERTING
        0x74, 0x04, // jz +4
        0xc6, 0x43, 0x24, 0x02, // mov byte [rbx + 0x24], INSERTING (ack)
        0xa8, 0x04, // test al, REMOVING
        0x74, 0x08, // jz +8
        0xc6, 0x43, 0x24, 0x04, // mov byte [rbx + 0x24], REMOVING (ack)
    ]);
    if eject {
        code.extend_from_slice(&[0xc6, 0x43, 0x24, 0x08]); // mov byte [rbx + 0x24], EJECT
    } else {
        code.extend_from_slice(&[0x90; 4]); // a guest that cannot offline it
    }
    code.extend_from_slice(&[
        0xff, 0xc1, // inc ecx
        0x83, 0xf9, 0x02, // cmp ecx, 2
        0x72, 0xdf, // jb block
        0xeb, 0xd9, // jmp loop
    ]);
    code
}

/// Memfds of hot-added memory blocks this process holds.
fn hotplug_memfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| {
            target
                .to_string_lossy()
                .contains("beacon-guest-ram-hotplug")
        })
        .count()
}

/// Memory hotplug against a guest that answers like Linux's ACPI code: add
/// two blocks, remove one (its memfd is closed), and every refusal: beyond
/// the room, below boot memory, not whole blocks, while paused, no room, a
/// guest that never acknowledges (nothing stays mapped) and one that cannot
/// give a block back (the block stays).
#[test]
fn memory_is_hot_added_removed_and_refused_clearly() {
    if !kvm_here_or_in_lab("kvm::tests::memory_is_hot_added_removed_and_refused_clearly") {
        return;
    }
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let (threads_before, fds_before) = vcpu_threads_and_kvm_fds();
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = |vm: &KvmVm| vm.guest_ram().memory().num_regions();

    // No room.
    let vm = guest(HALT_FOREVER, 1);
    vm.start().expect("start");
    let err = vm.resize_memory(64 + 128).expect_err("no room");
    assert!(err.to_string().contains("--hotplug-memory"), "{err}");
    assert_eq!((vm.memory_mib(), vm.max_memory_mib()), (64, 64));
    vm.kill().expect("kill");
    vm.wait().expect("wait");
    drop(vm);

    // The controller is the first MMIO allocation of a VM without virtio devices.
    let base = crate::kvm::boot::layout::MMIO_GAP_START;
    let mut config = guest_config(&memory_stand_in(base, true), 1, tmp.path());
    config.memory.hotplug_mib = 256;
    let vm = KvmVm::create(config).expect("create");
    assert!(matches!(
        vm.resize_memory(192),
        Err(VmError::WrongState {
            actual: "created",
            ..
        })
    ));
    vm.start().expect("start");
    assert_eq!((vm.memory_mib(), vm.max_memory_mib()), (64, 320));
    let boot_regions = regions(&vm);
    assert_eq!(vm.resize_memory(64).expect("no change"), 64);
    for round in 0..2 {
        assert_eq!(vm.resize_memory(320).expect("add"), 320, "round {round}");
        assert_eq!(regions(&vm), boot_regions + 2);
        assert_eq!(hotplug_memfds(), 2);
        assert!(vm.control.exit().is_none(), "{:?}", vm.control.exit());
        assert_eq!(vm.resize_memory(192).expect("remove"), 192, "round {round}");
        assert_eq!(regions(&vm), boot_regions + 1);
        assert_eq!(hotplug_memfds(), 1, "the removed block's memfd is closed");
        assert_eq!(vm.resize_memory(64).expect("remove"), 64, "round {round}");
        assert_eq!(hotplug_memfds(), 0);
    }
    for bad in [0, 63, 100, 64 + 127, 448, u64::MAX] {
        let err = vm.resize_memory(bad).expect_err("refused");
        assert!(matches!(err, VmError::Unsupported(_)), "{bad}: {err}");
    }
    vm.pause().expect("pause");
    assert!(matches!(
        vm.resize_memory(192),
        Err(VmError::WrongState {
            actual: "paused",
            ..
        })
    ));
    vm.resume().expect("resume");
    assert_eq!(vm.memory_mib(), 64, "refusals changed nothing");
    vm.kill().expect("kill");
    assert_eq!(vm.wait().expect("wait"), VmExit::PowerOff);
    drop(vm);

    // A guest that never answers: nothing stays plugged or mapped.
    let mut config = guest_config(HALT_FOREVER, 1, tmp.path());
    config.memory.hotplug_mib = 128;
    let vm = KvmVm::create(config).expect("create");
    vm.memory
        .set_ack_timeout(std::time::Duration::from_millis(500));
    vm.start().expect("start");
    let err = vm.resize_memory(192).expect_err("never acknowledged");
    assert!(err.to_string().contains("did not acknowledge"), "{err}");
    assert_eq!(vm.memory_mib(), 64);
    assert_eq!(hotplug_memfds(), 0);
    vm.kill().expect("kill");
    vm.wait().expect("wait");
    drop(vm);

    // A guest that cannot give memory back: the block stays.
    let mut config = guest_config(&memory_stand_in(base, false), 1, tmp.path());
    config.memory.hotplug_mib = 128;
    let vm = KvmVm::create(config).expect("create");
    vm.memory
        .set_ack_timeout(std::time::Duration::from_millis(500));
    vm.start().expect("start");
    assert_eq!(vm.resize_memory(192).expect("add"), 192);
    let err = vm.resize_memory(64).expect_err("not given back");
    assert!(err.to_string().contains("did not give back"), "{err}");
    assert_eq!(vm.memory_mib(), 192);
    assert_eq!(hotplug_memfds(), 1);
    vm.kill().expect("kill");
    vm.wait().expect("wait");
    drop(vm);
    assert_eq!(hotplug_memfds(), 0, "the VM's end releases its blocks");
    assert_eq!(
        settle_to((threads_before, fds_before)),
        (threads_before, fds_before)
    );
}

/// Exit counters: ours by port (the boot timer and the i8042 reset), and
/// KVM's own through its statistics fd.
#[test]
fn exits_are_counted_by_port_and_by_kvm() {
    if !kvm_here_or_in_lab("kvm::tests::exits_are_counted_by_port_and_by_kvm") {
        return;
    }
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let vm = guest(TIMER_THEN_RESET, 1);
    vm.start().expect("start");
    assert_eq!(vm.wait().expect("wait"), VmExit::Reboot);
    let stats = vm.exit_stats().expect("the KVM backend counts exits");
    let count = |what: &str| {
        stats
            .by_address
            .iter()
            .find(|c| c.what == what)
            .map(|c| c.count)
    };
    assert_eq!(count("io-out 0x440"), Some(1), "{stats}");
    assert_eq!(count("io-out 0x64"), Some(1), "{stats}");
    assert!(stats.total >= 2, "{stats}");
    let kvm_exits = stats.kvm.iter().find(|c| c.what == "exits");
    assert!(
        kvm_exits.is_some_and(|c| c.count >= stats.total),
        "KVM's own counters (KVM_GET_STATS_FD, Linux 5.14+) missing or short: {stats}"
    );
}

#[test]
fn virtio_devices_are_reported_with_their_interrupt_pins() {
    if !kvm_here_or_in_lab("kvm::tests::virtio_devices_are_reported_with_their_interrupt_pins") {
        return;
    }
    let _serial = VM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = guest_config(HALT_FOREVER, 1, tmp.path());
    config.devices = vec![crate::config::DeviceConfig::Rng];
    let vm = KvmVm::create(config).expect("create");
    let report = vm.virtio_report().expect("report");
    assert_eq!(report.len(), 1, "{report:?}");
    let rng = &report[0];
    assert_eq!(rng.kind, "rng");
    assert_eq!(rng.transport.device_type, 4);
    assert!(!rng.transport.activated);
    assert_eq!(rng.transport.queues.len(), 1);
    assert_eq!(rng.transport.queues[0].used_idx, None, "no ring yet");
    let pin = rng.pin.expect("KVM's IOAPIC state");
    assert!(pin.masked, "nobody programmed the pin yet: {pin:?}");
    let json = serde_json::to_string(&report).expect("json");
    assert!(json.contains(r#""kind":"rng""#), "{json}");
}

/// Every confined thread class at work in trap mode (a forbidden call would
/// end this test process with exit code 159 and name the call): vCPUs and the
/// event loop run a guest with virtio devices (a disk's I/O thread confines
/// itself as the VM is made), and the control socket's
/// thread reports the devices, adds and removes vCPUs (starting vCPU threads
/// from a confined thread) and memory (a new memfd mapped into the VM).
#[test]
fn confined_threads_run_report_and_resize_a_vm_through_the_control_socket() {
    if !kvm_here_or_in_lab(
        "kvm::tests::confined_threads_run_report_and_resize_a_vm_through_the_control_socket",
    ) {
        return;
    }
    use crate::api::{request, ApiServer, Request};
    use crate::seccomp::SeccompMode;
    use std::sync::Arc;
    use std::time::Duration;
    let _one_at_a_time = VM_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let (threads_before, fds_before) = vcpu_threads_and_kvm_fds();
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket = tmp.path().join("api.sock");
    let call = |r: Request| {
        let reply = request(&socket, &r, Duration::from_secs(60)).expect("control socket");
        assert!(reply.ok, "{r:?}: {:?}", reply.error);
        reply
    };

    // vCPU hotplug (the stand-in is the CPU controller's guest side), with
    // an rng device beside it: where the controller's page lands is read
    // from a first, unstarted VM of the same shape.
    // A disk too: its I/O thread confines itself as the VM is made.
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let shaped = |code: &[u8]| {
        let mut config = guest_config(code, 1, tmp.path());
        config.vcpus.max = 2;
        config.devices = vec![
            crate::config::DeviceConfig::Rng,
            crate::config::DeviceConfig::Block {
                path: disk.clone(),
                read_only: false,
            },
        ];
        config.seccomp = SeccompMode::Trap;
        config
    };
    let base = {
        let probe = KvmVm::create(shaped(HALT_FOREVER)).expect("create");
        let base = beacon_common::lock(&probe.devices)
            .hotplug_info()
            .map(|h| h.base);
        base.expect("a hotplug controller")
    };
    let vm: Arc<KvmVm> = Arc::new(KvmVm::create(shaped(&hotplug_stand_in(base))).expect("create"));
    vm.start().expect("start");
    let server = ApiServer::start(&socket, vm.clone()).expect("serve");
    let devices = call(Request::Devices {}).devices.expect("devices");
    assert_eq!(devices.len(), 2, "{devices:?}");
    for round in 0..2 {
        let up = call(Request::Resize {
            cpus: Some(2),
            memory_mib: None,
        });
        assert_eq!(up.info.expect("info").vcpus, 2, "round {round}");
        let down = call(Request::Resize {
            cpus: Some(1),
            memory_mib: None,
        });
        assert_eq!(down.info.expect("info").vcpus, 1, "round {round}");
    }
    drop(server);
    vm.kill().expect("kill");
    assert_eq!(vm.wait().expect("wait"), VmExit::PowerOff);
    drop(vm);

    // Memory hotplug (no virtio device: the controller's page comes first).
    let base = crate::kvm::boot::layout::MMIO_GAP_START;
    let mut config = guest_config(&memory_stand_in(base, true), 1, tmp.path());
    config.memory.hotplug_mib = 256;
    config.seccomp = SeccompMode::Trap;
    let vm: Arc<KvmVm> = Arc::new(KvmVm::create(config).expect("create"));
    vm.start().expect("start");
    let server = ApiServer::start(&socket, vm.clone()).expect("serve");
    for (total, blocks) in [(320, 2), (192, 1), (64, 0)] {
        let r = call(Request::Resize {
            cpus: None,
            memory_mib: Some(total),
        });
        assert_eq!(r.info.expect("info").memory_mib, total);
        assert_eq!(hotplug_memfds(), blocks);
    }
    assert_eq!(call(Request::Info {}).info.expect("info").vcpus, 1);
    drop(server);
    vm.kill().expect("kill");
    assert_eq!(vm.wait().expect("wait"), VmExit::PowerOff);
    drop(vm);
    assert_eq!(
        settle_to((threads_before, fds_before)),
        (threads_before, fds_before)
    );
}
