//! Task API errors: one typed enum for everything a Task call can fail with,
//! and its mapping onto ttrpc status codes. Nothing else in the crate builds
//! a `ttrpc::Error` by hand.

use ttrpc::Code;

/// Why a Task API call failed. The variant picks the ttrpc code; the message
/// names the failing thing so the host can show it as is.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No container or exec with this id.
    #[error("{0} not found")]
    NotFound(String),
    /// The id is already taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request itself is malformed.
    #[error("Invalid argument: {0}")]
    InvalidArgument(String),
    /// The request is valid but the object is in the wrong state for it.
    #[error("Failed precondition: {0}")]
    FailedPrecondition(String),
    /// The call exists in the Task API but vminitd does not implement it.
    #[error("{0} is not implemented by vminitd")]
    Unimplemented(&'static str),
    /// crun failed; the message is crun's own last error line.
    #[error("crun {op} failed: {msg}")]
    Crun { op: &'static str, msg: String },
    /// A local system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl TaskError {
    /// Wraps an I/O error with a description of what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TaskError::Io {
            what: what.into(),
            source,
        }
    }

    /// The ttrpc status code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            TaskError::NotFound(_) => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Crun { .. } | TaskError::Io { .. } => Code::INTERNAL,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Shorthand for Task API results inside vminitd.
pub type TaskResult<T> = Result<T, TaskError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_variants() {
        assert_eq!(TaskError::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(
            TaskError::Unimplemented("Checkpoint").code(),
            Code::UNIMPLEMENTED
        );
        let e: ttrpc::Error = TaskError::AlreadyExists("exec e1".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::ALREADY_EXISTS);
                assert_eq!(s.message(), "exec e1 already exists");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
