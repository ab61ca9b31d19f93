//! DSDT AML for vCPU and memory hotplug: a Generic Event Device (`GED0`,
//! `ACPI0013`), a processor container (`CPUS`, `ACPI0010`) with one processor
//! device (`C000`, `C001`, ... `ACPI0007`) per possible vCPU, and, when the VM
//! has a memory hotplug room, a memory hotplug container (`MHPC`) with one
//! memory device (`M000`, ... `PNP0C80`) per block of the room, so a stock
//! Linux guest learns of added CPUs and memory and gives removed ones back
//! with no guest patches.
//!
//! This module owns only the AML bytes; it never touches KVM or the buses. The
//! register page the AML reads and writes (one MMIO page at a base chosen at
//! run time) is [`beacon_devices::hotplug`]'s, and every offset and bit here
//! comes from its constants.
//!
//! What the guest does with it:
//! - The VMM sets [`EVENT_CPU`] in `GED_EVENTS` and raises the GED's
//!   (level-triggered) interrupt; the guest's GED driver runs `_EVT`, which
//!   reads the events once (the read clears them) and calls `CPUS.CSCN`.
//! - `CSCN` walks every CPU slot under the `CPLK` mutex: an inserting CPU gets
//!   a device-check notification and its insertion is acknowledged, a CPU the
//!   VMM wants back gets an eject request and the request is acknowledged.
//! - Each processor device's `_STA` reads its enabled bit, `_MAT` is its MADT
//!   Local APIC entry (processor UID = APIC ID = index, as in the MADT) and
//!   `_EJ0` tells the device the guest let the CPU go.
//! - Memory works the same way through [`MEM_SELECT`] and [`MEM_STATUS`]:
//!   [`EVENT_MEMORY`] makes `_EVT` call `MHPC.MSCN`; each memory device's
//!   `_CRS` is its block's fixed range, `_STA` its enabled bit, `_EJ0` the
//!   guest giving it back (after it offlined the block).

use acpi_tables::aml::{
    Acquire, Add, And, Arg, BufferData, Device, EISAName, Else, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, LessThan, Local, Method, MethodCall,
    Mutex, Name, Notify, OpRegion, OpRegionSpace, Path, Release, ResourceTemplate, Return, Store,
    While, ONE, ZERO,
};
use acpi_tables::aml::{AddressSpace, AddressSpaceCacheable};
use acpi_tables::Aml;
use beacon_devices::hotplug::{
    CPU_EJECT, CPU_ENABLED, CPU_INSERTING, CPU_REMOVING, CPU_SELECT, CPU_STATUS, EVENT_CPU,
    EVENT_MEMORY, GED_EVENTS, HOTPLUG_REGION_SIZE, MEM_SELECT, MEM_STATUS,
};

use super::{to_bytes, AcpiError, RawAml};

/// `Notify` value: re-check the device (a CPU or memory block was added).
const NOTIFY_DEVICE_CHECK: u8 = 1;
/// `Notify` value: the platform asks the guest to eject the device.
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// `_STA` of a present device: present, enabled, shown in the UI, functioning.
const STA_PRESENT: u8 = 0x0f;
/// `Acquire` timeout meaning "wait forever".
const WAIT_FOREVER: u16 = 0xffff;
/// MADT Processor Local APIC entry: type and length.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_APIC_LEN: u8 = 8;
/// MADT Local APIC flag: the CPU is enabled (usable now).
const MADT_LAPIC_ENABLED: u32 = 1;

/// The names one kind of hotpluggable slot uses inside its container: the
/// register region and fields, the lock, the helper methods and the devices.
/// CPUs and memory blocks share every method's shape; only these differ.
struct SlotKind {
    container: &'static str,
    region: &'static str,
    lock: &'static str,
    select_offset: u64,
    status_offset: u64,
    select: &'static [u8; 4],
    enabled: &'static [u8; 4],
    inserting: &'static [u8; 4],
    removing: &'static [u8; 4],
    /// Not `xEJ0`: that is the eject method's name in the same scope.
    eject: &'static [u8; 4],
    status_method: &'static str,
    eject_method: &'static str,
    scan_method: &'static str,
    notify_method: &'static str,
    /// The device name's first letter (`C000`, `M000`).
    device_prefix: char,
}

