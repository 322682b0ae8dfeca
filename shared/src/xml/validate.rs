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

/// Validates `text` read from `source` and words the verdict as the CLI prints it.
pub fn validate_document(source: &str, text: &str) -> Verdict {
    match parse_any(source, text) {
        Ok(doc) => {
            let (kind, name, uninterpreted) = match &doc {
                AnyDocument::Domain(d) => ("domain", d.model.name.as_str(), &d.uninterpreted),
                AnyDocument::Network(n) => ("network", n.model.name.as_str(), &n.uninterpreted),
            };
            let mut lines = vec![format!("{source}: ok ({kind} {name})")];
            lines.extend(
                uninterpreted
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
