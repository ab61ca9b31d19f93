//! The bitmap of one IP pool: bit `i` set means `first + i` is leased. Pure data, no
//! I/O; [`crate::leasedb`] loads and stores it inside a transaction.

use std::net::Ipv4Addr;

use crate::config::PoolRange;

/// A bitmap allocator over a [`PoolRange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolBitmap {
    range: PoolRange,
    bits: Vec<u8>,
}

impl PoolBitmap {
    /// An empty bitmap for `range`.
    pub fn new(range: PoolRange) -> Self {
        let bytes = range.size().div_ceil(8) as usize;
        PoolBitmap {
            range,
            bits: vec![0; bytes],
        }
    }

    /// Rebuild from stored bytes; `None` when the length does not match the range.
    pub fn from_bytes(range: PoolRange, bytes: &[u8]) -> Option<Self> {
        let mut map = PoolBitmap::new(range);
        if bytes.len() != map.bits.len() {
            return None;
        }
        map.bits.copy_from_slice(bytes);
        Some(map)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn range(&self) -> PoolRange {
        self.range
    }

    fn index_of(&self, ip: Ipv4Addr) -> Option<u32> {
        let ip = u32::from(ip);
        let first = u32::from(self.range.first);
        (first..=u32::from(self.range.last))
            .contains(&ip)
            .then(|| ip - first)
    }

    fn get(&self, idx: u32) -> bool {
        self.bits[(idx / 8) as usize] & (1 << (idx % 8)) != 0
    }

    fn put(&mut self, idx: u32, on: bool) {
        let byte = &mut self.bits[(idx / 8) as usize];
        if on {
            *byte |= 1 << (idx % 8);
        } else {
            *byte &= !(1 << (idx % 8));
        }
    }

    /// Whether `ip` is leased (addresses outside the pool count as not leased).
    pub fn is_leased(&self, ip: Ipv4Addr) -> bool {
        self.index_of(ip).is_some_and(|i| self.get(i))
    }

    /// Mark `ip` leased or free; returns false when `ip` is outside the pool.
    pub fn set(&mut self, ip: Ipv4Addr, leased: bool) -> bool {
        match self.index_of(ip) {
            Some(i) => {
                self.put(i, leased);
                true
            }
            None => false,
        }
    }

    /// Lease the first free address at or after `cursor` (wrapping), so a just
    /// released address is reused as late as possible.
    pub fn allocate(&mut self, cursor: Ipv4Addr) -> Option<Ipv4Addr> {
        let size = self.range.size();
        let start = self.index_of(cursor).unwrap_or(0);
        let mut idx = start;
        for _ in 0..size {
            // Skip whole bytes that are full.
            if idx.is_multiple_of(8) && self.bits[(idx / 8) as usize] == 0xff && idx + 8 <= size {
                idx = (idx + 8) % size;
                continue;
            }
            if !self.get(idx) {
                self.put(idx, true);
                return Some(Ipv4Addr::from(u32::from(self.range.first) + idx));
            }
            idx = (idx + 1) % size;
        }
        None
    }

    /// Number of leased addresses.
    pub fn leased_count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    /// Every leased address, in order.
    pub fn leased(&self) -> Vec<Ipv4Addr> {
        (0..self.range.size())
            .filter(|&i| self.get(i))
            .map(|i| Ipv4Addr::from(u32::from(self.range.first) + i))
            .collect()
    }

    /// The address after `ip`, wrapping inside the pool (the next cursor).
    pub fn next_after(&self, ip: Ipv4Addr) -> Ipv4Addr {
        let idx = self.index_of(ip).map_or(0, |i| (i + 1) % self.range.size());
        Ipv4Addr::from(u32::from(self.range.first) + idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn range(a: &str, b: &str) -> PoolRange {
        PoolRange {
            first: a.parse().unwrap(),
            last: b.parse().unwrap(),
        }
    }

    #[test]
    fn allocates_every_address_once_then_exhausts() {
        let r = range("10.88.0.2", "10.88.0.40");
        let mut map = PoolBitmap::new(r);
        let mut cursor = r.first;
        let mut seen = HashSet::new();
        for _ in 0..r.size() {
            let ip = map.allocate(cursor).expect("free address");
            assert!(seen.insert(ip), "duplicate {ip}");
            cursor = map.next_after(ip);
        }
        assert_eq!(map.leased_count(), r.size());
        assert_eq!(map.allocate(cursor), None);
        assert!(map.set("10.88.0.7".parse().unwrap(), false));
        assert_eq!(map.allocate(cursor), Some("10.88.0.7".parse().unwrap()));
    }

    #[test]
    fn cursor_delays_reuse_and_bytes_round_trip() {
        let r = range("10.88.0.2", "10.88.0.11");
        let mut map = PoolBitmap::new(r);
        let a = map.allocate(r.first).unwrap();
        map.set(a, false);
        let b = map.allocate(map.next_after(a)).unwrap();
        assert_ne!(a, b);
        let copy = PoolBitmap::from_bytes(r, map.as_bytes()).unwrap();
        assert_eq!(copy, map);
        assert!(PoolBitmap::from_bytes(r, &[0; 9]).is_none());
        assert!(!map.set("10.88.1.1".parse().unwrap(), true));
        assert_eq!(map.leased(), vec![b]);
    }
}
