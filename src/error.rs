//! One error type for the library; each `Kind` becomes its own Python exception class.
use std::fmt;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }
    /// Prefix the message with what was being done, keeping the kind.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error { kind: self.kind, message: format!("{what}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<devicemapper::DmError> for Error {
    fn from(e: devicemapper::DmError) -> Self {
        Error::new(Kind::DeviceMapper, e.to_string())
    }
}

/// Attach a kind and context to `io::Error`s.
pub trait IoContext<T> {
    fn io_ctx(self, kind: Kind, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, kind: Kind, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(kind, format!("{}: {e}", what())))
    }
}
