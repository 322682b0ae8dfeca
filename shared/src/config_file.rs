//! A daemon's TOML config file, read as the command-line flags it stands for.
//!
//! Each key is a long flag of the daemon (`networks-dir = "/etc/flotilla/networks"`
//! is `--networks-dir=/etc/flotilla/networks`), so the file and the flags
//! cannot drift apart and `--help` documents both. The binaries place these
//! arguments before the real ones and let a later occurrence win, which gives
//! the precedence operators expect: flags, then environment, then the file,
//! then built-in defaults.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Why a config file was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{}: cannot read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: error: {reason}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the TOML parser said.
        reason: String,
    },
    /// A key that is not one of the daemon's flags.
    #[error("{}: error: unknown key '{key}' (known: {known})", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// The keys the daemon accepts.
        known: String,
    },
    /// A value that cannot stand for a flag (a table, a date).
    #[error("{}: error: key '{key}': {reason}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// Why.
        reason: String,
    },
    /// The flags the file stands for were refused by the daemon's parser.
    #[error("{}: error: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, naming the key as `--KEY`.
        reason: String,
    },
}

/// Flags that make no sense in a config file.
// `once-start` turns a daemon into a one-shot run: never a service's setting.
const NOT_CONFIGURABLE: &[&str] = &["config", "help", "version", "once-start"];

/// Turns the config file's `text` into arguments for `command`.
///
/// `env` looks up environment variables: a key whose flag is also set from
/// the environment is skipped, so the environment beats the file.
pub fn config_args(
    path: &Path,
    text: &str,
    command: &clap::Command,
    env: impl Fn(&OsStr) -> Option<OsString>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        ConfigFileError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            reason: e.message().to_string(),
        }
    })?;
    let configurable: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| !NOT_CONFIGURABLE.contains(&l)))
        .collect();
    let mut args = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = configurable.iter().find(|a| a.get_long() == Some(&long)) else {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
                known: configurable
                    .iter()
                    .filter_map(|a| a.get_long())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if arg.get_env().is_some_and(|name| env(name).is_some()) {
            continue;
        }
        let bad = |reason: &str| ConfigFileError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
            reason: reason.to_string(),
        };
        let is_switch = !arg.get_action().takes_values();
        let values = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if is_switch => {
                    if *b {
                        args.push(OsString::from(format!("--{long}")));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(_) => return Err(bad("nested arrays are not flags")),
                toml::Value::Table(_) => return Err(bad("a table is not a flag value")),
                toml::Value::Datetime(_) => return Err(bad("a date is not a flag value")),
            };
            if is_switch {
                return Err(bad("expects true or false"));
            }
            args.push(OsString::from(format!("--{long}={text}")));
        }
    }
    // Parse the file's flags alone, so a bad value is blamed on the file and
    // not on the command line it is later merged into.
    let mut probe = vec![OsString::from(command.get_name())];
    probe.extend(args.iter().cloned());
    if let Err(e) = command.clone().try_get_matches_from(probe) {
        let rendered = e.to_string();
        let first = rendered.lines().next().unwrap_or("invalid value");
        return Err(ConfigFileError::Invalid {
            path: path.to_path_buf(),
            reason: first.trim_start_matches("error: ").to_string(),
        });
    }
    Ok(args)
}

/// The last `--config FILE` (or `--config=FILE`) among `argv`, before any `--`.
///
/// The last, because the command keeps the last occurrence of a flag.
pub fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut found = None;
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            found = it.next().map(PathBuf::from);
        } else if let Some(p) = s.strip_prefix("--config=") {
            found = Some(PathBuf::from(p));
        }
    }
    found
}

