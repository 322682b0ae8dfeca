//! The machine types this host's QEMU offers, from `qemu-system-x86_64
//! -machine help`.
//!
//! The coordinator expands an alias in a definition (`pc`, `q35`) to the
//! versioned type behind it (`pc-i440fx-10.0`) and stores that, as libvirt
//! does at define time, so a guest keeps the same virtual hardware across
//! migrations and QEMU upgrades; the scheduler then only sends it to hosts
//! whose QEMU has that type. Pure apart from [`probe`].

use std::path::Path;

use flotilla_shared::proto::MachineTypes;

/// Reads `-machine help` output: one machine per line, its name first, an
/// alias saying `(alias of TARGET)`.
pub fn parse_machine_help(text: &str) -> MachineTypes {
    let mut out = MachineTypes::default();
    for line in text
        .lines()
        .skip_while(|l| !l.starts_with("Supported machines"))
    {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if line.starts_with("Supported machines") || name == "none" {
            continue;
        }
        match line
            .split("(alias of ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
        {
            Some(target) => out.aliases.push((name.to_string(), target.to_string())),
            None => out.names.push(name.to_string()),
        }
    }
    out
}

/// Asks `emulator` for its machine types; empty when it cannot be run (the
/// coordinator then neither expands nor filters by this host).
pub fn probe(emulator: &Path) -> MachineTypes {
    match std::process::Command::new(emulator)
        .args(["-machine", "help"])
        .output()
    {
        Ok(o) if o.status.success() => parse_machine_help(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => {
            tracing::warn!(emulator = %emulator.display(), status = %o.status, "cannot list QEMU's machine types");
            MachineTypes::default()
        }
        Err(e) => {
            tracing::warn!(emulator = %emulator.display(), error = %e, "cannot list QEMU's machine types");
            MachineTypes::default()
        }
    }
}

/// The named CPU models QEMU can give in full, from its answer to
/// `query-cpu-definitions` (one QMP line among others): those with no
/// unavailable feature, without the non-models `host`, `max` and `base`.
pub fn usable_cpu_models(qmp_output: &str) -> Vec<String> {
    for line in qmp_output.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(defs) = v["return"].as_array() else {
            continue;
        };
        if defs.is_empty() {
            continue;
        }
        let mut out: Vec<String> = defs
            .iter()
            .filter(|d| {
                d["unavailable-features"]
                    .as_array()
                    .is_some_and(|u| u.is_empty())
            })
            .filter_map(|d| d["name"].as_str())
            .filter(|n| !matches!(*n, "host" | "max" | "base"))
            .map(str::to_string)
            .collect();
        out.sort();
        return out;
    }
    Vec::new()
}

/// Asks `emulator` under `accel` (`kvm` or `tcg`) which CPU models this host
/// can give in full; empty when it cannot be asked (then not a filter).
pub fn probe_cpu_models(emulator: &Path, accel: &str) -> Vec<String> {
    use std::io::Write;
    let child = std::process::Command::new(emulator)
        .args([
            "-machine",
            "none",
            "-accel",
            accel,
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-qmp", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(emulator = %emulator.display(), error = %e, "cannot list QEMU's CPU models");
            return Vec::new();
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-cpu-definitions\"}\n{\"execute\":\"quit\"}\n",
        );
    }
    match child.wait_with_output() {
        Ok(o) => usable_cpu_models(&String::from_utf8_lossy(&o.stdout)),
        Err(e) => {
            tracing::warn!(emulator = %emulator.display(), error = %e, "cannot list QEMU's CPU models");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_cpu_models_are_those_missing_no_feature() {
        let out = "{\"QMP\": {\"version\": {}}}\n{\"return\": {}}\n\
            {\"return\": [{\"name\": \"max\", \"unavailable-features\": []}, \
            {\"name\": \"Skylake-Server\", \"unavailable-features\": [\"avx512f\"]}, \
            {\"name\": \"qemu64\", \"unavailable-features\": []}, \
            {\"name\": \"EPYC\", \"unavailable-features\": []}]}\n";
        assert_eq!(usable_cpu_models(out), ["EPYC", "qemu64"]);
        assert!(usable_cpu_models("").is_empty());
    }

    #[test]
    fn aliases_and_versioned_types_are_told_apart() {
        let help = "Supported machines are:\n\
            microvm              microvm (i386)\n\
            pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
            pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n\
            pc-i440fx-9.2        Standard PC (i440FX + PIIX, 1996)\n\
            q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n\
            pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n\
            none                 empty machine\n";
        let m = parse_machine_help(help);
        assert_eq!(
            m.aliases,
            [
                ("pc".to_string(), "pc-i440fx-10.0".to_string()),
                ("q35".to_string(), "pc-q35-10.0".to_string())
            ]
        );
        assert_eq!(
            m.names,
            ["microvm", "pc-i440fx-10.0", "pc-i440fx-9.2", "pc-q35-10.0"]
        );
        assert_eq!(m.resolve("pc"), Some("pc-i440fx-10.0"));
        assert!(m.has("pc-i440fx-9.2") && m.has("q35") && !m.has("pc-i440fx-1.0"));
    }
}
