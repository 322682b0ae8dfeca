//! A small, owned XML element tree: the only place that talks to quick-xml.
//!
//! Documents come in as text and leave as text; everything in between works on
//! [`Element`]. Reading enforces the safety limits (size, depth, no DOCTYPE, no
//! entities beyond XML's predefined five) before any model sees the data, and
//! remembers where each element starts so that model errors can point at it.
//! Comments, processing instructions and whitespace between elements are
//! dropped, as libvirt drops them.

use std::fmt::Write as _;

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Reader;
use quick_xml::{Writer, XmlVersion};

use super::error::{ParseError, Position, Reason};

/// Largest document accepted, in bytes. libvirt definitions are a few KiB.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Deepest element nesting accepted. Real definitions stay under ten.
pub const MAX_DEPTH: usize = 64;

/// One element: name, attributes in document order, children, and where it began.
#[derive(Debug, Clone)]
pub struct Element {
    /// Qualified name as written, e.g. `domain` or `qemu:commandline`.
    pub name: String,
    /// Attributes in document order, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// Child elements and non-blank text, in document order.
    pub children: Vec<Node>,
    /// Where the start tag began; `Position::default()` for built elements.
    pub pos: Position,
}

/// Equality ignores positions: a written-then-reparsed tree equals its source.
impl PartialEq for Element {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.attrs == other.attrs && self.children == other.children
    }
}
impl Eq for Element {}

/// A child of an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A nested element.
    Element(Element),
    /// Character data (text and CDATA, unescaped, never blank).
    Text(String),
}

impl Element {
    /// A new element with no attributes or children.
    pub fn new(name: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            attrs: Vec::new(),
            children: Vec::new(),
            pos: Position::default(),
        }
    }

    /// Builder: adds an attribute.
    pub fn attr(mut self, key: &str, value: impl Into<String>) -> Self {
        self.attrs.push((key.to_string(), value.into()));
        self
    }

    /// Builder: adds an attribute when `value` is present.
    pub fn opt_attr(mut self, key: &str, value: Option<impl Into<String>>) -> Self {
        if let Some(v) = value {
            self.attrs.push((key.to_string(), v.into()));
        }
        self
    }

    /// Builder: adds a child element.
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder: adds text content (blank text is not kept, as on parse).
    pub fn text(mut self, text: impl Into<String>) -> Self {
        let text = text.into();
        if !text.trim().is_empty() {
            self.children.push(Node::Text(text));
        }
        self
    }

    /// The value of attribute `key`, if present.
    pub fn get_attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Child elements, skipping text.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// All text content directly inside this element, concatenated.
    pub fn text_content(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }

    /// Serialises this element as an indented document with no XML declaration.
    pub fn to_xml_string(&self) -> String {
        let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
        // Writing into a Vec cannot fail; the io::Result is an artefact of the Write trait.
        let _ = write_element(&mut writer, self);
        let mut s = String::from_utf8_lossy(&writer.into_inner()).into_owned();
        s.push('\n');
        s
    }

    /// Serialises with an `<?xml … ?>` declaration, for files written to disk.
    pub fn to_document_string(&self) -> String {
        let mut writer = Writer::new(Vec::new());
        let _ = writer.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
        let mut s = String::from_utf8_lossy(&writer.into_inner()).into_owned();
        s.push('\n');
        s.push_str(&self.to_xml_string());
        s
    }
}

fn write_element(writer: &mut Writer<Vec<u8>>, el: &Element) -> std::io::Result<()> {
    let mut start = BytesStart::new(el.name.as_str());
    for (k, v) in &el.attrs {
        start.push_attribute((k.as_str(), v.as_str()));
    }
    if el.children.is_empty() {
        return writer.write_event(Event::Empty(start));
    }
    writer.write_event(Event::Start(start))?;
    for child in &el.children {
        match child {
            Node::Element(e) => write_element(writer, e)?,
            Node::Text(t) => writer.write_event(Event::Text(BytesText::new(t)))?,
        }
    }
    writer.write_event(Event::End(BytesEnd::new(el.name.as_str())))
}

/// Maps byte offsets to 1-based line and column numbers.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    fn position(&self, text: &str, offset: usize) -> Position {
        let offset = offset.min(text.len());
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line.saturating_sub(1)];
        let col = text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        Position {
            line: line as u32,
            col: col as u32 + 1,
        }
    }
}

