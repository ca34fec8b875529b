//! One public error type for the data path: a stable, matchable
//! [`ErrorKind`] plus context (operation, offset, message). Frontends map the
//! kind to their wire status in one place each; the replica protocol carries
//! the kind as a code.

use std::fmt;

/// What went wrong, as a closed set that callers can match on and that maps
/// onto every frontend's status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A malformed or unacceptable argument (bad flags, unaligned size, ...).
    InvalidArgument,
    /// The range does not lie inside the device.
    OutOfRange,
    /// The device does not support the operation.
    Unsupported,
    /// An I/O error from the storage underneath.
    Io,
    /// Stored data does not match its checksum.
    Corrupt,
    /// No space left on the storage underneath.
    NoSpace,
    /// The connection to a peer was lost.
    Disconnected,
    /// No replica is available to serve the request.
    Unavailable,
    /// The peer refused us because a newer controller epoch exists.
    Fenced,
    /// The peer broke the protocol.
    Protocol,
    /// The operation did not finish in time.
    TimedOut,
    /// The device is read-only.
    ReadOnly,
}

impl ErrorKind {
    /// Stable numeric code, used on the replica wire protocol. Never reuse a
    /// retired number.
    pub const fn code(self) -> u16 {
        match self {
            ErrorKind::InvalidArgument => 1,
            ErrorKind::OutOfRange => 2,
            ErrorKind::Unsupported => 3,
            ErrorKind::Io => 4,
            ErrorKind::Corrupt => 5,
            ErrorKind::NoSpace => 6,
            ErrorKind::Disconnected => 7,
            ErrorKind::Unavailable => 8,
            ErrorKind::Fenced => 9,
            ErrorKind::Protocol => 10,
            ErrorKind::TimedOut => 11,
            ErrorKind::ReadOnly => 12,
        }
    }

    /// Inverse of [`ErrorKind::code`]; unknown codes become [`ErrorKind::Io`]
    /// so that a newer peer's error is still an error.
    pub const fn from_code(code: u16) -> ErrorKind {
        match code {
            1 => ErrorKind::InvalidArgument,
            2 => ErrorKind::OutOfRange,
            3 => ErrorKind::Unsupported,
            5 => ErrorKind::Corrupt,
            6 => ErrorKind::NoSpace,
            7 => ErrorKind::Disconnected,
            8 => ErrorKind::Unavailable,
            9 => ErrorKind::Fenced,
            10 => ErrorKind::Protocol,
            11 => ErrorKind::TimedOut,
            12 => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        }
    }

    /// Short lower-case name, for messages and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Io => "i/o error",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::ReadOnly => "read-only",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operation an error belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Handshake,
    Open,
    /// Snapshot create, delete, revert, list.
    Snapshot,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
            Op::BlockStatus => "block-status",
            Op::Handshake => "handshake",
            Op::Open => "open",
            Op::Snapshot => "snapshot",
        })
    }
}

/// A data-path error: a kind to match on, and context for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    op: Option<Op>,
    offset: Option<u64>,
    message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, op: None, offset: None, message: message.into() }
    }

    /// Attaches the operation (kept if already set).
    pub fn with_op(mut self, op: Op) -> Error {
        self.op.get_or_insert(op);
        self
    }

    /// Attaches the byte offset (kept if already set).
    pub fn at(mut self, offset: u64) -> Error {
        self.offset.get_or_insert(offset);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn op(&self) -> Option<Op> {
        self.op
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn unsupported(what: &str) -> Error {
        Error::new(ErrorKind::Unsupported, format!("{what} is not supported"))
    }

    pub fn io(err: std::io::Error) -> Error {
        Error::from(err)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        match (self.op, self.offset) {
            (Some(op), Some(off)) => write!(f, " ({op} at offset {off})"),
            (Some(op), None) => write!(f, " ({op})"),
            (None, Some(off)) => write!(f, " (at offset {off})"),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Error {
        let kind = match err.raw_os_error() {
            Some(28) => ErrorKind::NoSpace,     // ENOSPC
            Some(95) => ErrorKind::Unsupported, // EOPNOTSUPP
            _ => match err.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::NotConnected => ErrorKind::Disconnected,
                std::io::ErrorKind::TimedOut => ErrorKind::TimedOut,
                std::io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
                std::io::ErrorKind::Unsupported => ErrorKind::Unsupported,
                _ => ErrorKind::Io,
            },
        };
        Error::new(kind, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::OutOfRange,
            ErrorKind::Unsupported,
            ErrorKind::Io,
            ErrorKind::Corrupt,
            ErrorKind::NoSpace,
            ErrorKind::Disconnected,
            ErrorKind::Unavailable,
            ErrorKind::Fenced,
            ErrorKind::Protocol,
            ErrorKind::TimedOut,
            ErrorKind::ReadOnly,
        ] {
            assert_eq!(ErrorKind::from_code(kind.code()), kind);
        }
        assert_eq!(ErrorKind::from_code(0), ErrorKind::Io);
        assert_eq!(ErrorKind::from_code(999), ErrorKind::Io);
    }

    #[test]
    fn display_has_context() {
        let e = Error::new(ErrorKind::Corrupt, "checksum mismatch").with_op(Op::Read).at(4096);
        assert_eq!(e.to_string(), "corrupt data: checksum mismatch (read at offset 4096)");
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let e: Error = std::io::Error::from_raw_os_error(28).into();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e: Error = std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into();
        assert_eq!(e.kind(), ErrorKind::Disconnected);
    }
}
