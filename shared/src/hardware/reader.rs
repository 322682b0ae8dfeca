//! A strict reader over a definition's elements: every attribute and child a
//! plan does not take is a refusal naming its path, so nothing the operator
//! wrote is quietly dropped.

use std::cell::RefCell;
use std::fmt;

use crate::xml::tree::{Element, Node};

/// Something in a definition Flotilla cannot build yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unsupported {
    /// Element path, e.g. `/domain/devices/interface[2]/virtualport`.
    pub path: String,
    /// What exactly, e.g. "attribute 'type' = 'openvswitch'".
    pub what: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is not supported by Flotilla yet",
            self.path, self.what
        )
    }
}

/// The refusals one reading collects.
#[derive(Debug, Default)]
pub struct Refusals(RefCell<Vec<Unsupported>>);

impl Refusals {
    /// Records one.
    pub fn push(&self, path: &str, what: String) {
        self.0.borrow_mut().push(Unsupported {
            path: path.to_string(),
            what,
        });
    }

    /// Everything recorded, in document order.
    pub fn into_vec(self) -> Vec<Unsupported> {
        self.0.into_inner()
    }

    /// True while nothing was refused.
    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

/// One element being read; what it does not take is refused by [`R::done`].
pub struct R<'a> {
    el: &'a Element,
    path: String,
    used_attrs: RefCell<Vec<bool>>,
    used_children: RefCell<Vec<bool>>,
    out: &'a Refusals,
}

impl<'a> R<'a> {
    /// A reader on `el` at `path`.
    pub fn new(el: &'a Element, path: String, out: &'a Refusals) -> Self {
        R {
            el,
            path,
            used_attrs: RefCell::new(vec![false; el.attrs.len()]),
            used_children: RefCell::new(vec![false; el.children.len()]),
            out,
        }
    }

    /// The element's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The element itself.
    pub fn element(&self) -> &'a Element {
        self.el
    }

    /// The element's name.
    pub fn name(&self) -> &'a str {
        &self.el.name
    }

    /// Attribute `key`, taken.
    pub fn attr(&self, key: &str) -> Option<&'a str> {
        let i = self.el.attrs.iter().position(|(k, _)| k == key)?;
        self.used_attrs.borrow_mut()[i] = true;
        Some(self.el.attrs[i].1.as_str())
    }

    /// Attribute `key` as a number (decimal or `0x` hex); a bad value is refused.
    pub fn num(&self, key: &str) -> Option<u64> {
        let v = self.attr(key)?;
        let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        };
        if parsed.is_none() {
            self.refuse(format!("attribute '{key}' = '{v}' (not a number)"));
        }
        parsed
    }

    /// Attribute `key`, which must be one of `allowed` (else refused, and None).
    pub fn one_of(&self, key: &str, allowed: &[&str]) -> Option<&'a str> {
        let v = self.attr(key)?;
        if allowed.contains(&v) {
            Some(v)
        } else {
            self.refuse(format!("{key} '{v}'"));
            None
        }
    }

    /// `yes`/`on` → true, `no`/`off` → false.
    pub fn flag(&self, key: &str) -> Option<bool> {
        match self.attr(key)? {
            "yes" | "on" => Some(true),
            "no" | "off" => Some(false),
            other => {
                self.refuse(format!("{key} '{other}'"));
                None
            }
        }
    }

    /// Takes attributes that only carry data Flotilla keeps as written.
    pub fn data_attrs(&self, keys: &[&str]) {
        for k in keys {
            let _ = self.attr(k);
        }
    }

    /// The first child named `name`, taken.
    pub fn child(&self, name: &str) -> Option<R<'a>> {
        self.children(name).into_iter().next()
    }

    /// Every child named `name`, taken, with `[n]` paths when repeated.
    pub fn children(&self, name: &str) -> Vec<R<'a>> {
        let mut found = Vec::new();
        for (i, n) in self.el.children.iter().enumerate() {
            if let Node::Element(e) = n {
                if e.name == name {
                    found.push((i, e));
                }
            }
        }
        let many = found.len() > 1;
        found
            .into_iter()
            .enumerate()
            .map(|(k, (i, e))| {
                self.used_children.borrow_mut()[i] = true;
                let path = if many {
                    format!("{}/{}[{}]", self.path, name, k + 1)
                } else {
                    format!("{}/{}", self.path, name)
                };
                R::new(e, path, self.out)
            })
            .collect()
    }

    /// Children that only carry data, taken whole.
    pub fn data_children(&self, names: &[&str]) {
        for n in names {
            for c in self.children(n) {
                c.take_all();
            }
        }
    }

    /// The text content, trimmed; text counts as taken.
    pub fn text(&self) -> String {
        let mut used = self.used_children.borrow_mut();
        let mut out = String::new();
        for (i, n) in self.el.children.iter().enumerate() {
            if let Node::Text(t) = n {
                used[i] = true;
                out.push_str(t);
            }
        }
        out.trim().to_string()
    }

    /// Refuses something about this element.
    pub fn refuse(&self, what: impl Into<String>) {
        self.out.push(&self.path, what.into());
    }

    /// Marks everything as taken (an element kept as data).
    pub fn take_all(&self) {
        self.used_attrs.borrow_mut().fill(true);
        self.used_children.borrow_mut().fill(true);
    }

    /// Ends reading: refuses each attribute and child element not taken.
    pub fn done(self) {
        for ((k, v), used) in self.el.attrs.iter().zip(self.used_attrs.borrow().iter()) {
            if !used && !k.starts_with("xmlns") {
                self.refuse(format!("attribute {k}='{v}'"));
            }
        }
        for (n, used) in self
            .el
            .children
            .iter()
            .zip(self.used_children.borrow().iter())
        {
            if *used {
                continue;
            }
            match n {
                Node::Element(e) => self
                    .out
                    .push(&format!("{}/{}", self.path, e.name), "element".to_string()),
                Node::Text(t) => self.refuse(format!("text '{}'", t.trim())),
            }
        }
    }
}