const CPUS: SlotKind = SlotKind {
    container: "CPUS",
    region: "PRST",
    lock: "CPLK",
    select_offset: CPU_SELECT,
    status_offset: CPU_STATUS,
    select: b"CSEL",
    enabled: b"CPEN",
    inserting: b"CINS",
    removing: b"CRMV",
    eject: b"CEJF",
    status_method: "CSTA",
    eject_method: "CEJ0",
    scan_method: "CSCN",
    notify_method: "CTFY",
    device_prefix: 'C',
};

const MEMORY: SlotKind = SlotKind {
    container: "MHPC",
    region: "MRST",
    lock: "MLCK",
    select_offset: MEM_SELECT,
    status_offset: MEM_STATUS,
    select: b"MSEL",
    enabled: b"MEN_",
    inserting: b"MINS",
    removing: b"MRMV",
    eject: b"MEJF",
    status_method: "MSTA",
    eject_method: "MEJ0",
    scan_method: "MSCN",
    notify_method: "MTFY",
    device_prefix: 'M',
};

const GED_REGION: &str = "GEDR";
const FIELD_EVENTS: &[u8; 4] = b"GDAT";
/// The most memory blocks the AML names (`M000`..`MFFF`).
pub const MAX_MEMORY_BLOCKS: usize = 0x1000;

// Each status field is one bit of the status byte; the selectors and status
// bytes must sit in the page.
const _: () = {
    assert!(CPU_ENABLED.count_ones() == 1);
    assert!(CPU_INSERTING.count_ones() == 1);
    assert!(CPU_REMOVING.count_ones() == 1);
    assert!(CPU_EJECT.count_ones() == 1);
    assert!(EVENT_CPU != 0);
    assert!(EVENT_MEMORY != 0 && EVENT_MEMORY & EVENT_CPU == 0);
    assert!(GED_EVENTS + 4 <= HOTPLUG_REGION_SIZE);
    assert!(CPU_SELECT + 4 <= HOTPLUG_REGION_SIZE);
    assert!(CPU_STATUS < HOTPLUG_REGION_SIZE);
    assert!(MEM_SELECT + 4 <= HOTPLUG_REGION_SIZE);
    assert!(MEM_STATUS < HOTPLUG_REGION_SIZE);
};

impl SlotKind {
    /// The AML name of device `index` (`C000`..`C0FE`, `M000`..`MFFF`).
    fn device_name(&self, index: usize) -> String {
        format!("{}{index:03X}", self.device_prefix)
    }

    /// `\_SB_.<container>.<scan>`, which `_EVT` calls.
    fn scan_path(&self) -> String {
        format!("\\_SB_.{}.{}", self.container, self.scan_method)
    }

    /// The region over the register page and the selector and status fields.
    fn registers(&self, base: u32) -> Vec<u8> {
        let region = OpRegion::new(
            Path::new(self.region),
            OpRegionSpace::SystemMemory,
            &base,
            &HOTPLUG_REGION_SIZE,
        );
        let select = register_field(
            self.region,
            self.select_offset,
            FieldAccessType::DWord,
            vec![FieldEntry::Named(*self.select, u32::BITS as usize)],
        );
        let status = register_field(
            self.region,
            self.status_offset,
            FieldAccessType::Byte,
            status_bits(&[
                (self.enabled, CPU_ENABLED),
                (self.inserting, CPU_INSERTING),
                (self.removing, CPU_REMOVING),
                (self.eject, CPU_EJECT),
            ]),
        );
        let lock = Mutex::new(Path::new(self.lock), 0);
        let mut aml = Vec::new();
        region.to_aml_bytes(&mut aml);
        select.to_aml_bytes(&mut aml);
        status.to_aml_bytes(&mut aml);
        lock.to_aml_bytes(&mut aml);
        aml
    }

