//! Names and addresses derived from a sandbox id: the TAP name and the guest MAC.
//! Sandbox ids come from containerd and may hold any characters; hashing keeps every
//! derived name a valid, fixed-length interface name.
//!
//! The MAC type itself is `beacon_common::MacAddr` (one definition for netmgr and
//! the VMM); this module only derives values of it.

use beacon_common::MacAddr;
use sha2::{Digest, Sha256};

use crate::config::TAP_PREFIX;
use crate::error::{NetError, Result};

/// Longest sandbox id we accept (containerd ids are at most 76 bytes).
pub const MAX_SANDBOX_ID_LEN: usize = 1024;

/// Reject ids we cannot store or hash meaningfully.
pub fn validate_sandbox_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_SANDBOX_ID_LEN || id.contains('\0') {
        return Err(NetError::InvalidSandboxId(id.chars().take(64).collect()));
    }
    Ok(())
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// `beacon-<first 4 bytes of sha256(id) in hex>`: always 15 bytes, the kernel's limit.
pub fn tap_name(sandbox_id: &str) -> String {
    let d = digest(sandbox_id);
    format!(
        "{TAP_PREFIX}{:02x}{:02x}{:02x}{:02x}",
        d[0], d[1], d[2], d[3]
    )
}

/// Whether `name` looks like a TAP this crate created.
pub fn is_beacon_tap(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A locally administered unicast MAC derived from the id, stable across restarts.
pub fn guest_mac(sandbox_id: &str) -> MacAddr {
    let d = digest(sandbox_id);
    MacAddr([0x02, d[4], d[5], d[6], d[7], d[8]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_valid_for_odd_ids() {
        for id in [
            "a",
            "with space/and\\slashes",
            "ünïcødé-🙂",
            "x".repeat(1000).as_str(),
            "../../etc",
            "$(rm -rf)",
        ] {
            let name = tap_name(id);
            assert_eq!(name.len(), 15, "{name}");
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            assert!(is_beacon_tap(&name));
            assert_eq!(name, tap_name(id), "stable");
        }
        assert_ne!(tap_name("a"), tap_name("b"));
        assert!(!is_beacon_tap("beacon0"));
        assert!(!is_beacon_tap("beacon-xyz"));
    }

    #[test]
    fn macs_are_local_unicast_and_round_trip() {
        let mac = guest_mac("sandbox");
        assert_eq!(mac.0[0] & 0x03, 0x02);
        let parsed: MacAddr = mac.to_string().parse().unwrap();
        assert_eq!(parsed, mac);
        assert!("zz:00:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("00:00".parse::<MacAddr>().is_err());
        // Strict: one-digit groups were accepted by netmgr's old private parser.
        assert!("2:0:0:0:0:1".parse::<MacAddr>().is_err());
        // Stored and printed as text, the form the VMM and operators read.
        assert_eq!(serde_json::to_string(&mac).unwrap(), format!("\"{mac}\""));
    }

    #[test]
    fn sandbox_id_validation() {
        assert!(validate_sandbox_id("ok").is_ok());
        assert!(validate_sandbox_id("").is_err());
        assert!(validate_sandbox_id("a\0b").is_err());
        assert!(validate_sandbox_id(&"x".repeat(2000)).is_err());
    }
}
