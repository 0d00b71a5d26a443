//! One error type for the library. Every variant names what it is about (file, tensor, field).

use std::fmt;

/// A ferroq error. Untrusted input produces one of these, never a panic.
#[derive(Debug)]
pub enum Error {
    /// I/O on a named file.
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A malformed model or checkpoint file: what is wrong, and where.
    Format { file: String, msg: String },
    /// A bad configuration value (config.json field, CLI argument, ...).
    Config { field: String, msg: String },
    /// A tensor is missing or has the wrong shape or type.
    Tensor { name: String, msg: String },
    /// Bad user input (token id out of range, prompt too long, ...).
    Input(String),
    /// Anything else, with context.
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Format { file, msg } => write!(f, "{file}: {msg}"),
            Error::Config { field, msg } => write!(f, "config field `{field}`: {msg}"),
            Error::Tensor { name, msg } => write!(f, "tensor `{name}`: {msg}"),
            Error::Input(msg) => write!(f, "{msg}"),
            Error::Other(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Error {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    pub fn format(file: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Error {
        Error::Format {
            file: file.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
}