    /// `xSTA(i)`: `_STA` of device `i`.
    fn status_method(&self) -> Vec<u8> {
        let acquire = Acquire::new(Path::new(self.lock), WAIT_FOREVER);
        let select_field = field_path(self.select);
        let select = Store::new(&select_field, &Arg(0));
        let absent = Store::new(&Local(0), &ZERO);
        let enabled_field = field_path(self.enabled);
        let enabled = Equal::new(&enabled_field, &ONE);
        let present = Store::new(&Local(0), &STA_PRESENT);
        let if_enabled = If::new(&enabled, vec![&present]);
        let release = Release::new(Path::new(self.lock));
        let ret = Return::new(&Local(0));
        to_bytes(&Method::new(
            Path::new(self.status_method),
            1,
            true,
            vec![&acquire, &select, &absent, &if_enabled, &release, &ret],
        ))
    }

    /// `xEJ0(i)`: tell the device the guest ejected `i`.
    fn eject_method(&self) -> Vec<u8> {
        let acquire = Acquire::new(Path::new(self.lock), WAIT_FOREVER);
        let select_field = field_path(self.select);
        let select = Store::new(&select_field, &Arg(0));
        let eject_field = field_path(self.eject);
        let eject = Store::new(&eject_field, &ONE);
        let release = Release::new(Path::new(self.lock));
        to_bytes(&Method::new(
            Path::new(self.eject_method),
            1,
            true,
            vec![&acquire, &select, &eject, &release],
        ))
    }

    /// `xTFY(i, event)`: `Notify` device `i` of `event` (`Notify` needs the
    /// object by name, hence one test per device).
    fn notify_method(&self, count: usize) -> Vec<u8> {
        let mut body = Vec::new();
        for index in 0..count {
            let name = Path::new(&self.device_name(index));
            let notify = Notify::new(&name, &Arg(1));
            let is_it = Equal::new(&Arg(0), &index);
            If::new(&is_it, vec![&notify]).to_aml_bytes(&mut body);
        }
        let body = RawAml(&body);
        to_bytes(&Method::new(
            Path::new(self.notify_method),
            2,
            false,
            vec![&body],
        ))
    }

    /// `xSCN()`: notify and acknowledge every pending insertion and removal
    /// request.
    fn scan_method(&self, count: usize) -> Vec<u8> {
        let index = Local(0);
        let acquire = Acquire::new(Path::new(self.lock), WAIT_FOREVER);
        let start = Store::new(&index, &ZERO);
        let more = LessThan::new(&index, &count);
        let select_field = field_path(self.select);
        let select = Store::new(&select_field, &index);

        let inserting_field = field_path(self.inserting);
        let inserting = Equal::new(&inserting_field, &ONE);
        let notify_check = MethodCall::new(
            Path::new(self.notify_method),
            vec![&index, &NOTIFY_DEVICE_CHECK],
        );
        let ack_insert = Store::new(&inserting_field, &ONE);
        let if_inserting = If::new(&inserting, vec![&notify_check, &ack_insert]);

        let removing_field = field_path(self.removing);
        let removing = Equal::new(&removing_field, &ONE);
        let notify_eject = MethodCall::new(
            Path::new(self.notify_method),
            vec![&index, &NOTIFY_EJECT_REQUEST],
        );
        let ack_remove = Store::new(&removing_field, &ONE);
        let if_removing = If::new(&removing, vec![&notify_eject, &ack_remove]);
        let else_removing = Else::new(vec![&if_removing]);

        let step = Add::new(&index, &index, &ONE);
        let walk = While::new(&more, vec![&select, &if_inserting, &else_removing, &step]);
        let release = Release::new(Path::new(self.lock));
        to_bytes(&Method::new(
            Path::new(self.scan_method),
            0,
            true,
            vec![&acquire, &start, &walk, &release],
        ))
    }

    /// The registers, the lock and the helper methods for `count` devices.
    fn common(&self, base: u32, count: usize) -> Vec<u8> {
        [
            self.registers(base),
            self.status_method(),
            self.eject_method(),
            self.notify_method(count),
            self.scan_method(count),
        ]
        .concat()
    }

