//! One error type for the library; each `Kind` becomes its own Python exception class.
//!
//! An error keeps its cause (`std::error::Error::source`): the io or device-mapper error it
//! came from, or the error that `context` wrapped. Its message already reads in full (what
//! was done, then why), because Python sees only the message; the chain is for Rust callers
//! and logs that want the original value.
use std::{fmt, sync::Arc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value from the caller is malformed (names, IQNs, connection dicts, sizes).
    InvalidArgument,
    /// The named image, VM or device does not exist.
    NotFound,
    /// The object is in use (a VM, a child session) and cannot be removed.
    Busy,
    /// The local cache device is missing, not a block device or too small.
    CacheDevice,
    /// The state directory (locks, saved origins, overlays) cannot be used: I/O errors,
    /// a link or a file where a directory belongs.
    StateDir,
    /// open-iscsi failed (discovery, login, scan, logout).
    Iscsi,
    /// The LIO target (configfs) refused an operation.
    Lio,
    /// A device-mapper ioctl failed.
    DeviceMapper,
    /// Creating or removing a VM snapshot (dm-snapshot or qcow2 overlay) failed.
    Snapshot,
    /// A failure happened and undoing the partial work failed too: objects were left behind.
    Rollback,
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    /// `Kind::Rollback`: each object the failed undo left behind, with why it stayed.
    pub left_behind: Vec<String>,
    source: Option<Source>,
}

/// Two errors are equal when they say the same (kind and message), whatever their causes.
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message && self.left_behind == other.left_behind
    }
}
impl Eq for Error {}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), left_behind: Vec::new(), source: None }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }
    /// An error of `kind` caused by `source`; the message says what was done and, after a
    /// colon, the source's own message.
    pub fn caused_by(kind: Kind, what: impl fmt::Display, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error { kind, message: format!("{what}: {source}"), left_behind: Vec::new(), source: Some(Arc::new(source)) }
    }
    /// The undo of a failed operation failed too: `cause` is why the operation failed (kept as
    /// the source), `left` what its undo could not remove.
    pub fn rollback(cause: Error, left: Vec<String>) -> Self {
        let message = format!("{cause}; rollback failed, left behind: {}", left.join(", "));
        Error { kind: Kind::Rollback, message, left_behind: left, source: Some(Arc::new(cause)) }
    }
    /// Prefix the message with what was being done, keeping the kind (and what was left
    /// behind); the error before the prefix becomes the source.
    pub fn context(self, what: impl fmt::Display) -> Self {
        let message = format!("{what}: {}", self.message);
        Error { kind: self.kind, message, left_behind: self.left_behind.clone(), source: Some(Arc::new(self)) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<devicemapper::DmError> for Error {
    fn from(e: devicemapper::DmError) -> Self {
        let message = e.to_string();
        Error { kind: Kind::DeviceMapper, message, left_behind: Vec::new(), source: Some(Arc::new(e)) }
    }
}

/// Attach a kind and context to `io::Error`s (kept as the source).
pub trait IoContext<T> {
    fn io_ctx(self, kind: Kind, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, kind: Kind, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::caused_by(kind, what(), e))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn io_errors_and_contexts_keep_their_cause() {
        let io = std::fs::read("/nonexistent/vmthunder-test").io_ctx(Kind::StateDir, || "read the saved origin".into());
        let e = io.expect_err("no such file").context("recover image img");
        assert_eq!(e.kind, Kind::StateDir);
        assert!(e.message.starts_with("recover image img: read the saved origin: "), "{}", e.message);
        let inner = e.source().expect("the error before the context");
        let io = inner.source().expect("the io error").downcast_ref::<std::io::Error>().expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_failed_rollback_holds_its_cause_and_what_was_left() {
        let e = Error::rollback(Error::new(Kind::Iscsi, "login failed"), vec!["dm device x (busy)".into()]);
        assert_eq!(e.kind, Kind::Rollback);
        assert_eq!(e.left_behind, ["dm device x (busy)"]);
        assert!(e.message.contains("login failed") && e.message.contains("dm device x (busy)"), "{}", e.message);
        let cause = e.source().and_then(|s| s.downcast_ref::<Error>()).expect("the cause");
        assert_eq!(cause.kind, Kind::Iscsi);
        // A context keeps what was left behind.
        assert_eq!(e.context("attach VM v").left_behind, ["dm device x (busy)"]);
    }
}
