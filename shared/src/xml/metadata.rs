//! Flotilla's own settings inside a domain's `<metadata>`, in its namespace,
//! as libvirt lets applications keep theirs:
//!
//! ```xml
//! <metadata>
//!   <flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/>
//! </metadata>
//! ```
//!
//! The element is found by namespace, not by prefix, so any prefix bound to
//! [`FLOTILLA_NS`] works. Everything else in `<metadata>` is kept verbatim,
//! and the definition stays host-independent.

use super::cursor::Extra;
use super::tree::{Element, Node};

/// The namespace of Flotilla's metadata elements.
pub const FLOTILLA_NS: &str = "urn:flotilla:domain:1";

/// A `<flotilla:ha restart=…>` value that is neither `on` nor `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHa {
    /// The value found.
    pub value: String,
}

/// The namespace an element's prefix is bound to, looking at the element
/// and then its parent (the only scopes libvirt keeps for metadata).
fn namespace<'a>(el: &'a Element, parent: &'a Element) -> Option<&'a str> {
    let key = match el.name.split_once(':') {
        Some((prefix, _)) => format!("xmlns:{prefix}"),
        None => "xmlns".to_string(),
    };
    el.get_attr(&key).or_else(|| parent.get_attr(&key))
}

fn local_name(el: &Element) -> &str {
    el.name.split_once(':').map_or(el.name.as_str(), |(_, l)| l)
}

fn metadata(extra: &Extra) -> Option<&Element> {
    extra.children.iter().find_map(|n| match n {
        Node::Element(e) if e.name == "metadata" => Some(e),
        _ => None,
    })
}

fn is_flotilla(el: &Element, metadata: &Element, local: &str) -> bool {
    local_name(el) == local && namespace(el, metadata) == Some(FLOTILLA_NS)
}

/// Flotilla's `<flotilla:LOCAL>` element in `<metadata>`, if any.
fn flotilla_element<'a>(extra: &'a Extra, local: &str) -> Option<&'a Element> {
    let m = metadata(extra)?;
    m.elements().find(|e| is_flotilla(e, m, local))
}

/// Whether the domain's kept children ask for high availability.
pub fn ha(extra: &Extra) -> Result<bool, BadHa> {
    let Some(el) = flotilla_element(extra, "ha") else {
        return Ok(false);
    };
    match el.get_attr("restart") {
        Some("on") => Ok(true),
        Some("off") | None => Ok(false),
        Some(other) => Err(BadHa {
            value: other.to_string(),
        }),
    }
}

/// Sets high availability on or off, adding `<metadata>` and the element
/// when missing and keeping every other metadata child as it was.
pub fn set_ha(extra: &mut Extra, on: bool) {
    set_flotilla_attr(extra, "ha", "restart", if on { "on" } else { "off" });
}

/// Whether the coordinator starts the VM when the fleet comes up
/// (`<flotilla:autostart enabled='yes'/>`, `virsh autostart`).
pub fn autostart(extra: &Extra) -> bool {
    flotilla_element(extra, "autostart").and_then(|e| e.get_attr("enabled")) == Some("yes")
}

/// Sets autostart on or off, as [`set_ha`] does high availability.
pub fn set_autostart(extra: &mut Extra, on: bool) {
    set_flotilla_attr(extra, "autostart", "enabled", if on { "yes" } else { "no" });
}

