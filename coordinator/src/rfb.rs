//! The RFB (VNC) handshake, both halves, for the web console's bridge.
//!
//! The coordinator stands between the browser and QEMU and completes the
//! security handshake with each side on its own: with QEMU it answers the
//! VNC password challenge itself (RFC 6143 §7.2.2), with the browser it
//! offers only "None". The password never reaches the browser, and a
//! session cookie, checked before the websocket opens, is what lets the
//! browser in. After both handshakes the bridge copies bytes: the browser's
//! ClientInit is the first message QEMU sees from it.
//!
//! Decisions (which security type, the DES response) are pure functions;
//! [`client_handshake`] and [`server_handshake`] apply them to a byte
//! stream.

use des::cipher::{BlockEncrypt, KeyInit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version both halves speak.
pub const VERSION: &[u8; 12] = b"RFB 003.008\n";

/// Security type "None".
const NONE: u8 = 1;
/// Security type "VNC Authentication" (DES challenge).
const VNC_AUTH: u8 = 2;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    /// The stream failed or ended early.
    #[error("console connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak RFB 3.x.
    #[error("not an RFB server or client: version {0:?}")]
    Version(String),
    /// QEMU refused the connection before offering security types.
    #[error("the console refused the connection: {0}")]
    Refused(String),
    /// QEMU offers no security type the coordinator can complete.
    #[error("the console offers security types {offered:?}; the web console {need}")]
    NoCommonSecurity {
        /// What QEMU offered.
        offered: Vec<u8>,
        /// What would have worked.
        need: &'static str,
    },
    /// QEMU did not accept the password.
    #[error("the console refused the password from the definition: {0}")]
    PasswordRefused(String),
}

/// The security type to choose from QEMU's `offered` list, given whether
/// the definition has a password.
pub fn choose_security(offered: &[u8], password: bool) -> Result<u8, RfbError> {
    let want = if password { VNC_AUTH } else { NONE };
    if offered.contains(&want) {
        return Ok(want);
    }
    Err(RfbError::NoCommonSecurity {
        offered: offered.to_vec(),
        need: if password {
            "answers a password challenge (type 2)"
        } else {
            "needs type 1 (None), or a passwd on <graphics>"
        },
    })
}

/// The answer to a VNC authentication challenge: the challenge encrypted
/// with DES, keyed by the password's first 8 bytes (zero-padded) with each
/// byte's bits mirrored, as every VNC server expects.
pub fn vnc_auth_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(block.into());
    }
    out
}

async fn read_reason<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, RfbError> {
    let len = s.read_u32().await? as usize;
    // A reason is a line of text; a huge length is a broken peer.
    let mut text = vec![0u8; len.min(4096)];
    s.read_exact(&mut text).await?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Completes the handshake with QEMU as a client, answering its password
/// challenge with `password`. The stream is then at ClientInit.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: Option<&str>,
) -> Result<(), RfbError> {
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    if !version.starts_with(b"RFB 003.") {
        return Err(RfbError::Version(
            String::from_utf8_lossy(&version).trim_end().into(),
        ));
    }
    s.write_all(VERSION).await?;
    let n = s.read_u8().await? as usize;
    if n == 0 {
        return Err(RfbError::Refused(read_reason(s).await?));
    }
    let mut offered = vec![0u8; n];
    s.read_exact(&mut offered).await?;
    let chosen = choose_security(&offered, password.is_some())?;
    s.write_all(&[chosen]).await?;
    if let (VNC_AUTH, Some(pw)) = (chosen, password) {
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge).await?;
        s.write_all(&vnc_auth_response(pw, &challenge)).await?;
    }
    match s.read_u32().await? {
        0 => Ok(()),
        _ => Err(RfbError::PasswordRefused(read_reason(s).await?)),
    }
}

