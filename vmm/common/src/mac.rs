//! A 48-bit Ethernet address, written `02:00:0a:58:00:02` (six pairs of hex digits).
//!
//! Serialised as that string. Deserialisation also takes the six-number array
//! that netmgr's lease database stored before this type was shared, so existing
//! databases keep loading.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address; use six pairs of hex digits such as 02:00:00:00:00:01")]
pub struct MacParseError(pub String);

impl MacAddr {
    /// True for a unicast address (the group bit of the first octet is clear).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    /// True for a locally administered address (bit 1 of the first octet set).
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError(s.chars().take(64).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Octets([u8; 6]),
        }
        match Repr::deserialize(d)? {
            Repr::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Repr::Octets(o) => Ok(Self(o)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "02:00:0a:58:00:02".parse().expect("mac");
        assert_eq!(m.0, [2, 0, 0x0a, 0x58, 0, 2]);
        assert_eq!(m.to_string(), "02:00:0a:58:00:02");
        assert!(m.is_unicast() && m.is_local());
        assert!(!MacAddr([1, 0, 0, 0, 0, 0]).is_unicast());
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "02:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
            "+2:00:00:00:00:00",
            "02:00:00:00:00:0",
            "02-00-00-00-00-00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_text_and_legacy_array() {
        let m = MacAddr([2, 0, 0, 0, 0, 1]);
        let json = serde_json::to_string(&m).expect("ser");
        assert_eq!(json, "\"02:00:00:00:00:01\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).expect("de"), m);
        assert_eq!(
            serde_json::from_str::<MacAddr>("[2,0,0,0,0,1]").expect("legacy"),
            m
        );
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
        assert!(serde_json::from_str::<MacAddr>("[2,0,0]").is_err());
    }
}
