//! A guest whose state can be observed: a 512-byte boot sector that counts.
//!
//! SeaBIOS loads it at 0x7c00. It increments a 32-bit counter at
//! [`COUNTER_ADDR`] forever, writes it to its disk's second sector (so a
//! writable disk, and a copy of it, holds the count: [`disk_counter`]) and
//! across 512 KiB of RAM (a dirtying workload for migrations), and prints it
//! as eight hex digits in the top-left corner of the VGA text screen, above
//! a reference strip of the sixteen hex digits in the same colours (so a
//! screenshot can be read: [`crate::browser`]). A migrated guest continues its count; a
//! restarted one starts again from zero, so a test (or a person watching the
//! console) can tell a live migration from a cold restart.

/// Guest-physical address of the counter (just past the boot sector).
pub const COUNTER_ADDR: u64 = 0x7e00;

/// The boot sector, assembled by hand (16-bit real mode, origin 0x7c00).
pub fn counting_boot_sector() -> [u8; 512] {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xfa,                               // cli
        0x31, 0xc0,                         // xor ax, ax
        0x8e, 0xd8,                         // mov ds, ax
        0x8e, 0xd0,                         // mov ss, ax
        0xbc, 0x00, 0x7c,                   // mov sp, 0x7c00
        0x88, 0x16, 0x04, 0x7e,             // mov [0x7e04], dl  (the boot drive)
        0x66, 0xc7, 0x06, 0x00, 0x7e,       // mov dword [0x7e00], 0
        0x00, 0x00, 0x00, 0x00,
        // A reference strip "0123456789ABCDEF" in the same colours on row
        // 1, once: a screenshot's counter cells are read by matching them
        // against it, whatever the font and scale.
        0xb8, 0x00, 0xb8,                   // mov ax, 0xb800
        0x8e, 0xc0,                         // mov es, ax
        0xbf, 0xa0, 0x00,                   // mov di, 160       (row 1)
        0xb3, 0x30,                         // mov bl, '0'
        // ref:
        0x26, 0x88, 0x1d,                   // mov [es:di], bl
        0x26, 0xc6, 0x45, 0x01, 0x1f,       // mov byte [es:di+1], 0x1f
        0x83, 0xc7, 0x02,                   // add di, 2
        0xfe, 0xc3,                         // inc bl
        0x80, 0xfb, 0x3a,                   // cmp bl, '9' + 1
        0x75, 0x02,                         // jne skip
        0xb3, 0x41,                         // mov bl, 'A'
        // skip:
        0x80, 0xfb, 0x47,                   // cmp bl, 'F' + 1
        0x75, 0xe7,                         // jne ref           (-25)
        // next:
        0x66, 0xff, 0x06, 0x00, 0x7e,       // inc dword [0x7e00]
        // Persist the sector at 0x7e00 (the counter first) to LBA 1 with
        // INT 13h: a writable disk then holds the latest count. On a
        // read-only disk the BIOS refuses and the guest counts on.
        0x31, 0xc0,                         // xor ax, ax
        0x8e, 0xc0,                         // mov es, ax
        0xbb, 0x00, 0x7e,                   // mov bx, 0x7e00
        0xb8, 0x01, 0x03,                   // mov ax, 0x0301   (write 1 sector)
        0xb9, 0x02, 0x00,                   // mov cx, 2        (cylinder 0, sector 2)
        0x30, 0xf6,                         // xor dh, dh       (head 0)
        0x8a, 0x16, 0x04, 0x7e,             // mov dl, [0x7e04]
        0xcd, 0x13,                         // int 0x13
        0xfa,                               // cli
        0xb8, 0x00, 0xb8,                   // mov ax, 0xb800   (VGA text memory)
        0x8e, 0xc0,                         // mov es, ax
        0x66, 0xa1, 0x00, 0x7e,             // mov eax, [0x7e00]
        // Dirty 512 KiB of RAM (128 pages from 0x10000) as a workload would,
        // one page per count, so a migration has real work to converge.
        0x66, 0x89, 0xc2,                   // mov edx, eax
        0x83, 0xe2, 0x7f,                   // and dx, 0x7f
        0xc1, 0xe2, 0x08,                   // shl dx, 8         (segment step = 4 KiB)
        0x81, 0xc2, 0x00, 0x10,             // add dx, 0x1000
        0x8e, 0xe2,                         // mov fs, dx
        0x64, 0x66, 0xa3, 0x00, 0x00,       // mov [fs:0], eax
        0xbf, 0x0e, 0x00,                   // mov di, 14        (last of 8 cells)
        0xb9, 0x08, 0x00,                   // mov cx, 8
        // digit:
        0x88, 0xc3,                         // mov bl, al
        0x80, 0xe3, 0x0f,                   // and bl, 0x0f
        0x80, 0xc3, 0x30,                   // add bl, '0'
        0x80, 0xfb, 0x39,                   // cmp bl, '9'
        0x76, 0x03,                         // jbe store
        0x80, 0xc3, 0x07,                   // add bl, 7         ('A'..'F')
        // store:
        0x26, 0x88, 0x1d,                   // mov [es:di], bl
        0x26, 0xc6, 0x45, 0x01, 0x1f,       // mov byte [es:di+1], 0x1f (white on blue)
        0x66, 0xc1, 0xe8, 0x04,             // shr eax, 4
        0x83, 0xef, 0x02,                   // sub di, 2
        0xe2, 0xdf,                         // loop digit        (-33)
        0xeb, 0x9f,                         // jmp next          (-97)
    ];
    let mut sector = [0u8; 512];
    sector[..code.len()].copy_from_slice(code);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// A boot sector that echoes its first serial port in upper case: every
