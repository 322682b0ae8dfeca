//! The one error type of XML reading: where it happened and why.
//!
//! Every rejection names the source (file or request), the line and column, the
//! element path and the reason, so an operator can go straight to the fix.

use std::fmt;

/// A 1-based line and column in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Line, from 1.
    pub line: u32,
    /// Column in characters, from 1.
    pub col: u32,
}

/// A document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{}:{}: {path}: {reason}", pos.line, pos.col)]
pub struct ParseError {
    /// The file name or request label the text came from.
    pub source_name: String,
    /// Where the offending element (or syntax) starts.
    pub pos: Position,
    /// Element path such as `/domain/devices/graphics`.
    pub path: String,
    /// What was wrong.
    pub reason: Reason,
}

/// Why a document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// Not well-formed XML.
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// No root element at all.
    #[error("document has no root element")]
    Empty,
    /// Content after the root element closed.
    #[error("content after the root element")]
    TrailingContent,
    /// Over the size limit.
    #[error("document is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Size of the document.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Nested too deep.
    #[error("elements nest deeper than the limit of {limit}")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// A DOCTYPE declaration; refused so that no entity is ever expanded.
    #[error("DOCTYPE declarations are not accepted (entities are never expanded)")]
    DocType,
    /// An entity other than XML's predefined five.
    #[error("unknown entity '&{0};' (only XML's predefined entities are accepted)")]
    UnknownEntity(String),
    /// The root element is not what the caller asked for.
    #[error("expected root element <{expected}>, found <{found}>")]
    WrongRoot {
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// A required element is absent.
    #[error("missing required element <{0}>")]
    MissingElement(&'static str),
    /// A required attribute is absent.
    #[error("missing required attribute '{0}'")]
    MissingAttribute(&'static str),
    /// An attribute or element value does not parse.
    #[error("{0}")]
    InvalidValue(Box<InvalidValue>),
    /// A libvirt consistency rule is broken; the message is libvirt's where it has one.
    #[error("{0}")]
    Rule(String),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A value that does not parse, and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} '{value}': expected {expected}")]
pub struct InvalidValue {
    /// The attribute or element named.
    pub what: String,
    /// The value found.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}
