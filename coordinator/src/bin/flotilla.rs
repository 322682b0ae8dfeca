//! `flotilla`: the operator CLI.
//!
//! Offline verbs (`validate`) run here; fleet verbs talk to the coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_shared::xml::validate::validate_document;

/// Operate a Flotilla fleet of QEMU/KVM hosts.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check libvirt domain or network XML files offline.
    ///
    /// Example: flotilla validate web01.xml public.xml
    Validate {
        /// Files to check; each is a <domain> or a <network>.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => match validate(&files) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// Validates each file and prints its verdict; true when all are valid.
fn validate(files: &[PathBuf]) -> anyhow::Result<bool> {
    let mut all_ok = true;
    for file in files {
        let name = file.display().to_string();
        let verdict = match std::fs::read(file) {
            Ok(bytes) if bytes.len() > flotilla_shared::xml::tree::MAX_DOCUMENT_BYTES => {
                // Refuse before decoding: the limit exists so we never hold huge inputs.
                println!(
                    "{name}:1:1: error: /: document is {} bytes, over the limit of {}",
                    bytes.len(),
                    flotilla_shared::xml::tree::MAX_DOCUMENT_BYTES
                );
                all_ok = false;
                continue;
            }
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => validate_document(&name, &text),
                Err(e) => {
                    println!("{name}:1:1: error: /: not UTF-8 text: {e}");
                    all_ok = false;
                    continue;
                }
            },
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {name}"));
            }
        };
        all_ok &= verdict.ok;
        for line in verdict.lines {
            println!("{line}");
        }
    }
    Ok(all_ok)
}
