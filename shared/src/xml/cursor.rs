//! Reading typed models out of an [`Element`] while keeping what they skip.
//!
//! A [`Cursor`] marks every attribute and child a model takes. Whatever is left
//! when the model calls [`Cursor::finish`] becomes that model's [`Extra`], kept
//! verbatim and written back, and each skipped child element is noted as
//! "kept but not interpreted" so `flotilla validate` can list it.

use std::cell::RefCell;
use std::str::FromStr;

use super::error::{InvalidValue, ParseError, Reason};
use super::tree::{Element, Node};

/// What a typed element did not interpret: kept verbatim, written back last.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extra {
    /// Attributes the model does not type, in document order.
    pub attrs: Vec<(String, String)>,
    /// Child nodes the model does not type, in document order.
    pub children: Vec<Node>,
}

impl Extra {
    /// Appends the kept attributes and children to a freshly built element.
    pub fn apply(&self, mut el: Element) -> Element {
        el.attrs.extend(self.attrs.iter().cloned());
        el.children.extend(self.children.iter().cloned());
        el
    }

    /// True when nothing was kept.
    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty() && self.children.is_empty()
    }
}

/// Shared state of one parse: the source name and the notes it collects.
#[derive(Debug)]
pub struct ReadContext {
    source: String,
    uninterpreted: RefCell<Vec<String>>,
}

impl ReadContext {
    /// A context for text that came from `source`.
    pub fn new(source: &str) -> Self {
        ReadContext {
            source: source.to_string(),
            uninterpreted: RefCell::new(Vec::new()),
        }
    }

    /// Element paths that were kept but not interpreted, deduplicated, in order.
    pub fn into_uninterpreted(self) -> Vec<String> {
        let mut v = self.uninterpreted.into_inner();
        let mut seen = std::collections::HashSet::new();
        v.retain(|p| seen.insert(p.clone()));
        v
    }

    /// The source name errors carry.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A typed view over one element that records what has been consumed.
pub struct Cursor<'a> {
    el: &'a Element,
    path: String,
    ctx: &'a ReadContext,
    used_attrs: Vec<bool>,
    used_children: Vec<bool>,
}

impl<'a> Cursor<'a> {
    /// A cursor on the root element.
    pub fn root(el: &'a Element, ctx: &'a ReadContext) -> Self {
        Self::at(el, format!("/{}", el.name), ctx)
    }

    fn at(el: &'a Element, path: String, ctx: &'a ReadContext) -> Self {
        Cursor {
            el,
            path,
            ctx,
            used_attrs: vec![false; el.attrs.len()],
            used_children: vec![false; el.children.len()],
        }
    }

