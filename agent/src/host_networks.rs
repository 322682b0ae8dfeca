//! The host's network definitions: every `*.xml` in the networks directory.
//!
//! Loading never half-succeeds silently: files that fail to parse, and
//! duplicate names, are reported per file, and the good definitions are still
//! served. Loading is re-run on SIGHUP and on request.

use std::path::{Path, PathBuf};

use flotilla_shared::xml::{Network, ParseError};

/// What loading a networks directory produced.
#[derive(Debug, Clone, Default)]
pub struct HostNetworks {
    /// The directory read.
    pub dir: PathBuf,
    /// Valid definitions, sorted by name.
    pub networks: Vec<Network>,
    /// One message per file that was skipped, naming the file and why.
    pub problems: Vec<String>,
}

/// The directory itself could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read networks directory {dir}")]
pub struct NetworksDirError {
    /// The directory.
    pub dir: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl HostNetworks {
    /// Loads every `*.xml` file in `dir`.
    pub fn load(dir: &Path) -> Result<HostNetworks, NetworksDirError> {
        let err = |source| NetworksDirError {
            dir: dir.display().to_string(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .collect();
        files.sort();
        let mut out = HostNetworks {
            dir: dir.to_path_buf(),
            ..Default::default()
        };
        for file in files {
            let name = file.display().to_string();
            let parsed: Result<Network, String> = std::fs::read_to_string(&file)
                .map_err(|e| format!("{name}: cannot read: {e}"))
                .and_then(|text| {
                    Network::parse(&name, &text)
                        .map(|d| d.model)
                        .map_err(|e: ParseError| e.to_string())
                });
            match parsed {
                Ok(net) if out.networks.iter().any(|n| n.name == net.name) => {
                    out.problems.push(format!(
                        "{name}: network '{}' is already defined by another file",
                        net.name
                    ))
                }
                Ok(net) => out.networks.push(net),
                Err(msg) => out.problems.push(msg),
            }
        }
        out.networks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