    /// `_STA` and `_EJ0` of device `index`, through the helper methods.
    fn device_methods(&self, index: usize) -> Vec<u8> {
        let status = MethodCall::new(Path::new(self.status_method), vec![&index]);
        let status_ret = Return::new(&status);
        let sta = Method::new(Path::new("_STA"), 0, false, vec![&status_ret]);
        let eject = MethodCall::new(Path::new(self.eject_method), vec![&index]);
        let ej0 = Method::new(Path::new("_EJ0"), 1, false, vec![&eject]);
        [to_bytes(&sta), to_bytes(&ej0)].concat()
    }
}

/// A field list over `region` that starts `offset` bytes into it.
fn register_field(
    region: &str,
    offset: u64,
    access: FieldAccessType,
    mut entries: Vec<FieldEntry>,
) -> Field {
    // Offsets are the device's constants, checked above to lie in the page.
    let bits = offset as usize * 8;
    if bits > 0 {
        entries.insert(0, FieldEntry::Reserved(bits));
    }
    Field::new(
        Path::new(region),
        access,
        FieldLockRule::NoLock,
        // A write of one bit writes zeros to the rest: the device takes each
        // 1 written to the status byte as a command.
        FieldUpdateRule::WriteAsZeroes,
        entries,
    )
}

/// One-bit fields named after the status bits they stand for, in bit order,
/// with the gaps between them reserved.
fn status_bits(bits: &[(&[u8; 4], u8)]) -> Vec<FieldEntry> {
    let mut sorted: Vec<(&[u8; 4], u32)> = bits
        .iter()
        .map(|(name, mask)| (*name, mask.trailing_zeros()))
        .collect();
    sorted.sort_by_key(|(_, bit)| *bit);
    let mut entries = Vec::new();
    let mut next = 0;
    for (name, bit) in sorted {
        if bit > next {
            entries.push(FieldEntry::Reserved((bit - next) as usize));
        }
        entries.push(FieldEntry::Named(*name, 1));
        next = bit + 1;
    }
    entries
}

/// The MADT Processor Local APIC entry of CPU `index`, enabled.
fn madt_local_apic(index: u8) -> Vec<u8> {
    let mut entry = vec![MADT_LOCAL_APIC, MADT_LOCAL_APIC_LEN, index, index];
    entry.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    entry
}

/// Processor device `index`: its status, MADT entry and eject method.
fn cpu_device(index: u8) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"ACPI0007");
    let uid = Name::new(Path::new("_UID"), &index);
    let mat_buf = BufferData::new(madt_local_apic(index));
    let mat_ret = Return::new(&mat_buf);
    let mat = Method::new(Path::new("_MAT"), 0, false, vec![&mat_ret]);
    let methods = CPUS.device_methods(usize::from(index));
    let methods = RawAml(&methods);
    to_bytes(&Device::new(
        Path::new(&CPUS.device_name(usize::from(index))),
        vec![&hid, &uid, &methods, &mat],
    ))
}

/// Memory device `index`: the block `(base, bytes)`, its status and eject
/// method.
fn memory_device(index: usize, (base, len): (u64, u64)) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C80"));
    let uid = Name::new(Path::new("_UID"), &index);
    // Blocks are non-empty and end far below 2^64 (the VMM's layout).
    let range = AddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        base,
        base + len.max(1) - 1,
        None,
    );
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&range]));
    let methods = MEMORY.device_methods(index);
    let methods = RawAml(&methods);
    to_bytes(&Device::new(
        Path::new(&MEMORY.device_name(index)),
        vec![&hid, &uid, &crs, &methods],
    ))
}

/// The path of register field `name` (from the same scope).
fn field_path(name: &[u8; 4]) -> Path {
    Path::new(&String::from_utf8_lossy(name))
}

/// `\_SB_.CPUS`: the processor container with the register fields, the lock,
/// the helper methods and one processor device per possible CPU.
fn cpus_device(base: u32, max_vcpus: u8) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"ACPI0010");
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A05"));
    let mut rest = CPUS.common(base, usize::from(max_vcpus));
    for index in 0..max_vcpus {
        rest.extend(cpu_device(index));
    }
    let rest = RawAml(&rest);
    to_bytes(&Device::new(
        Path::new(CPUS.container),
        vec![&hid, &cid, &rest],
    ))
}