/// `argv` with the arguments of the `--config` file, if any, placed first.
///
/// The command must let a later occurrence of a flag override an earlier one
/// (`args_override_self`), which is what makes the real flags win.
pub fn merged_argv(
    argv: Vec<OsString>,
    command: &clap::Command,
) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(path) = config_path(&argv) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read {
        path: path.clone(),
        source,
    })?;
    let from_file = config_args(&path, &text, command, |n| std::env::var_os(n))?;
    // A flag given on the command line replaces the file's key outright,
    // also for a flag that takes a list (where a later occurrence would add
    // to the file's values rather than replace them).
    let given: Vec<String> = argv
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .filter_map(|a| {
            a.strip_prefix("--")
                .map(|l| l.split('=').next().unwrap_or(l).to_string())
        })
        .collect();
    let from_file: Vec<OsString> = from_file
        .into_iter()
        .filter(|a| {
            let a = a.to_string_lossy();
            let long = a.trim_start_matches("--").split('=').next().unwrap_or("");
            !given.iter().any(|g| g == long)
        })
        .collect();
    let mut merged = Vec::with_capacity(argv.len() + from_file.len());
    let mut rest = argv.into_iter();
    merged.extend(rest.next());
    merged.extend(from_file);
    merged.extend(rest);
    Ok(merged)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    // The parser's offset is a byte offset; step back to a character boundary.
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn daemon() -> Command {
        Command::new("daemon")
            .args_override_self(true)
            .arg(Arg::new("config").long("config"))
            .arg(
                Arg::new("state-dir")
                    .long("state-dir")
                    .default_value("/var/lib/x"),
            )
            .arg(
                Arg::new("heartbeat-secs")
                    .long("heartbeat-secs")
                    .value_parser(clap::value_parser!(u64)),
            )
            .arg(
                Arg::new("accel")
                    .long("accel")
                    .value_parser(["auto", "kvm", "tcg"]),
            )
            .arg(Arg::new("tls-dir").long("tls-dir").env("FLT_TEST_TLS"))
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue),
            )
    }

    fn no_env(_: &OsStr) -> Option<OsString> {
        None
    }

    fn args(text: &str) -> Result<Vec<String>, ConfigFileError> {
        config_args(Path::new("agent.toml"), text, &daemon(), no_env).map(|v| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn keys_become_flags_and_underscores_are_forgiven() {
        let got = args("state-dir = '/srv'\nheartbeat_secs = 3\naccel = 'kvm'\nverbose = true\n");
        let mut got = got.expect("valid");
        got.sort();
        assert_eq!(
            got,
            [
                "--accel=kvm",
                "--heartbeat-secs=3",
                "--state-dir=/srv",
                "--verbose"
            ]
        );
        assert_eq!(
            args("verbose = false").expect("valid"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn command_line_flags_override_the_file() {
        let argv = os(&["daemon", "--state-dir", "/cli"]);
        let from_file = args("state-dir = '/file'\nheartbeat-secs = 7").expect("valid");
        let mut merged = vec![argv[0].clone()];
        merged.extend(from_file.iter().map(OsString::from));
        merged.extend(argv[1..].iter().cloned());
        let m = daemon().try_get_matches_from(merged).expect("parses");
        assert_eq!(
            m.get_one::<String>("state-dir").map(String::as_str),
            Some("/cli")
        );
        assert_eq!(m.get_one::<u64>("heartbeat-secs"), Some(&7));
    }

    #[test]
    fn the_environment_beats_the_file() {
        let env = |n: &OsStr| (n == "FLT_TEST_TLS").then(|| OsString::from("/env"));
        let got =
            config_args(Path::new("a.toml"), "tls-dir = '/file'", &daemon(), env).expect("valid");
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(
            args("tls-dir = '/file'").expect("valid"),
            ["--tls-dir=/file"]
        );
    }

    #[test]
    fn refusals_name_the_file_the_key_and_the_reason() {
        let e = |t: &str| args(t).expect_err("refused").to_string();
        assert_eq!(
            e("state-dir = '/a'\nstate_dri = 1"),
            "agent.toml: error: unknown key 'state_dri' \
             (known: state-dir, heartbeat-secs, accel, tls-dir, verbose)"
        );
        assert_eq!(
            e("config = 'other.toml'"),
            "agent.toml: error: unknown key 'config' \
             (known: state-dir, heartbeat-secs, accel, tls-dir, verbose)"
        );
        // The TOML crate's wording is its own; the file and position are ours.
        let syntax = e("state-dir = '/a'\naccel = ");
        assert!(syntax.starts_with("agent.toml:2:9: error: "), "{syntax}");
        assert_eq!(
            e("accel = 'hvf'"),
            "agent.toml: error: invalid value 'hvf' for '--accel <accel>'"
        );
        assert_eq!(
            e("heartbeat-secs = 'soon'"),
            "agent.toml: error: invalid value 'soon' for '--heartbeat-secs <heartbeat-secs>': \
             invalid digit found in string"
        );
        assert_eq!(
            e("verbose = 'yes'"),
            "agent.toml: error: key 'verbose': expects true or false"
        );
        assert_eq!(
            e("[agent]\nstate-dir = '/a'"),
            "agent.toml: error: unknown key 'agent' \
             (known: state-dir, heartbeat-secs, accel, tls-dir, verbose)"
        );
        assert_eq!(
            e("accel = { a = 1 }"),
            "agent.toml: error: key 'accel': a table is not a flag value"
        );
    }

    #[test]
    fn the_config_flag_is_found_before_a_double_dash() {
        assert_eq!(
            config_path(&os(&["d", "--x", "1", "--config", "/c.toml"])),
            Some(PathBuf::from("/c.toml"))
        );
        assert_eq!(
            config_path(&os(&["d", "--config=/c.toml"])),
            Some(PathBuf::from("/c.toml"))
        );
        assert_eq!(config_path(&os(&["d", "--", "--config", "/c.toml"])), None);
        assert_eq!(config_path(&os(&["d"])), None);
        // The command keeps the last occurrence, so the file read must be that one.
        assert_eq!(
            config_path(&os(&["d", "--config", "/a.toml", "--config=/b.toml"])),
            Some(PathBuf::from("/b.toml"))
        );
    }

    #[test]
    fn a_one_shot_flag_is_not_a_setting() {
        let cmd = daemon().arg(Arg::new("once-start").long("once-start"));
        let e = config_args(Path::new("a.toml"), "once-start = 'vm.xml'", &cmd, |_| None)
            .expect_err("refused");
        assert!(
            e.to_string()
                .starts_with("a.toml: error: unknown key 'once-start'"),
            "{e}"
        );
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        assert_eq!(line_column("é = 1\nné", 9), (2, 2));
        // An offset inside a character counts from that character's start.
        assert_eq!(line_column("aé", 2), (1, 2));
    }

    #[test]
    fn merged_argv_puts_the_file_first_and_reports_a_missing_file() {
        let dir = std::env::temp_dir().join(format!("flt-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("d.toml");
        std::fs::write(&file, "state-dir = '/file'\nheartbeat-secs = 7\n").expect("write");
        let argv = os(&[
            "daemon",
            "--config",
            &file.to_string_lossy(),
            "--state-dir=/cli",
        ]);
        let merged = merged_argv(argv, &daemon()).expect("merged");
        // The file's keys come first; one the command line gives is left
        // out (a flag replaces the key, lists included).
        assert_eq!(merged[1], OsString::from("--heartbeat-secs=7"));
        assert!(!merged.contains(&OsString::from("--state-dir=/file")));
        let m = daemon().try_get_matches_from(merged).expect("parses");
        assert_eq!(
            m.get_one::<String>("state-dir").map(String::as_str),
            Some("/cli")
        );
        let missing = dir.join("absent.toml");
        let e = merged_argv(
            os(&["daemon", "--config", &missing.to_string_lossy()]),
            &daemon(),
        )
        .expect_err("missing");
        assert_eq!(e.to_string(), format!("{}: cannot read", missing.display()));
        assert!(
            std::error::Error::source(&e).is_some(),
            "the OS error is the source"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
