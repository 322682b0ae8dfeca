//! Serial consoles: a VM's first serial port carried over a coordinator
//! stream, as `virsh console` carries it.
//!
//! QEMU gives a `<serial type='pty'>` a pseudo-terminal and says which in
//! `info chardev`; the agent opens that pty (it runs on this host only) and
//! copies bytes both ways. The pty is polled, not read on a blocking
//! thread, so a relay that ends leaves nothing waiting on the guest.

use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::OFlag;
use tokio::net::unix::pipe;

/// The pty of the VM's console, from `info chardev`: the first serial port
/// (`charserial0`), else a virtio console (`charconsole0`). Only a
/// `/dev/pts/N` path is taken: the answer comes from QEMU, which the agent
/// (root) must not be led into opening some other terminal for.
pub fn pty_of(info_chardev: &str) -> Option<String> {
    let find = |label: &str| {
        info_chardev.lines().find_map(|l| {
            let rest = l.trim().strip_prefix(label)?.strip_prefix(": filename=")?;
            let path = rest.strip_prefix("pty:")?.trim();
            let n = path.strip_prefix("/dev/pts/")?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| path.to_string())
        })
    };
    find("charserial0").or_else(|| find("charconsole0"))
}

/// An open pty, read and written without blocking a thread.
pub type Pty = tokio::io::Join<pipe::Receiver, pipe::Sender>;

/// Opens the pty at `path`, never as this process's controlling terminal.
/// A read ends with `EIO` once QEMU closes its side.
pub fn open(path: &str) -> std::io::Result<Pty> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)?;
    let writer = file.try_clone()?;
    Ok(tokio::io::join(
        pipe::Receiver::from_file_unchecked(file)?,
        pipe::Sender::from_file_unchecked(writer)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_serial_port_wins_then_a_virtio_console() {
        let info = "charmonitor: filename=unix:/run/d/qmp.sock,server=on\n\
                    charconsole0: filename=pty:/dev/pts/9\n\
                    charserial0: filename=pty:/dev/pts/4\n";
        assert_eq!(pty_of(info).as_deref(), Some("/dev/pts/4"));
        let virtio = "charconsole0: filename=pty:/dev/pts/9\n";
        assert_eq!(pty_of(virtio).as_deref(), Some("/dev/pts/9"));
        let file = "charserial0: filename=file:/tmp/serial.log\n";
        assert_eq!(pty_of(file), None);
        for odd in [
            "pty:/dev/tty1",
            "pty:/dev/pts/../tty1",
            "pty:/dev/pts/",
            "pty:/etc/shadow",
        ] {
            assert_eq!(
                pty_of(&format!("charserial0: filename={odd}\n")),
                None,
                "{odd}"
            );
        }
        assert_eq!(pty_of(""), None);
    }
}