    /// The element under the cursor.
    pub fn element(&self) -> &'a Element {
        self.el
    }

    /// The element's name.
    pub fn name(&self) -> &'a str {
        &self.el.name
    }

    /// This element's path, e.g. `/domain/devices/graphics`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// An error located at this element.
    pub fn error(&self, reason: Reason) -> ParseError {
        ParseError {
            source_name: self.ctx.source.clone(),
            pos: self.el.pos,
            path: self.path.clone(),
            reason,
        }
    }

    /// An "invalid value" error for attribute or element `what`.
    pub fn invalid(&self, what: &str, value: &str, expected: &str) -> ParseError {
        self.error(Reason::InvalidValue(Box::new(InvalidValue {
            what: what.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        })))
    }

    /// Takes attribute `key`.
    pub fn attr(&mut self, key: &str) -> Option<&'a str> {
        let el = self.el;
        let i = el.attrs.iter().position(|(k, _)| k == key)?;
        self.used_attrs[i] = true;
        Some(el.attrs[i].1.as_str())
    }

    /// Takes attribute `key` as an owned string.
    pub fn attr_string(&mut self, key: &str) -> Option<String> {
        self.attr(key).map(str::to_string)
    }

    /// Takes attribute `key`, failing when it is absent.
    pub fn required_attr(&mut self, key: &'static str) -> Result<&'a str, ParseError> {
        match self.attr(key) {
            Some(v) => Ok(v),
            None => Err(self.error(Reason::MissingAttribute(key))),
        }
    }

    /// Takes attribute `key` and parses it, naming `expected` on failure.
    pub fn parsed_attr<T: FromStr>(
        &mut self,
        key: &str,
        expected: &str,
    ) -> Result<Option<T>, ParseError> {
        match self.attr(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<T>()
                .map(Some)
                .map_err(|_| self.invalid(&format!("attribute '{key}'"), v, expected)),
        }
    }

    /// Takes a `yes`/`no` attribute.
    pub fn yes_no_attr(&mut self, key: &str) -> Result<Option<bool>, ParseError> {
        match self.attr(key) {
            None => Ok(None),
            Some("yes") => Ok(Some(true)),
            Some("no") => Ok(Some(false)),
            Some(v) => Err(self.invalid(&format!("attribute '{key}'"), v, "'yes' or 'no'")),
        }
    }

    /// Takes an attribute that must be one of `allowed`.
    pub fn enum_attr(
        &mut self,
        key: &str,
        allowed: &[&str],
    ) -> Result<Option<&'a str>, ParseError> {
        match self.attr(key) {
            None => Ok(None),
            Some(v) if allowed.contains(&v) => Ok(Some(v)),
            Some(v) => Err(self.invalid(
                &format!("attribute '{key}'"),
                v,
                &format!("one of {}", allowed.join(", ")),
            )),
        }
    }

    /// Takes the first not-yet-taken child element called `name`.
    pub fn child(&mut self, name: &str) -> Option<Cursor<'a>> {
        let el = self.el;
        for (i, n) in el.children.iter().enumerate() {
            if let Node::Element(c) = n {
                if c.name == name && !self.used_children[i] {
                    self.used_children[i] = true;
                    return Some(Cursor::at(c, format!("{}/{}", self.path, c.name), self.ctx));
                }
            }
        }
        None
    }

    /// Takes every remaining child element called `name`, in order.
    pub fn children(&mut self, name: &str) -> Vec<Cursor<'a>> {
        let mut out = Vec::new();
        while let Some(c) = self.child(name) {
            out.push(c);
        }
        out
    }

    /// Takes every remaining child element, in order.
    pub fn all_children(&mut self) -> Vec<Cursor<'a>> {
        let el = self.el;
        let mut out = Vec::new();
        for (i, n) in el.children.iter().enumerate() {
            if let Node::Element(c) = n {
                if !self.used_children[i] {
                    self.used_children[i] = true;
                    out.push(Cursor::at(c, format!("{}/{}", self.path, c.name), self.ctx));
                }
            }
        }
        out
    }

    /// Takes the element's text, trimmed.
    pub fn text(&mut self) -> String {
        for (i, n) in self.el.children.iter().enumerate() {
            if matches!(n, Node::Text(_)) {
                self.used_children[i] = true;
            }
        }
        self.el.text_content().trim().to_string()
    }

    /// Takes the text of child `name`, if that child exists.
    pub fn child_text(&mut self, name: &str) -> Option<String> {
        self.child(name).map(|mut c| {
            let t = c.text();
            // A text-only element has nothing else worth keeping.
            let _ = c.finish();
            t
        })
    }

    /// Takes the text of child `name` and parses it.
    pub fn parsed_child_text<T: FromStr>(
        &mut self,
        name: &str,
        expected: &str,
    ) -> Result<Option<T>, ParseError> {
        let Some(mut c) = self.child(name) else {
            return Ok(None);
        };
        let t = c.text();
        let v = t
            .parse::<T>()
            .map_err(|_| c.invalid(&format!("<{name}>"), &t, expected))?;
        let _ = c.finish();
        Ok(Some(v))
    }

    /// Keeps the whole element untyped, noting it as not interpreted.
    pub fn keep_verbatim(self) -> Element {
        self.ctx.uninterpreted.borrow_mut().push(self.path.clone());
        self.el.clone()
    }

    /// Ends reading: returns what was not taken and notes skipped children.
    pub fn finish(self) -> Extra {
        let attrs = self
            .el
            .attrs
            .iter()
            .zip(&self.used_attrs)
            .filter(|(_, used)| !**used)
            .map(|(a, _)| a.clone())
            .collect();
        let mut children = Vec::new();
        for (n, used) in self.el.children.iter().zip(&self.used_children) {
            if *used {
                continue;
            }
            if let Node::Element(c) = n {
                self.ctx
                    .uninterpreted
                    .borrow_mut()
                    .push(format!("{}/{}", self.path, c.name));
            }
            children.push(n.clone());
        }
        Extra { attrs, children }
    }
}