fn set_flotilla_attr(extra: &mut Extra, local: &str, attr: &str, value: &str) {
    let index = extra
        .children
        .iter()
        .position(|n| matches!(n, Node::Element(e) if e.name == "metadata"));
    let index = index.unwrap_or_else(|| {
        extra.children.push(Node::Element(Element::new("metadata")));
        extra.children.len() - 1
    });
    let Node::Element(m) = &mut extra.children[index] else {
        return;
    };
    let parent = Element {
        children: Vec::new(),
        ..m.clone()
    };
    for n in &mut m.children {
        if let Node::Element(e) = n {
            if is_flotilla(e, &parent, local) {
                e.attrs.retain(|(k, _)| k != attr);
                e.attrs.push((attr.into(), value.into()));
                return;
            }
        }
    }
    m.children.push(Node::Element(
        Element::new(format!("flotilla:{local}"))
            .attr("xmlns:flotilla", FLOTILLA_NS)
            .attr(attr, value),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::Domain;

    fn domain(metadata: &str) -> Domain {
        let xml = format!(
            "<domain type='kvm'><name>web</name><memory>65536</memory>\
             <os><type>hvm</type></os>{metadata}</domain>"
        );
        Domain::parse("web.xml", &xml).expect("parses").model
    }

    #[test]
    fn autostart_is_set_and_read_beside_ha_and_other_metadata() {
        let mut d = domain(
            "<metadata><app:x xmlns:app='urn:app'/>\
             <f:ha xmlns:f='urn:flotilla:domain:1' restart='on'/></metadata>",
        );
        assert!(!autostart(&d.extra));
        set_autostart(&mut d.extra, true);
        assert!(autostart(&d.extra));
        assert_eq!(ha(&d.extra), Ok(true));
        let again = Domain::parse("w.xml", &d.to_xml(crate::xml::XmlFlavor::Inactive))
            .expect("parses")
            .model;
        assert!(autostart(&again.extra));
        set_autostart(&mut d.extra, false);
        assert!(!autostart(&d.extra));
        let xml = d.to_xml(crate::xml::XmlFlavor::Inactive);
        assert!(xml.contains("<app:x xmlns:app=\"urn:app\"/>"), "{xml}");
        assert_eq!(xml.matches("autostart").count(), 1, "{xml}");
    }

    #[test]
    fn ha_is_read_by_namespace_not_prefix() {
        let cases = [
            ("", Ok(false)),
            ("<metadata/>", Ok(false)),
            (
                "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='on'/></metadata>",
                Ok(true),
            ),
            (
                "<metadata><f:ha xmlns:f='urn:flotilla:domain:1' restart='on'/></metadata>",
                Ok(true),
            ),
            (
                "<metadata xmlns:f='urn:flotilla:domain:1'><f:ha restart='on'/></metadata>",
                Ok(true),
            ),
            (
                "<metadata><flotilla:ha xmlns:flotilla='urn:flotilla:domain:1' restart='off'/></metadata>",
                Ok(false),
            ),
            // Another application's element of the same local name.
            (
                "<metadata><x:ha xmlns:x='urn:example:other' restart='on'/></metadata>",
                Ok(false),
            ),
        ];
        for (meta, want) in cases {
            assert_eq!(ha(&domain(meta).extra), want, "{meta}");
        }
    }

    #[test]
    fn a_bad_restart_value_is_refused_naming_the_element() {
        let xml = "<domain type='kvm'><name>web</name><memory>65536</memory>\
                   <os><type>hvm</type></os><metadata><flotilla:ha \
                   xmlns:flotilla='urn:flotilla:domain:1' restart='maybe'/></metadata></domain>";
        let e = Domain::parse("web.xml", xml).expect_err("refused");
        let text = e.to_string();
        assert!(text.starts_with("web.xml:"), "{text}");
        assert!(text.contains("<flotilla:ha restart>"), "{text}");
        assert!(text.contains("'maybe'"), "{text}");
    }

    #[test]
    fn set_ha_edits_in_place_and_keeps_other_metadata() {
        let mut d = domain(
            "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
             <libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata>",
        );
        set_ha(&mut d.extra, true);
        assert_eq!(ha(&d.extra), Ok(true));
        let xml = d.to_xml(crate::xml::XmlFlavor::Inactive);
        assert!(xml.contains("libosinfo:os"), "{xml}");
        let again = Domain::parse("web.xml", &xml).expect("reparses").model;
        assert_eq!(ha(&again.extra), Ok(true));
        let mut off = again.clone();
        set_ha(&mut off.extra, false);
        assert_eq!(ha(&off.extra), Ok(false));
        let xml = off.to_xml(crate::xml::XmlFlavor::Inactive);
        assert_eq!(xml.matches("flotilla:ha").count(), 1, "{xml}");

        let mut bare = domain("");
        set_ha(&mut bare.extra, true);
        assert_eq!(ha(&bare.extra), Ok(true));
    }
}
