//! libvirt XML: a safe reader, typed domain and network models, and writers.
//!
//! Text enters through [`tree::parse_document`] (limits, positions) and models
//! read it through a [`cursor::Cursor`] that keeps whatever they do not type.
//! Writing goes the other way: model → [`tree::Element`] → text, in one of the
//! [`XmlFlavor`]s libvirt distinguishes.

pub mod cursor;
pub mod domain;
pub mod error;
pub mod graphics;
pub mod metadata;
pub mod network;
pub mod tree;
pub mod units;
pub mod validate;

pub use cursor::Extra;
pub use domain::{Device, Domain};
pub use error::{ParseError, Position, Reason};
pub use graphics::{Graphics, GraphicsProtocol, Listen, ListenKind, SharePolicy};
pub use network::{ForwardMode, Network};
pub use tree::Element;

/// Which view of a VM's XML to write, as libvirt distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmlFlavor {
    /// The running VM: resolved listen addresses, allocated ports, config defaults.
    Live,
    /// The stored definition: nothing host-specific.
    Inactive,
    /// Sent to a migration destination: nothing the destination must decide itself.
    Migratable,
}

/// A model together with the element paths it kept but did not interpret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDocument<T> {
    /// The typed model.
    pub model: T,
    /// Paths like `/domain/devices/controller`, each listed once.
    pub uninterpreted: Vec<String>,
}

/// A document that is either a domain or a network, told apart by its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyDocument {
    /// `<domain>`.
    Domain(Box<ParsedDocument<Domain>>),
    /// `<network>`.
    Network(Box<ParsedDocument<Network>>),
}

/// Parses `text` as a domain or a network, by its root element.
pub fn parse_any(source: &str, text: &str) -> Result<AnyDocument, ParseError> {
    let root = tree::parse_document(source, text)?;
    match root.name.as_str() {
        "domain" => Domain::from_element(source, &root).map(|d| AnyDocument::Domain(Box::new(d))),
        "network" => {
            Network::from_element(source, &root).map(|n| AnyDocument::Network(Box::new(n)))
        }
        other => Err(ParseError {
            source_name: source.to_string(),
            pos: root.pos,
            path: format!("/{other}"),
            reason: Reason::WrongRoot {
                expected: "domain or network",
                found: other.to_string(),
            },
        }),
    }
}
