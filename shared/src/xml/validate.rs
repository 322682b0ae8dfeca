//! What `flotilla validate` says about one document, decided without I/O.

use super::{parse_any, AnyDocument};

/// The verdict on one file: the lines to print and whether it passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// True when the document is valid.
    pub ok: bool,
    /// Lines to print, first the verdict, then any warnings.
    pub lines: Vec<String>,
}

/// Elements of a domain that only carry data: kept as written, acted on by nobody.
const DATA_ONLY: &[&str] = &["metadata", "seclabel", "resource", "sysinfo"];

/// Validates `text` read from `source` and words the verdict as the CLI
/// prints it. A domain gets define's verdict: what Flotilla does not build
/// is an error naming its element ([`crate::hardware::plan`]).
pub fn validate_document(source: &str, text: &str) -> Verdict {
    match parse_any(source, text) {
        Ok(AnyDocument::Domain(d)) => {
            let name = d.model.name.as_str();
            if let Err(refused) = crate::hardware::plan(&d.model) {
                return Verdict {
                    ok: false,
                    lines: refused
                        .0
                        .iter()
                        .map(|u| format!("{source}: error: {u}"))
                        .collect(),
                };
            }
            let mut lines = vec![format!("{source}: ok (domain {name})")];
            let root = d.model.to_element(super::XmlFlavor::Inactive);
            lines.extend(
                root.elements()
                    .filter(|e| DATA_ONLY.contains(&e.name.as_str()))
                    .map(|e| format!("{source}: note: /domain/{}: kept as data", e.name)),
            );
            Verdict { ok: true, lines }
        }
        Ok(AnyDocument::Network(n)) => {
            let mut lines = vec![format!("{source}: ok (network {})", n.model.name)];
            lines.extend(
                n.uninterpreted
                    .iter()
                    .map(|p| format!("{source}: warning: {p}: kept but not interpreted")),
            );
            Verdict { ok: true, lines }
        }
        Err(e) => Verdict {
            ok: false,
            lines: vec![format!(
                "{}:{}:{}: error: {}: {}",
                e.source_name, e.pos.line, e.pos.col, e.path, e.reason
            )],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_line_names_kind_and_lists_uninterpreted() {
        let v = validate_document(
            "n.xml",
            "<network><name>public</name><forward mode='bridge'/><bridge name='br0'/>\
             <portgroup name='x'/></network>",
        );
        assert!(v.ok);
        assert_eq!(
            v.lines,
            vec![
                "n.xml: ok (network public)".to_string(),
                "n.xml: warning: /network/portgroup: kept but not interpreted".to_string(),
            ]
        );
    }

    #[test]
    fn a_domain_gets_defines_verdict_and_data_is_listed() {
        let v = validate_document(
            "d.xml",
            "<domain type='kvm'><name>d</name><memory>65536</memory><os><type>hvm</type></os>\
             <metadata><x:y xmlns:x='urn:x'/></metadata>\
             <devices><hostdev mode='subsystem' type='usb'/></devices></domain>",
        );
        assert!(!v.ok);
        assert_eq!(
            v.lines,
            ["d.xml: error: /domain/devices/hostdev: element is not supported by Flotilla yet"]
        );
        let v = validate_document(
            "d.xml",
            "<domain type='kvm'><name>d</name><memory>65536</memory><os><type>hvm</type></os>\
             <metadata><x:y xmlns:x='urn:x'/></metadata><devices/></domain>",
        );
        assert!(v.ok);
        assert_eq!(
            v.lines,
            [
                "d.xml: ok (domain d)",
                "d.xml: note: /domain/metadata: kept as data"
            ]
        );
    }

    #[test]
    fn error_line_has_file_line_col_path_reason() {
        let v = validate_document(
            "d.xml",
            "<domain type='kvm'>\n<name>x</name>\n<memory unit='parsec'>1</memory></domain>",
        );
        assert!(!v.ok);
        assert!(
            v.lines[0].starts_with("d.xml:3:1: error: /domain/memory: invalid <memory>"),
            "{}",
            v.lines[0]
        );
    }
}
