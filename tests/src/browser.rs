//! A real browser for the web console tests: Debian's chromium, headless,
//! driven by `tests/web/browser.mjs` (puppeteer-core over the DevTools
//! protocol) inside a test namespace.
//!
//! The script looks and reports; the test decides when: each
//! [`Browser::ask`] is one JSON command and its JSON answer. The guest's
//! counter is read off the console's screen ([`crate::guest`] draws a
//! reference strip for that), not from QEMU.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{Lines, Netns};

/// Where `deploy/lib/web.sh` installed noVNC and puppeteer-core (an npm
/// prefix): `FLOTILLA_WEB_DEPS`, or `deploy/web` in this checkout.
pub fn web_deps() -> PathBuf {
    std::env::var_os("FLOTILLA_WEB_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/web")))
}

/// noVNC's directory for `--novnc-dir`.
pub fn novnc_dir() -> PathBuf {
    web_deps().join("node_modules/@novnc/novnc")
}

/// A headless chromium and the script that drives it.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
    /// What chromium said it is.
    pub version: String,
}

impl Browser {
    /// Starts chromium inside `ns`, trusting exactly the key of the
    /// certificate at `cert` (the coordinator's).
    pub fn launch(ns: &Netns, cert: &std::path::Path) -> Browser {
        let deps = web_deps();
        assert!(
            deps.join("node_modules/puppeteer-core").is_dir(),
            "puppeteer-core is not installed in {}: run deploy/test.sh (it runs deploy/lib/web.sh)",
            deps.display()
        );
        let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web/browser.mjs"));
        let mut c = ns.command(std::path::Path::new("node"));
        c.arg(script)
            .env("FLOTILLA_WEB_DEPS", &deps)
            .env("FLOTILLA_WEB_CERT", cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawn node");
        let stdin = child.stdin.take().expect("stdin");
        let mut lines = Lines::read(child.stdout.take().expect("stdout"));
        let hello = lines
            .next_line(Duration::from_secs(60))
            .expect("chromium did not start");
        let hello: Value = serde_json::from_str(&hello).expect("hello is JSON");
        Browser {
            child,
            stdin,
            lines,
            version: hello["chromium"].as_str().unwrap_or("?").to_string(),
        }
    }

    /// Sends one command and returns its answer; an `error` answer panics
    /// with the command.
    pub fn ask(&mut self, command: Value) -> Value {
        self.try_ask(command.clone())
            .unwrap_or_else(|e| panic!("browser: {command}: {e}"))
    }

    /// Like [`Browser::ask`], with the script's error as `Err`.
    pub fn try_ask(&mut self, command: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{command}").map_err(|e| e.to_string())?;
        // Commands carry their own deadlines; this one only catches a hung script.
        let line = self.lines.next_line(Duration::from_secs(120))?;
        let answer: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        match answer.get("error") {
            Some(e) => Err(e.to_string()),
            None => Ok(answer),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", serde_json::json!({"cmd": "quit"}));
        if !crate::wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
