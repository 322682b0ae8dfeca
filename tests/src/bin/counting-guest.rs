//! Writes the counting guest's 1 MiB boot disk to the path given.
//!
//! Used by `deploy/demo.sh`: `counting-guest /tmp/flotilla-demo/guest.img`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: counting-guest PATH");
        return ExitCode::from(2);
    };
    match std::fs::write(&path, flotilla_tests::guest::counting_disk_image()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("counting-guest: cannot write {path}: {e}");
            ExitCode::from(1)
        }
    }
}
