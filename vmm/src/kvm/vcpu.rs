//! One vCPU: its boot-time register state and the thread that runs it.
//!
//! Setup gives every vCPU its CPUID, MSRs, FPU state and LAPIC wiring (LINT0 =
//! ExtINT for the PIC, LINT1 = NMI), and the registers of the chosen boot entry.
//! Application processors get the same registers, but with the in-kernel irqchip
//! KVM holds them until the guest sends INIT/SIPI, which resets them.
//!
//! The run loop routes port and MMIO exits to the buses and turns the exits that
//! end a VM into a [`VmExit`] recorded in [`VcpuControl`]. Nothing the guest does
//! can panic this loop: unclaimed accesses read as all-ones and writes vanish.

use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use beacon_devices::Bus;
use kvm_bindings::{
    kvm_fpu, kvm_regs, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::boot::cpuid::filter_cpuid;
use super::boot::gdt::{segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::boot::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use super::boot::BootEntry;
use super::builder::hv;
use super::control::VcpuControl;
use super::exit_stats::{ExitCounter, ExitKind, SharedExitStats};
use crate::backend::{VmError, VmExit};
use crate::seccomp::{self, SeccompMode, ThreadClass};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// What every vCPU is set up from.
pub struct VcpuSetup<'a> {
    pub vcpus: u8,
    pub entry: BootEntry,
    pub supported_cpuid: &'a CpuId,
    pub msrs: &'a [kvm_bindings::kvm_msr_entry],
}

/// Set vCPU `id` up for boot.
pub fn configure(fd: &VcpuFd, id: u8, setup: &VcpuSetup<'_>) -> Result<(), VmError> {
    let mut entries = setup.supported_cpuid.as_slice().to_vec();
    filter_cpuid(&mut entries, id, setup.vcpus);
    let cpuid = CpuId::from_entries(&entries).map_err(|e| VmError::Hypervisor {
        what: format!("building CPUID for vCPU {id}"),
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(hv(format!("KVM_SET_CPUID2 on vCPU {id}")))?;

    let msrs = Msrs::from_entries(setup.msrs).map_err(|e| VmError::Hypervisor {
        what: format!("building MSRs for vCPU {id}"),
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(hv(format!("KVM_SET_MSRS on vCPU {id}")))?;
    if let Some(failed) = setup.msrs.get(written) {
        return Err(VmError::Hypervisor {
            what: format!("KVM_SET_MSRS on vCPU {id}"),
            source: std::io::Error::other(format!(
                "KVM refused MSR {:#x}; this host's KVM cannot run the guest as configured",
                failed.index
            )),
        });
    }

    set_boot_registers(fd, id, setup.entry)?;
    fd.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
    .map_err(hv(format!("KVM_SET_FPU on vCPU {id}")))?;

    let mut lapic = fd
        .get_lapic()
        .map_err(hv(format!("KVM_GET_LAPIC on vCPU {id}")))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic)
        .map_err(hv(format!("KVM_SET_LAPIC on vCPU {id}")))?;
    Ok(())
}

/// Set the delivery mode (bits 10:8) of the LAPIC LVT register at `offset`.
fn set_lvt_mode(regs: &mut [c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (b, r) in raw.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as c_char;
    }
}

fn set_boot_registers(fd: &VcpuFd, id: u8, entry: BootEntry) -> Result<(), VmError> {
    let mut sregs = fd
        .get_sregs()
        .map_err(hv(format!("KVM_GET_SREGS on vCPU {id}")))?;
    let gdt = entry.gdt();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry } => {
            // 32-bit protected mode, paging off (PVH boot ABI).
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_ADDR;
        }
        BootEntry::Linux64 { entry } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    fd.set_sregs(&sregs)
        .map_err(hv(format!("KVM_SET_SREGS on vCPU {id}")))?;
    fd.set_regs(&regs)
        .map_err(hv(format!("KVM_SET_REGS on vCPU {id}")))?;
    Ok(())
}

/// Everything a vCPU thread needs.
pub struct VcpuThread {
    pub id: u8,
    pub fd: VcpuFd,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub first_run: Arc<OnceLock<Duration>>,
    pub created: Instant,
    /// Set (and the thread kicked) when hot-remove retires this vCPU.
    pub retire: Arc<AtomicBool>,
    /// Where this vCPU's exit counts go when it leaves.
    pub exits: Arc<SharedExitStats>,
    /// How the thread confines itself before its first `KVM_RUN`.
    pub seccomp: SeccompMode,
}

/// What one exit means for the loop.
enum Step {
    Continue,
    End(VmExit),
    /// Ends the VM as crashed; the registers are added to the message.
    Crash(String),
    /// KVM_EXIT_INTERNAL_ERROR: the details are read from `kvm_run` afterwards.
    InternalError,
}

impl VcpuThread {
    /// Run until the VM stops or this vCPU is retired, and hand the fd back
    /// (KVM cannot destroy a vCPU: a later hot-add reuses it). The exit reason
    /// goes to the shared control.
    pub fn run(mut self) -> VcpuFd {
        let id = self.id;
        seccomp::confine_or_warn(ThreadClass::Vcpu, self.seccomp);
        let mut counter = ExitCounter::default();
        while !self.control.should_stop() && !self.retire.load(Ordering::Acquire) {
            self.control.park_if_paused();
            if self.control.should_stop() || self.retire.load(Ordering::Acquire) {
                break;
            }
            self.first_run.get_or_init(|| self.created.elapsed());
            let step = match self.fd.run() {
                Ok(exit) => {
                    let (kind, address) = classify(&exit);
                    counter.count(kind, address);
                    Self::handle(id, exit, &self.io_bus, &self.mmio_bus)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    counter.count(ExitKind::Intr, 0);
                    Step::Continue
                }
                Err(e) => Step::Crash(format!("vCPU {id}: KVM_RUN failed: {e}")),
            };
            match step {
                Step::Continue => {}
                Step::End(exit) => {
                    tracing::info!(vcpu = id, ?exit, "guest ended the VM");
                    self.control.request_stop(exit);
                }
                Step::Crash(what) => self.crash(what),
                Step::InternalError => {
                    let what = self.internal_error();
                    self.crash(what);
                }
            }
        }
        tracing::debug!(vcpu = id, "vCPU thread leaving");
        match super::exit_stats::kvm_vcpu_counters(&self.fd) {
            Ok(kvm) => counter.set_kvm_counters(kvm),
            Err(e) => tracing::debug!(vcpu = id, "KVM's statistics are not readable: {e}"),
        }
        self.exits.merge(&counter);
        self.fd
    }

    fn crash(&self, what: String) {
        let regs = describe_registers(&self.fd);
        tracing::error!(vcpu = self.id, "{what}; {regs}");
        self.control
            .request_stop(VmExit::Crashed(format!("{what}; {regs}")));
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // kvm_run union is the one KVM filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        format!(
            "vCPU {}: KVM internal error (suberror {suberror}{}); the guest ran something KVM cannot emulate",
            self.id,
            if suberror == 1 { ": emulation failure" } else { "" }
        )
    }

    fn handle(id: u8, exit: VcpuExit<'_>, io: &Bus, mmio: &Bus) -> Step {
        match exit {
            VcpuExit::IoOut(port, data) => {
                if !io.write(u64::from(port), data) {
                    tracing::trace!(port, len = data.len(), "unclaimed port write");
                }
                Step::Continue
            }
            VcpuExit::IoIn(port, data) => {
                if !io.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !mmio.write(addr, data) {
                    tracing::debug!(addr, len = data.len(), "unclaimed MMIO write");
                }
                Step::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !mmio.read(addr, data) {
                    tracing::debug!(addr, len = data.len(), "unclaimed MMIO read");
                    data.fill(0xff);
                }
                Step::Continue
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
            // With the in-kernel irqchip HLT stays in the kernel; an exit here means
            // the guest halted for good.
            VcpuExit::Hlt => Step::End(VmExit::PowerOff),
            VcpuExit::Shutdown => Step::Crash(format!(
                "vCPU {id}: guest triple fault (KVM_EXIT_SHUTDOWN); if this was a reboot, boot with reboot=k so it goes through the i8042"
            )),
            VcpuExit::FailEntry(reason, cpu) => Step::Crash(format!(
                "vCPU {id}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu})"
            )),
            VcpuExit::InternalError => Step::InternalError,
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::End(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Step::End(VmExit::Reboot),
                KVM_SYSTEM_EVENT_CRASH => {
                    Step::Crash(format!("vCPU {id}: guest reported a crash (system event)"))
                }
                other => {
                    tracing::warn!(vcpu = id, kind = other, "ignored KVM system event");
                    Step::Continue
                }
            },
            other => Step::Crash(format!("vCPU {id}: unexpected KVM exit {other:?}")),
        }
    }
}

/// The reason and address (port or guest-physical) of one exit, for counting.
fn classify(exit: &VcpuExit<'_>) -> (ExitKind, u64) {
    match exit {
        VcpuExit::IoIn(port, _) => (ExitKind::IoIn, u64::from(*port)),
        VcpuExit::IoOut(port, _) => (ExitKind::IoOut, u64::from(*port)),
        VcpuExit::MmioRead(addr, _) => (ExitKind::MmioRead, *addr),
        VcpuExit::MmioWrite(addr, _) => (ExitKind::MmioWrite, *addr),
        VcpuExit::Hlt => (ExitKind::Hlt, 0),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => (ExitKind::Intr, 0),
        VcpuExit::SystemEvent(..) => (ExitKind::SystemEvent, 0),
        _ => (ExitKind::Other, 0),
    }
}

/// "rip=… rsp=… cr0=… cr3=… cr4=… efer=…" of a stopped vCPU, for crash reports.
pub fn describe_registers(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_changes_only_delivery_bits() {
        let mut regs = [0 as c_char; 1024];
        // Masked (bit 16) with vector 0x30 and some old mode.
        let old: u32 = 0x0001_0330;
        for (r, b) in regs[APIC_LVT_LINT0..APIC_LVT_LINT0 + 4]
            .iter_mut()
            .zip(old.to_le_bytes())
        {
            *r = b as c_char;
        }
        set_lvt_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        let read = |off: usize| {
            u32::from_le_bytes([
                regs[off] as u8,
                regs[off + 1] as u8,
                regs[off + 2] as u8,
                regs[off + 3] as u8,
            ])
        };
        assert_eq!(read(APIC_LVT_LINT0), 0x0001_0730);
        assert_eq!(read(APIC_LVT_LINT1), 0x0000_0400);
    }
}