/// `\_SB_.MHPC`: the memory hotplug container (a generic container,
/// `PNP0A06`) with the register fields, the lock, the helper methods and one
/// memory device per block of the hotplug room.
fn memory_container(base: u32, blocks: &[(u64, u64)]) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A06"));
    let uid = Name::new(Path::new("_UID"), &"Memory hotplug");
    let mut rest = MEMORY.common(base, blocks.len());
    for (index, block) in blocks.iter().enumerate() {
        rest.extend(memory_device(index, *block));
    }
    let rest = RawAml(&rest);
    to_bytes(&Device::new(
        Path::new(MEMORY.container),
        vec![&hid, &uid, &rest],
    ))
}

/// `\_SB_.GED0`: the Generic Event Device; its interrupt runs `_EVT`, which
/// scans the CPUs and, with a memory room, the memory blocks.
fn ged_device(base: u32, gsi: u32, with_memory: bool) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"ACPI0013");
    let uid = Name::new(Path::new("_UID"), &0u8);
    // Level-triggered, active high, exclusive: the VMM raises it through a
    // resample irqfd and keeps it up until the guest's EOI.
    let irq = Interrupt::new(true, false, false, false, gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq]));
    let region = OpRegion::new(
        Path::new(GED_REGION),
        OpRegionSpace::SystemMemory,
        &base,
        &HOTPLUG_REGION_SIZE,
    );
    let events = register_field(
        GED_REGION,
        GED_EVENTS,
        FieldAccessType::DWord,
        vec![FieldEntry::Named(*FIELD_EVENTS, u32::BITS as usize)],
    );
    // Reading the events clears them: read once, then test the copy.
    let events_field = field_path(FIELD_EVENTS);
    let read = Store::new(&Local(0), &events_field);
    let cpu_bit = And::new(&ZERO, &Local(0), &EVENT_CPU);
    let cpu_event = Equal::new(&cpu_bit, &EVENT_CPU);
    let cpu_scan_path = CPUS.scan_path();
    let cpu_scan = MethodCall::new(Path::new(&cpu_scan_path), vec![]);
    let if_cpu = If::new(&cpu_event, vec![&cpu_scan]);
    let memory_bit = And::new(&ZERO, &Local(0), &EVENT_MEMORY);
    let memory_event = Equal::new(&memory_bit, &EVENT_MEMORY);
    let memory_scan_path = MEMORY.scan_path();
    let memory_scan = MethodCall::new(Path::new(&memory_scan_path), vec![]);
    let if_memory = If::new(&memory_event, vec![&memory_scan]);
    let evt = if with_memory {
        Method::new(Path::new("_EVT"), 1, true, vec![&read, &if_cpu, &if_memory])
    } else {
        Method::new(Path::new("_EVT"), 1, true, vec![&read, &if_cpu])
    };
    to_bytes(&Device::new(
        Path::new("GED0"),
        vec![&hid, &uid, &crs, &region, &events, &evt],
    ))
}

