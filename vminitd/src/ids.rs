//! Container and exec ids in vminitd: the shared rule
//! ([`beacon_common::id`]) turned into the Task API's InvalidArgument error.
//! Callers decide when to check.

use crate::error::TaskError;

pub use beacon_common::id::{valid_id, ID_RULE, MAX_ID_LEN};

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
    fn the_error_names_the_id_and_the_rule() {
        let e = check_id("container", "-rf").expect_err("refused");
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        let msg = e.to_string();
        assert!(msg.contains("container id \"-rf\""), "{msg}");
        assert!(msg.contains("start with an ASCII letter or digit"), "{msg}");
        assert!(check_id("exec", "e1").is_ok());
    }
}
