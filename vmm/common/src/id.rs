//! The one rule every container, exec and sandbox id must pass before any
//! beaconbox component uses it as a file name, a cgroup name, a stream key or
//! a crun argument: containerd's character set and length. A leading ASCII
//! letter or digit (so no id reads as an option, `-x`, or a path, `.`/`..`),
//! then letters, digits, `_`, `.` or `-`, at most [`MAX_ID_LEN`] bytes.
//! containerd's own identifiers (`^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$`) all pass.

/// Longest id accepted (containerd's `identifiers.maxLength`).
pub const MAX_ID_LEN: usize = 76;

/// The rule in words, for error messages.
pub const ID_RULE: &str = "an id must start with an ASCII letter or digit, continue with ASCII \
                           letters, digits, '_', '.' or '-', and be at most 76 bytes long";

/// Whether `id` follows the rule.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let Some((first, rest)) = bytes.split_first() else {
        return false;
    };
    bytes.len() <= MAX_ID_LEN
        && first.is_ascii_alphanumeric()
        && rest
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_containerds_rule() {
        for ok in [
            "c1",
            "0abc",
            "a.b_c-d",
            "a..b",
            "x-",
            "k8s.io",
            &"x".repeat(76),
        ] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            "-rf",
            "--help",
            "-",
            ".",
            "..",
            ".hidden",
            "_x",
            "a/b",
            "a b",
            "a\n",
            &"x".repeat(77),
            "é",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
