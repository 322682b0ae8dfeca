//! Who may open the web pages: one-time tickets and the sessions they buy.
//!
//! An operator's certificate gets a ticket over QUIC (`flotilla webconsole`,
//! `flotilla web-login`). The ticket travels in a URL, so it is worth little:
//! it expires after [`TICKET_TTL`] and opens a page once. Opening it trades
//! it for a session (a cookie the page's scripts cannot read) that lasts
//! [`SESSION_TTL`], so the console can reconnect after a migration without
//! the user. A console session opens one VM's console; a fleet session opens
//! the fleet page and every console.
//!
//! Pure: the shell passes the clock and the random bytes in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a ticket may wait to be opened, by default.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// How long a session lets the page reconnect.
pub const SESSION_TTL: Duration = Duration::from_secs(15 * 60);

/// What a ticket, and the session it becomes, opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The fleet page and every VM's console.
    Fleet,
    /// One VM's console.
    Console(String),
}

impl Grant {
    /// Whether this grant opens `wanted`.
    pub fn opens(&self, wanted: &Grant) -> bool {
        match (self, wanted) {
            (Grant::Fleet, _) => true,
            (Grant::Console(mine), Grant::Console(theirs)) => mine == theirs,
            (Grant::Console(_), Grant::Fleet) => false,
        }
    }
}

/// Why a web request is refused (each is a 403, and nothing is proxied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such ticket was ever issued (or it is long gone).
    #[error("unknown ticket")]
    UnknownTicket,
    /// The ticket was not opened in time.
    #[error("ticket expired")]
    ExpiredTicket,
    /// The ticket was opened already: a replay.
    #[error("ticket already used")]
    UsedTicket,
    /// No session cookie, or one this coordinator never issued.
    #[error("no session: open a new URL from `flotilla webconsole` or `flotilla web-login`")]
    NoSession,
    /// The session's time is up.
    #[error("session expired: open a new URL from `flotilla webconsole` or `flotilla web-login`")]
    ExpiredSession,
    /// The session is for another VM's console.
    #[error("this session does not open {0}")]
    NotGranted(String),
    /// A websocket from a page of another site.
    #[error("origin {origin:?} is not this site ({expected})")]
    CrossOrigin {
        /// What the browser sent.
        origin: Option<String>,
        /// What this site's pages send.
        expected: String,
    },
}

#[derive(Debug)]
struct Ticket {
    grant: Grant,
    expires: Instant,
    used: bool,
}

#[derive(Debug)]
struct Session {
    grant: Grant,
    expires: Instant,
}

/// Issued tickets and open sessions.
#[derive(Debug)]
pub struct WebAuth {
    ticket_ttl: Duration,
    tickets: HashMap<String, Ticket>,
    sessions: HashMap<String, Session>,
}

impl Default for WebAuth {
    fn default() -> Self {
        WebAuth::new(TICKET_TTL)
    }
}

/// A ticket or session id: the random bytes, in hex.
fn token(random: [u8; 32]) -> String {
    random.iter().map(|b| format!("{b:02x}")).collect()
}

impl WebAuth {
    /// Tickets that expire `ticket_ttl` after they are issued.
    pub fn new(ticket_ttl: Duration) -> Self {
        WebAuth {
            ticket_ttl,
            tickets: HashMap::new(),
            sessions: HashMap::new(),
        }
    }

    /// How long a ticket may wait to be opened.
    pub fn ticket_ttl(&self) -> Duration {
        self.ticket_ttl
    }

    /// A new ticket for `grant`, valid until `now` + the ticket TTL.
    pub fn issue(&mut self, grant: Grant, random: [u8; 32], now: Instant) -> String {
        self.prune(now);
        let t = token(random);
        self.tickets.insert(
            t.clone(),
            Ticket {
                grant,
                expires: now + self.ticket_ttl,
                used: false,
            },
        );
        t
    }

