//! An address bus that routes guest accesses (port I/O or MMIO) to devices.
//!
//! The bus owns the address map only: which range belongs to which device. It is
//! shared by all vCPU threads and the VMM's device manager, which may add or
//! remove devices while the VM runs (hotplug): the map sits behind a read-write
//! lock that accesses take for reading only, and each device sits behind its own
//! mutex, so vCPUs touching different devices do not contend. The bus never
//! interprets the bytes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A device that answers accesses inside its range.
///
/// `offset` is relative to the start of the range the device was inserted at;
/// `data.len()` is the access size the guest used (1, 2, 4 or 8 for real
/// instructions, but a device must tolerate any length, including 0).
pub trait BusDevice: Send {
    /// The guest reads; fill `data` (a device that has nothing to say leaves zeros).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever built it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be placed on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range at {base:#x} has length 0; give the device a non-empty range")]
    EmptyRange { base: u64 },
    #[error("bus range {base:#x}+{len:#x} wraps past the end of the address space")]
    Overflow { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device already at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A map from address ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.map()
                    .iter()
                    .map(|(base, e)| format!("{base:#x}+{:#x}", e.len)),
            )
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    // The map is consistent at every unlock, so a panicked holder leaves it usable.
    fn map(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Place `device` at `[base, base + len)`; may be called while vCPUs run.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let end = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        let mut ranges = self.map_mut();
        // The only candidates for overlap: the last range starting at or before
        // `end`. Ranges never overlap each other, so checking it suffices.
        if let Some((&other_base, other)) = ranges.range(..=end).next_back() {
            if other_base + (other.len - 1) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Take the device placed at exactly `base` off the bus (hot unplug); None if
    /// no range starts there.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        self.map_mut().remove(&base).map(|e| e.device)
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let ranges = self.map();
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Route a read. Returns false (and leaves `data` untouched) when no device
    /// claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Route a write. Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device even if a previous holder panicked: a device's state is plain
/// data and the VM is being torn down in that case anyway.
fn lock(device: &SharedDevice) -> MutexGuard<'_, dyn BusDevice + 'static> {
    beacon_common::lock(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x3f8, 8, a.clone()).expect("insert a");
        bus.insert(0x60, 5, b.clone()).expect("insert b");

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().expect("lock").last_write, Some((4, vec![0xfe])));
        assert!(a.lock().expect("lock").last_write.is_none());

        // Just outside both ranges.
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x65, &[1]));
        assert!(!bus.read(0x3f7, &mut data));
    }

    #[test]
    fn rejects_overlap_empty_and_wrapping_ranges() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Probe::default())))
            .expect("insert");
        let dev = || Arc::new(Mutex::new(Probe::default()));
        assert!(matches!(
            bus.insert(0x10f, 1, dev()),
            Err(BusError::Overlap {
                other_base: 0x100,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(0xf0, 0x11, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(0x200, 0, dev()),
            Err(BusError::EmptyRange { base: 0x200 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::Overflow { .. })
        ));
        // Adjacent ranges are fine, including the very top of the space.
        bus.insert(0x110, 0x10, dev()).expect("adjacent");
        bus.insert(0xf0, 0x10, dev()).expect("adjacent below");
        bus.insert(u64::MAX, 1, dev()).expect("last byte");
        let mut data = [0u8; 8];
        assert!(bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn devices_come_and_go_while_others_use_the_bus() {
        let bus = Arc::new(Bus::new());
        let probe = Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x1000, 0x100, probe.clone()).expect("insert");
        let reader = {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let mut hits = 0;
                for _ in 0..10_000 {
                    let mut d = [0u8; 4];
                    if bus.read(0x1004, &mut d) {
                        hits += 1;
                    }
                }
                hits
            })
        };
        for _ in 0..100 {
            let dev = bus.remove(0x2000);
            assert!(dev.is_none());
            bus.insert(0x2000, 0x10, Arc::new(Mutex::new(Probe::default())))
                .expect("add while in use");
            assert!(bus.remove(0x2000).is_some());
        }
        assert_eq!(reader.join().expect("reader"), 10_000);
        assert!(bus.remove(0x1001).is_none(), "only exact bases remove");
        assert!(bus.remove(0x1000).is_some());
        assert!(!bus.read(0x1004, &mut [0u8; 4]));
    }
}
