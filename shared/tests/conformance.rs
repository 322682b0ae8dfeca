//! Every libvirt test-suite document in `../shared/conformance/libvirt` parses
//! (or fails exactly where libvirt fails) and survives a write/parse round trip.

use std::path::PathBuf;

use flotilla_shared::xml::{parse_any, AnyDocument, XmlFlavor};

/// Files libvirt itself rejects, with the reason we expect to give.
const EXPECTED_REJECTIONS: &[(&str, &str)] = &[
    (
        "domain/generic/graphics-listen-back-compat-mismatch.xml",
        "graphics 'listen' attribute '192.168.123.123' must match 'address' attribute of first listen element (found '1.2.3.4')",
    ),
    (
        "domain/generic/graphics-vnc-socket-attr-listen-socket-mismatch.xml",
        "graphics 'socket' attribute '/tmp/vnc.sock' must match 'socket' attribute of first listen element (found '/tmp/mismatch.sock')",
    ),
    (
        "domain/generic/graphics-listen-network-invalid.xml",
        "'network' attribute is required for listen type 'network'",
    ),
    (
        "network/open-network-with-forward-dev.xml",
        "forward dev not allowed for network 'open' with forward mode='open'",
    ),
    (
        // libvirt's validate step: passthrough takes devices, not PCI addresses.
        "network/passthrough-address-crash.xml",
        "only forward mode='hostdev' takes PCI addresses",
    ),
    (
        // libvirt's validate step: device-attached modes have no <ip>.
        "network/passthrough-pf.xml",
        "Unsupported <ip> element in network local with forward mode='passthrough'",
    ),
];

fn corpus_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("FLOTILLA_CONFORMANCE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/libvirt");
    dir.exists().then_some(dir)
}

#[test]
fn libvirt_conformance_corpus() {
    let Some(dir) = corpus_dir() else {
        // CI always has the corpus beside the checkout; a bare clone elsewhere may not.
        assert!(
            std::env::var_os("CI").is_none(),
            "conformance corpus ../shared/conformance/libvirt is missing in CI"
        );
        eprintln!("conformance corpus not found beside the checkout; skipped");
        return;
    };
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.tsv")).expect("MANIFEST.tsv");
    let (mut ok, mut rejected, mut total) = (0, 0, 0);
    let mut failures = Vec::new();
    for line in manifest.lines().skip(1) {
        let mut cols = line.split('\t');
        let (Some(file), Some(kind)) = (cols.next(), cols.next()) else {
            continue;
        };
        if kind == "args" {
            continue;
        }
        total += 1;
        let text = std::fs::read_to_string(dir.join(file)).expect("corpus file");
        let expected = EXPECTED_REJECTIONS.iter().find(|(f, _)| *f == file);
        match (parse_any(file, &text), expected) {
            (Err(e), Some((_, reason))) => {
                if e.to_string().contains(reason) {
                    rejected += 1;
                } else {
                    failures.push(format!("{file}: rejected for the wrong reason: {e}"));
                }
            }
            (Ok(_), Some((_, reason))) => failures.push(format!(
                "{file}: accepted, but libvirt rejects it: {reason}"
            )),
            (Err(e), None) => failures.push(format!("{file}: {e}")),
            (Ok(doc), None) => match round_trip(file, doc) {
                Ok(()) => ok += 1,
                Err(msg) => failures.push(msg),
            },
        }
    }
    eprintln!(
        "conformance: {ok} of {total} documents parse and round-trip; \
         {rejected} rejected as libvirt rejects them"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(ok + rejected, total);
    assert!(total >= 80, "corpus unexpectedly small: {total}");
}

fn round_trip(file: &str, doc: AnyDocument) -> Result<(), String> {
    match doc {
        AnyDocument::Domain(d) => {
            let xml = d.model.to_xml(XmlFlavor::Live);
            let again = match parse_any(file, &xml) {
                Ok(AnyDocument::Domain(again)) => again,
                other => return Err(format!("{file}: reparse failed: {other:?}\n{xml}")),
            };
            if again.model != d.model {
                return Err(format!("{file}: model changed on round trip\n{xml}"));
            }
            if again.model.to_xml(XmlFlavor::Live) != xml {
                return Err(format!("{file}: second write differs"));
            }
        }
        AnyDocument::Network(n) => {
            let xml = n.model.to_xml();
            let again = match parse_any(file, &xml) {
                Ok(AnyDocument::Network(again)) => again,
                other => return Err(format!("{file}: reparse failed: {other:?}\n{xml}")),
            };
            if again.model != n.model {
                return Err(format!("{file}: model changed on round trip\n{xml}"));
            }
        }
    }
    Ok(())
}