/// Parses `text` into its root element, enforcing the safety limits.
///
/// `source` names the file (or request) in every error.
pub fn parse_document(source: &str, text: &str) -> Result<Element, ParseError> {
    let err = |pos: Position, path: &str, reason: Reason| ParseError {
        source_name: source.to_string(),
        pos,
        path: path.to_string(),
        reason,
    };
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(err(
            Position { line: 1, col: 1 },
            "/",
            Reason::TooLarge {
                size: text.len(),
                limit: MAX_DOCUMENT_BYTES,
            },
        ));
    }
    let lines = LineIndex::new(text);
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = false;

    // Open elements, innermost last. The root is popped into `root` when it closes.
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let path_of = |stack: &[Element]| -> String {
        if stack.is_empty() {
            "/".to_string()
        } else {
            let mut p = String::new();
            for e in stack {
                let _ = write!(p, "/{}", e.name);
            }
            p
        }
    };

    loop {
        let offset = reader.buffer_position() as usize;
        let event = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => {
                let at = reader.error_position() as usize;
                return Err(err(
                    lines.position(text, at),
                    &path_of(&stack),
                    Reason::Malformed(e.to_string()),
                ));
            }
        };
        let here = || lines.position(text, offset);
        match event {
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let _ = start;
                return Err(err(here(), "/", Reason::TrailingContent));
            }
            Event::Start(ref start) | Event::Empty(ref start) => {
                let is_empty = matches!(event, Event::Empty(_));
                if stack.len() >= MAX_DEPTH {
                    return Err(err(
                        here(),
                        &path_of(&stack),
                        Reason::TooDeep { limit: MAX_DEPTH },
                    ));
                }
                let el = element_from_start(start, here()).map_err(|reason| {
                    let mut p = path_of(&stack);
                    let name = start.name().as_ref().to_string();
                    if p != "/" {
                        p.push('/');
                        p.push_str(&name);
                    } else {
                        p = format!("/{name}");
                    }
                    err(here(), &p, reason)
                })?;
                if is_empty {
                    attach(&mut stack, &mut root, el);
                } else {
                    stack.push(el);
                }
            }
            Event::End(_) => {
                // check_end_names guarantees the name matches the innermost open element.
                if let Some(el) = stack.pop() {
                    attach(&mut stack, &mut root, el);
                }
            }
            Event::Text(t) => {
                let s = t.xml10_content();
                push_text(&mut stack, &s, || err(here(), "/", Reason::TrailingContent))?;
            }
            Event::CData(c) => {
                let s = c.into_inner().into_owned();
                push_text(&mut stack, &s, || err(here(), "/", Reason::TrailingContent))?;
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(ch)) => ch.to_string(),
                    Ok(None) => match quick_xml::escape::resolve_predefined_entity(&r) {
                        Some(s) => s.to_string(),
                        None => {
                            return Err(err(
                                here(),
                                &path_of(&stack),
                                Reason::UnknownEntity(r.to_string()),
                            ))
                        }
                    },
                    Err(e) => {
                        return Err(err(
                            here(),
                            &path_of(&stack),
                            Reason::Malformed(e.to_string()),
                        ))
                    }
                };
                // A reference is content even when it resolves to whitespace.
                match stack.last_mut() {
                    Some(top) => append_text(top, &resolved),
                    None => return Err(err(here(), "/", Reason::TrailingContent)),
                }
            }
            Event::DocType(_) => {
                return Err(err(here(), "/", Reason::DocType));
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(err(
            open.pos,
            &path_of(&stack),
            Reason::Malformed(format!("start tag <{}> is never closed", open.name)),
        ));
    }
    root.ok_or_else(|| err(Position { line: 1, col: 1 }, "/", Reason::Empty))
}

fn element_from_start(start: &BytesStart<'_>, pos: Position) -> Result<Element, Reason> {
    let name = start.name().as_ref().to_string();
    let mut attrs: Vec<(String, String)> = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| Reason::Malformed(e.to_string()))?;
        let key = attr.key.as_ref().to_string();
        let value =
            attr.normalized_value(XmlVersion::Implicit1_0)
                .map_err(|e| match e {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                    ) => Reason::UnknownEntity(name),
                    other => Reason::Malformed(other.to_string()),
                })?;
        attrs.push((key, value.into_owned()));
    }
    Ok(Element {
        name,
        attrs,
        children: Vec::new(),
        pos,
    })
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(Node::Element(el)),
        None => *root = Some(el),
    }
}