    /// Uses up `ticket` and opens a session for what it grants; returns the
    /// session id and the grant.
    pub fn redeem(
        &mut self,
        ticket: &str,
        random: [u8; 32],
        now: Instant,
    ) -> Result<(String, Grant), Refusal> {
        self.prune(now);
        let t = self.tickets.get_mut(ticket).ok_or(Refusal::UnknownTicket)?;
        if t.used {
            return Err(Refusal::UsedTicket);
        }
        if now >= t.expires {
            return Err(Refusal::ExpiredTicket);
        }
        // Kept, used, until it would have expired: a replay is told apart
        // from a guess.
        t.used = true;
        let grant = t.grant.clone();
        let id = token(random);
        self.sessions.insert(
            id.clone(),
            Session {
                grant: grant.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Ok((id, grant))
    }

    /// Whether session `id` opens `wanted` at `now`.
    pub fn check(&mut self, id: Option<&str>, wanted: &Grant, now: Instant) -> Result<(), Refusal> {
        let s = id
            .and_then(|id| self.sessions.get(id))
            .ok_or(Refusal::NoSession)?;
        if now >= s.expires {
            return Err(Refusal::ExpiredSession);
        }
        if !s.grant.opens(wanted) {
            return Err(Refusal::NotGranted(match wanted {
                Grant::Fleet => "the fleet page".into(),
                Grant::Console(vm) => format!("the console of '{vm}'"),
            }));
        }
        Ok(())
    }

    /// Forgets tickets and sessions past their time. Expired ones are kept
    /// one more TTL, so that a late use is told "expired", not "unknown".
    fn prune(&mut self, now: Instant) {
        let keep = self.ticket_ttl;
        self.tickets.retain(|_, t| now < t.expires + keep);
        self.sessions.retain(|_, s| now < s.expires + keep);
    }

    /// Tickets and sessions held (for tests and metrics).
    pub fn held(&self) -> (usize, usize) {
        (self.tickets.len(), self.sessions.len())
    }
}

/// A websocket must come from a page of this site: its `Origin` is this
/// site's `https://HOST` (the `Host` the browser asked for).
pub fn check_origin(origin: Option<&str>, host: Option<&str>) -> Result<(), Refusal> {
    let expected = format!("https://{}", host.unwrap_or("(no host)"));
    match origin {
        Some(o) if host.is_some() && o.eq_ignore_ascii_case(&expected) => Ok(()),
        _ => Err(Refusal::CrossOrigin {
            origin: origin.map(str::to_string),
            expected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn a_ticket_opens_once_within_its_minute() {
        let t0 = Instant::now();
        let mut auth = WebAuth::default();
        let vm = Grant::Console("web01".into());
        let ticket = auth.issue(vm.clone(), bytes(1), t0);
        assert_eq!(ticket.len(), 64);
        let late = auth.issue(vm.clone(), bytes(2), t0);
        let cases: Vec<(&str, Duration, Result<Grant, Refusal>)> = vec![
            ("nonsense", Duration::ZERO, Err(Refusal::UnknownTicket)),
            (&ticket, Duration::from_secs(59), Ok(vm.clone())),
            (&ticket, Duration::from_secs(59), Err(Refusal::UsedTicket)),
            (&late, TICKET_TTL, Err(Refusal::ExpiredTicket)),
            // Long after: forgotten.
            (&late, TICKET_TTL * 2, Err(Refusal::UnknownTicket)),
        ];
        for (t, after, want) in cases {
            let got = auth.redeem(t, bytes(9), t0 + after).map(|(_, g)| g);
            assert_eq!(got, want, "{t} after {after:?}");
        }
    }

    #[test]
    fn a_session_reconnects_for_fifteen_minutes_to_what_it_was_granted() {
        let t0 = Instant::now();
        let mut auth = WebAuth::default();
        let ticket = auth.issue(Grant::Console("web01".into()), bytes(1), t0);
        let (session, _) = auth.redeem(&ticket, bytes(3), t0).expect("redeem");
        let web01 = Grant::Console("web01".into());
        let db01 = Grant::Console("db01".into());
        type Case<'a> = (Option<&'a str>, &'a Grant, Duration, Result<(), Refusal>);
        let cases: Vec<Case> = vec![
            (Some(&session), &web01, Duration::ZERO, Ok(())),
            (
                Some(&session),
                &web01,
                SESSION_TTL - Duration::from_secs(1),
                Ok(()),
            ),
            (
                Some(&session),
                &web01,
                SESSION_TTL,
                Err(Refusal::ExpiredSession),
            ),
            (
                Some(&session),
                &db01,
                Duration::ZERO,
                Err(Refusal::NotGranted("the console of 'db01'".into())),
            ),
            (
                Some(&session),
                &Grant::Fleet,
                Duration::ZERO,
                Err(Refusal::NotGranted("the fleet page".into())),
            ),
            (
                Some(&ticket),
                &web01,
                Duration::ZERO,
                Err(Refusal::NoSession),
            ),
            (None, &web01, Duration::ZERO, Err(Refusal::NoSession)),
        ];
        for (id, wanted, after, want) in cases {
            assert_eq!(
                auth.check(id, wanted, t0 + after),
                want,
                "{wanted:?} after {after:?}"
            );
        }
    }

    #[test]
    fn a_fleet_session_opens_the_fleet_page_and_every_console() {
        let t0 = Instant::now();
        let mut auth = WebAuth::default();
        let ticket = auth.issue(Grant::Fleet, bytes(1), t0);
        let (session, _) = auth.redeem(&ticket, bytes(3), t0).expect("redeem");
        for wanted in [Grant::Fleet, Grant::Console("any".into())] {
            assert_eq!(auth.check(Some(&session), &wanted, t0), Ok(()));
        }
    }

    #[test]
    fn old_tickets_and_sessions_are_forgotten() {
        let t0 = Instant::now();
        let mut auth = WebAuth::default();
        let ticket = auth.issue(Grant::Fleet, bytes(1), t0);
        auth.redeem(&ticket, bytes(2), t0).expect("redeem");
        assert_eq!(auth.held(), (1, 1));
        auth.issue(Grant::Fleet, bytes(4), t0 + SESSION_TTL + TICKET_TTL);
        assert_eq!(auth.held(), (1, 0));
    }

    #[test]
    fn websockets_come_only_from_this_site() {
        let here = Some("198.19.0.1:8443");
        let cases: &[(Option<&str>, Option<&str>, bool)] = &[
            (Some("https://198.19.0.1:8443"), here, true),
            (Some("HTTPS://198.19.0.1:8443"), here, true),
            (Some("http://198.19.0.1:8443"), here, false),
            (Some("https://evil.example"), here, false),
            (Some("null"), here, false),
            (None, here, false),
            (Some("https://198.19.0.1:8443"), None, false),
        ];
        for (origin, host, ok) in cases {
            assert_eq!(
                check_origin(*origin, *host).is_ok(),
                *ok,
                "{origin:?} {host:?}"
            );
        }
    }
}