/// byte received on COM1 is sent back, `a`–`z` raised. A test types
/// into the serial console and reads the guest's answer.
pub fn serial_echo_boot_sector() -> [u8; 512] {
    #[rustfmt::skip]
    let code: &[u8] = &[
        // start:
        0xba, 0xfd, 0x03,                   // mov dx, 0x3fd    (line status)
        // wait:
        0xec,                               // in al, dx
        0xa8, 0x01,                         // test al, 1       (data ready)
        0x74, 0xfb,                         // jz wait          (-5)
        0xba, 0xf8, 0x03,                   // mov dx, 0x3f8    (data)
        0xec,                               // in al, dx
        0x3c, 0x61,                         // cmp al, 'a'
        0x72, 0x06,                         // jb send          (+6)
        0x3c, 0x7a,                         // cmp al, 'z'
        0x77, 0x02,                         // ja send          (+2)
        0x2c, 0x20,                         // sub al, 0x20
        // send:
        0xee,                               // out dx, al
        0xeb, 0xe7,                         // jmp start        (-25)
    ];
    let mut sector = [0u8; 512];
    sector[..code.len()].copy_from_slice(code);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// A bootable 1 MiB raw disk holding [`serial_echo_boot_sector`].
pub fn serial_echo_disk_image() -> Vec<u8> {
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(&serial_echo_boot_sector());
    image
}

/// A bootable raw disk image: the boot sector, padded to 1 MiB.
///
/// SeaBIOS will not boot a one-sector disk (its geometry has zero cylinders).
pub fn counting_disk_image() -> Vec<u8> {
    let mut image = vec![0u8; 1 << 20];
    image[..512].copy_from_slice(&counting_boot_sector());
    image
}

/// The count a guest last wrote to its disk, from the disk's raw bytes
/// (`None` if the image is too short to hold it).
pub fn disk_counter(raw: &[u8]) -> Option<u32> {
    let b = raw.get(512..516)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses the value HMP `xp /1wx ADDR` prints (`0000000000007e00: 0x0001a2b3`).
pub fn parse_xp_word(output: &str) -> Option<u32> {
    let hex = output.split(':').nth(1)?.trim().trim_start_matches("0x");
    u32::from_str_radix(hex.split_whitespace().next()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_is_bootable_and_jumps_land_on_their_labels() {
        let s = counting_boot_sector();
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        // The strip's jne at 0x38 jumps back to `ref` at 0x21.
        assert_eq!((0x3ai32 + i32::from(s[0x39] as i8)), 0x21);
        assert_eq!(&s[0x21..0x24], &[0x26, 0x88, 0x1d]);
        // loop at 0x97 jumps back to `digit` at 0x78; jmp at 0x99 back to `next` at 0x3a.
        assert_eq!((0x99i32 + i32::from(s[0x98] as i8)), 0x78);
        assert_eq!((0x9bi32 + i32::from(s[0x9a] as i8)), 0x3a);
        assert_eq!(&s[0x3a..0x3f], &[0x66, 0xff, 0x06, 0x00, 0x7e]);
        assert_eq!(&s[0x78..0x7a], &[0x88, 0xc3]);
    }

    #[test]
    fn reads_xp_output() {
        assert_eq!(
            parse_xp_word("0000000000007e00: 0x0001a2b3\r\n"),
            Some(0x0001_a2b3)
        );
        assert_eq!(parse_xp_word("garbage"), None);
    }
}
