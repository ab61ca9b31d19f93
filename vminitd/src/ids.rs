//! Container and exec ids: the one rule every id from the host must pass
//! before vminitd uses it as a file name, a cgroup name, a stream key or a
//! crun argument. Owns only the rule and its error; callers decide when to
//! check.
//!
//! The rule is containerd's character set and length: a leading ASCII letter
//! or digit (so no id can be read as an option, `-x`, or a path, `.`/`..`),
//! then letters, digits, `_`, `.` or `-`, at most [`MAX_ID_LEN`] bytes.
//! containerd's own identifiers (`^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$`) all
//! pass.

use crate::error::TaskError;

/// Longest id accepted (containerd's `identifiers.maxLength`).
pub const MAX_ID_LEN: usize = 76;

/// The rule in words, for error messages.
pub const ID_RULE: &str = "an id must start with an ASCII letter or digit, continue with ASCII \
                           letters, digits, '_', '.' or '-', and be at most 76 bytes long";

/// Whether `id` follows the id rule.
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

/// `Ok` for a valid id; otherwise `InvalidArgument` naming what the id is
/// for (`what`: "container", "exec"), the id and the rule.
pub fn check_id(what: &str, id: &str) -> Result<(), TaskError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(TaskError::InvalidArgument(format!(
            "{what} id {id:?} is not valid: {ID_RULE}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_rule() {
        for ok in ["c1", "abc-DEF_1.2", "0", "a..b", "x-", &"a".repeat(76)] {
            assert!(valid_id(ok), "{ok:?} must be valid");
        }
        for bad in [
            "",
            "-c",
            "--help",
            "-",
            ".",
            "..",
            ".hidden",
            "_x",
            "a/b",
            "a b",
            "a\nb",
            "é",
            &"a".repeat(77),
        ] {
            assert!(!valid_id(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_error_names_the_id_and_the_rule() {
        let e = check_id("container", "-rf").expect_err("refused");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        let msg = e.to_string();
        assert!(msg.contains("container id \"-rf\""), "{msg}");
        assert!(msg.contains("start with an ASCII letter or digit"), "{msg}");
        assert!(check_id("exec", "e1").is_ok());
    }
}