/// Completes the handshake with the browser as a server offering only
/// "None": the session cookie has already been checked. The stream is then
/// at ClientInit.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<(), RfbError> {
    s.write_all(VERSION).await?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    let minor = match &version {
        b"RFB 003.003\n" => 3,
        b"RFB 003.007\n" => 7,
        v if v.starts_with(b"RFB 003.") => 8,
        v => {
            return Err(RfbError::Version(
                String::from_utf8_lossy(v).trim_end().into(),
            ))
        }
    };
    if minor == 3 {
        // 3.3: the server names the type; no result follows "None".
        s.write_u32(u32::from(NONE)).await?;
        return Ok(());
    }
    s.write_all(&[1, NONE]).await?;
    let chosen = s.read_u8().await?;
    if chosen != NONE {
        return Err(RfbError::NoCommonSecurity {
            offered: vec![chosen],
            need: "offers browsers only type 1 (None)",
        });
    }
    if minor == 8 {
        s.write_u32(0).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn des_response_matches_a_known_vnc_challenge() {
        // From `openssl enc -des-ecb -nopad -K 0e86ceceeef64e26 -provider
        // legacy -provider default` (the bit-mirrored key of "password")
        // over the sixteen bytes 00..0f.
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let got = vnc_auth_response("password", &challenge);
        let want = des_reference();
        assert_eq!(got, want);
        // Only the first eight bytes of a password count.
        assert_eq!(vnc_auth_response("password-and-more", &challenge), want);
    }

    /// The reference ciphertext, computed independently (see the test).
    fn des_reference() -> [u8; 16] {
        [
            0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5,
            0x38, 0xe2,
        ]
    }

    #[test]
    fn the_security_type_follows_the_definition() {
        assert_eq!(choose_security(&[1, 2], true).ok(), Some(2));
        assert_eq!(choose_security(&[1, 2], false).ok(), Some(1));
        assert!(matches!(
            choose_security(&[2], false),
            Err(RfbError::NoCommonSecurity { .. })
        ));
        // VeNCrypt (TLS) only: nothing the bridge can complete.
        assert!(matches!(
            choose_security(&[19], true),
            Err(RfbError::NoCommonSecurity { .. })
        ));
    }

    /// Plays QEMU's side of VNC authentication with password `password`,
    /// the way QEMU checks an answer.
    async fn qemu_with_password(
        mut qemu: tokio::io::DuplexStream,
        password: &'static str,
    ) -> std::io::Result<()> {
        qemu.write_all(VERSION).await?;
        let mut v = [0u8; 12];
        qemu.read_exact(&mut v).await?;
        qemu.write_all(&[1, VNC_AUTH]).await?;
        assert_eq!(qemu.read_u8().await?, VNC_AUTH);
        let challenge = [7u8; 16];
        qemu.write_all(&challenge).await?;
        let mut answer = [0u8; 16];
        qemu.read_exact(&mut answer).await?;
        let ok = answer == vnc_auth_response(password, &challenge);
        qemu.write_u32(if ok { 0 } else { 1 }).await?;
        if !ok {
            qemu.write_u32(14).await?;
            qemu.write_all(b"Authentication").await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_client_half_answers_a_password_challenge() {
        let (mut ours, qemu) = tokio::io::duplex(256);
        let server = tokio::spawn(qemu_with_password(qemu, "s3cret"));
        client_handshake(&mut ours, Some("s3cret"))
            .await
            .expect("handshake");
        server.await.expect("join").expect("server");

        let (mut ours, qemu) = tokio::io::duplex(256);
        let server = tokio::spawn(qemu_with_password(qemu, "s3cret"));
        let err = client_handshake(&mut ours, Some("wrong"))
            .await
            .expect_err("refused");
        assert!(matches!(err, RfbError::PasswordRefused(ref r) if r == "Authentication"));
        server.await.expect("join").expect("server");
    }

    #[tokio::test]
    async fn the_server_half_offers_browsers_only_none() {
        let (mut ours, mut browser) = tokio::io::duplex(256);
        let bridge = tokio::spawn(async move { server_handshake(&mut ours).await });
        let mut v = [0u8; 12];
        browser.read_exact(&mut v).await.expect("version");
        assert_eq!(&v, VERSION);
        browser.write_all(VERSION).await.expect("write");
        let mut types = [0u8; 2];
        browser.read_exact(&mut types).await.expect("types");
        assert_eq!(types, [1, NONE]);
        browser.write_all(&[NONE]).await.expect("choose");
        assert_eq!(browser.read_u32().await.expect("result"), 0);
        bridge.await.expect("join").expect("handshake");
    }
}