/// The hotplug AML for the DSDT's `\_SB_` scope (next to
/// [`super::virtio_mmio_aml`]'s devices): the `CPUS` processor container with
/// `max_vcpus` processor devices, the `MHPC` memory container with one memory
/// device per `(guest address, bytes)` block of `memory_blocks` (none: no
/// container), and the `GED0` event device raising `gsi`, all over the
/// [`beacon_devices::hotplug`] register page at `base`.
pub fn hotplug_aml(
    base: u32,
    gsi: u32,
    max_vcpus: u8,
    memory_blocks: &[(u64, u64)],
) -> Result<Vec<u8>, AcpiError> {
    if max_vcpus == 0 {
        return Err(AcpiError::NoHotplugVcpus);
    }
    if u64::from(base) + HOTPLUG_REGION_SIZE > 1 << 32 {
        return Err(AcpiError::HotplugAbove4G(base));
    }
    if memory_blocks.len() > MAX_MEMORY_BLOCKS {
        return Err(AcpiError::TooManyMemoryBlocks(memory_blocks.len()));
    }
    let mut aml = cpus_device(base, max_vcpus);
    if !memory_blocks.is_empty() {
        aml.extend(memory_container(base, memory_blocks));
    }
    aml.extend(ged_device(base, gsi, !memory_blocks.is_empty()));
    Ok(aml)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn names_every_device_and_method() {
        let aml = hotplug_aml(0xd000_0000, 9, 3, &[]).expect("aml");
        for needle in [
            &b"ACPI0013"[..],
            b"ACPI0007",
            b"ACPI0010",
            b"CPUS",
            b"GED0",
            b"C000",
            b"C001",
            b"C002",
            b"CSCN",
            b"CSTA",
            b"CEJ0",
            b"CTFY",
            b"CPLK",
            b"_EVT",
            b"_EJ0",
            b"_MAT",
            b"_STA",
            b"GDAT",
            b"CSEL",
            b"CPEN",
            b"CINS",
            b"CRMV",
            b"CEJF",
        ] {
            assert!(
                contains(&aml, needle),
                "{}",
                String::from_utf8_lossy(needle)
            );
        }
        assert!(!contains(&aml, b"C003"), "only max_vcpus processor devices");
        assert_eq!(count(&aml, b"ACPI0007"), 3);
        assert_eq!(count(&aml, b"_EJ0"), 3);
    }

    #[test]
    fn regions_cover_the_register_page_at_base() {
        let aml = hotplug_aml(0xd000_0000, 9, 1, &[]).expect("aml");
        // OperationRegion: ExtOp, OpRegionOp, name, SystemMemory, DWord base,
        // Word length.
        let mut region = vec![0x5b, 0x80];
        region.extend_from_slice(b"PRST");
        region.extend_from_slice(&[0x00, 0x0c, 0x00, 0x00, 0x00, 0xd0, 0x0b]);
        region.extend_from_slice(&(HOTPLUG_REGION_SIZE as u16).to_le_bytes());
        assert!(contains(&aml, &region));
        region[2..6].copy_from_slice(b"GEDR");
        assert!(contains(&aml, &region));
    }

    #[test]
    fn ged_interrupt_is_level_active_high_exclusive() {
        let aml = hotplug_aml(0xd000_0000, 9, 1, &[]).expect("aml");
        // Extended IRQ descriptor: length 6, flags = consumer only, one GSI.
        let irq = [0x89, 6, 0, 0x01, 1, 9, 0, 0, 0];
        assert!(contains(&aml, &irq));
    }

    #[test]
    fn mat_is_an_enabled_local_apic_with_uid_and_id_the_index() {
        let aml = hotplug_aml(0xd000_0000, 9, 4, &[]).expect("aml");
        for i in 0..4u8 {
            assert!(contains(&aml, &[0, 8, i, i, 1, 0, 0, 0]), "CPU {i}");
        }
    }

    #[test]
    fn deterministic_and_grows_with_max_vcpus() {
        let a = hotplug_aml(0xd000_0000, 9, 2, &[]).expect("aml");
        assert_eq!(a, hotplug_aml(0xd000_0000, 9, 2, &[]).expect("aml"));
        let mut last = 0;
        for max in [1u8, 2, 8, 255] {
            let len = hotplug_aml(0xd000_0000, 9, max, &[]).expect("aml").len();
            assert!(len > last, "{max} CPUs: {len} bytes");
            last = len;
        }
        let all = hotplug_aml(0xd000_0000, 9, 255, &[]).expect("aml");
        assert!(contains(&all, b"C0FE"));
        assert!(!contains(&all, b"C0FF"));
    }

    #[test]
    fn status_bits_follow_the_device_constants() {
        let fields = status_bits(&[
            (CPUS.enabled, CPU_ENABLED),
            (CPUS.inserting, CPU_INSERTING),
            (CPUS.removing, CPU_REMOVING),
            (CPUS.eject, CPU_EJECT),
        ]);
        let mut bit = 0;
        for entry in fields {
            match entry {
                FieldEntry::Named(name, 1) => {
                    let mask = match &name {
                        b"CPEN" => CPU_ENABLED,
                        b"CINS" => CPU_INSERTING,
                        b"CRMV" => CPU_REMOVING,
                        b"CEJF" => CPU_EJECT,
                        other => panic!("unexpected field {other:?}"),
                    };
                    assert_eq!(1u8 << bit, mask);
                    bit += 1;
                }
                FieldEntry::Reserved(n) => bit += n,
                other => panic!("unexpected entry {other:?}"),
            }
        }
        // Gaps are reserved, not skipped.
        assert_eq!(
            status_bits(&[(b"AAAA", 1 << 3), (b"BBBB", 1 << 1)]),
            vec![
                FieldEntry::Reserved(1),
                FieldEntry::Named(*b"BBBB", 1),
                FieldEntry::Reserved(1),
                FieldEntry::Named(*b"AAAA", 1),
            ]
        );
    }

    #[test]
    fn fits_in_the_tables_with_the_most_cpus() {
        let cfg = super::super::AcpiConfig {
            boot_vcpus: 1,
            max_vcpus: 255,
            ioapic_addr: 0xfec0_0000,
            lapic_addr: 0xfee0_0000,
            devices_aml: hotplug_aml(0xd000_0000, 9, 255, &[]).expect("aml"),
        };
        assert!(super::super::build(&cfg).is_ok());
    }

    const BLOCKS: [(u64, u64); 3] = [
        (4 << 30, 128 << 20),
        ((4 << 30) + (128 << 20), 128 << 20),
        ((4 << 30) + (256 << 20), 128 << 20),
    ];

    #[test]
    fn memory_devices_cover_their_blocks() {
        let aml = hotplug_aml(0xd000_0000, 9, 1, &BLOCKS).expect("aml");
        for needle in [
            &b"MHPC"[..],
            b"MSCN",
            b"MSTA",
            b"MEJ0",
            b"MTFY",
            b"MLCK",
            b"MSEL",
            b"MEN_",
            b"MINS",
            b"MRMV",
            b"MEJF",
            b"M000",
            b"M002",
        ] {
            assert!(
                contains(&aml, needle),
                "{}",
                String::from_utf8_lossy(needle)
            );
        }
        assert!(!contains(&aml, b"M003"));
        // EISA id PNP0C80 (memory device), three times; PNP0A06 once.
        assert_eq!(count(&aml, &[0x0c, 0x41, 0xd0, 0x0c, 0x80]), 3);
        assert_eq!(count(&aml, &[0x0c, 0x41, 0xd0, 0x0a, 0x06]), 1);
        // Each block's QWordMemory: min and max (inclusive) as written.
        for (base, len) in BLOCKS {
            let mut range = base.to_le_bytes().to_vec();
            range.extend_from_slice(&(base + len - 1).to_le_bytes());
            assert!(contains(&aml, &range), "block at {base:#x}");
        }
        // The memory registers sit at their offsets in the page.
        let mut region = vec![0x5b, 0x80];
        region.extend_from_slice(b"MRST");
        region.extend_from_slice(&[0x00, 0x0c, 0x00, 0x00, 0x00, 0xd0, 0x0b]);
        region.extend_from_slice(&(HOTPLUG_REGION_SIZE as u16).to_le_bytes());
        assert!(contains(&aml, &region));
    }

    #[test]
    fn the_ged_scans_memory_only_with_a_room() {
        let with = hotplug_aml(0xd000_0000, 9, 1, &BLOCKS).expect("aml");
        let without = hotplug_aml(0xd000_0000, 9, 1, &[]).expect("aml");
        assert!(contains(&with, b"MSCN"));
        assert!(!contains(&without, b"MHPC"));
        assert!(!contains(&without, b"MSCN"));
        assert!(contains(&without, b"CSCN"));
    }

    #[test]
    fn too_many_memory_blocks_is_an_error() {
        let blocks = vec![(4u64 << 30, 128u64 << 20); MAX_MEMORY_BLOCKS + 1];
        assert_eq!(
            hotplug_aml(0xd000_0000, 9, 1, &blocks),
            Err(AcpiError::TooManyMemoryBlocks(MAX_MEMORY_BLOCKS + 1))
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            hotplug_aml(0xd000_0000, 9, 0, &[]),
            Err(AcpiError::NoHotplugVcpus)
        );
        assert_eq!(
            hotplug_aml(0xffff_f800, 9, 1, &[]),
            Err(AcpiError::HotplugAbove4G(0xffff_f800))
        );
        assert!(hotplug_aml(0xffff_f000, 9, 1, &[]).is_ok());
    }
}