fn append_text(el: &mut Element, s: &str) {
    if let Some(Node::Text(prev)) = el.children.last_mut() {
        prev.push_str(s);
    } else {
        el.children.push(Node::Text(s.to_string()));
    }
}

fn push_text(
    stack: &mut [Element],
    s: &str,
    outside: impl FnOnce() -> ParseError,
) -> Result<(), ParseError> {
    match stack.last_mut() {
        Some(top) => {
            // Blank runs between elements are layout, except when they continue
            // text that is already there (e.g. "a &amp; b").
            if !s.trim().is_empty() || matches!(top.children.last(), Some(Node::Text(_))) {
                append_text(top, s);
            }
            Ok(())
        }
        None if s.trim().is_empty() => Ok(()),
        None => Err(outside()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Element, ParseError> {
        parse_document("t.xml", text)
    }

    #[test]
    fn keeps_attributes_children_and_text() {
        let el = parse("<a x='1' y=\"&lt;2&gt;\"><b>hi &amp; bye</b><!-- c --><c/></a>")
            .expect("valid document");
        assert_eq!(el.get_attr("y"), Some("<2>"));
        let kids: Vec<_> = el.elements().map(|e| e.name.as_str()).collect();
        assert_eq!(kids, ["b", "c"]);
        assert_eq!(
            el.elements().next().map(Element::text_content),
            Some("hi & bye".to_string())
        );
    }

    #[test]
    fn writes_what_it_reads() {
        let src = "<a x='1'><b>t &lt; u</b><c k='&quot;'/></a>";
        let el = parse(src).expect("valid");
        let again = parse(&el.to_xml_string()).expect("reparse");
        assert_eq!(el, again);
    }

    #[test]
    fn reports_line_and_column_of_unclosed_tag() {
        let e = parse("<a>\n  <b>\n</a>").expect_err("mismatched end");
        assert_eq!(e.pos.line, 3);
        assert!(e.to_string().starts_with("t.xml:3:1: "), "{e}");
    }

    #[test]
    fn rejects_never_closed_root() {
        let e = parse("<a>\n  <b/>\n").expect_err("unclosed");
        assert_eq!((e.pos.line, e.pos.col), (1, 1));
        assert!(e.to_string().contains("never closed"), "{e}");
    }

    #[test]
    fn rejects_doctype_before_any_expansion() {
        let bomb = "<?xml version='1.0'?>\n<!DOCTYPE lolz [<!ENTITY lol 'lol'>\
                    <!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]>\n<lolz>&lol2;</lolz>";
        let e = parse(bomb).expect_err("doctype");
        assert!(matches!(e.reason, Reason::DocType));
        assert_eq!(e.pos.line, 2);
    }

    #[test]
    fn rejects_unknown_entity() {
        let e = parse("<a>&foo;</a>").expect_err("entity");
        assert!(matches!(e.reason, Reason::UnknownEntity(ref n) if n == "foo"));
    }

    #[test]
    fn rejects_oversized_document() {
        let big = format!("<a>{}</a>", "x".repeat(2 * 1024 * 1024));
        let e = parse(&big).expect_err("too big");
        assert!(matches!(e.reason, Reason::TooLarge { .. }));
    }

    #[test]
    fn rejects_deep_nesting() {
        let depth = MAX_DEPTH + 1;
        let doc = format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth));
        let e = parse(&doc).expect_err("too deep");
        assert!(matches!(e.reason, Reason::TooDeep { limit: 64 }));
        let ok = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn rejects_second_root_and_duplicate_attribute() {
        assert!(matches!(
            parse("<a/><b/>").expect_err("two roots").reason,
            Reason::TrailingContent
        ));
        let e = parse("<a x='1' x='2'/>").expect_err("dup");
        assert!(e.to_string().contains("duplicated attribute"), "{e}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let e = parse("<a d='é'>\n  <b></c>\n</a>").expect_err("bad end");
        assert_eq!(e.pos.line, 2);
    }
}
