//! The coordinator's web pages: a noVNC console that follows its guest
//! across live migrations, and a read-only fleet page.
//!
//! ```text
//! browser ──wss /console/NAME/ws──▶ coordinator ──QUIC OpenConsole──▶ agent ──TCP──▶ QEMU VNC
//!          RFB "None" handshake      RFB password handshake (rfb.rs), then bytes both ways
//! ```
//!
//! Routes (HTTPS with the coordinator's certificate):
//! - `GET /console/NAME?ticket=T` trades a one-time ticket for a session
//!   cookie scoped to that console and redirects to `GET /console/NAME`, the
//!   page. Its websocket is `/console/NAME/ws`.
//! - `GET /?ticket=T`, `GET /`: the same for the fleet page; a fleet session
//!   also opens every console. `/api/fleet` is its JSON, `/api/events` its
//!   live event lines (Server-Sent Events).
//! - `/novnc/…`: noVNC's own files from `--novnc-dir` (a package, never
//!   copied into this repository).
//!
//! Every refusal is a 403 with the reason ([`Refusal`]) and nothing is
//! proxied. When a migration of the VM completes, the bridge sends the page
//! a text notice `{"moved":"host-b"}` and closes the websocket with
//! [`CLOSE_MOVED`] and the destination host as the reason; the page
//! reconnects at once (on whichever of the two it sees first) with its
//! session, and the bridge finds the VM on its new host.
//!
//! A shell: tickets and sessions are decided in [`crate::web_auth`], the
//! RFB handshakes in [`crate::rfb`], where a VM's console is in the fleet
//! core ([`ConsoleCall`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::header;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use flotilla_shared::net::quic;
use flotilla_shared::proto::{
    AgentReply, AgentRequest, AgentResponse, OperatorError, OperatorRequest, OperatorResponse,
};
use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::{ConsoleCall, EventsCall, Fleet, Moved, OperatorCall};
use crate::web_auth::{check_origin, Grant, Refusal, WebAuth, SESSION_TTL};

/// Websocket close code: the VM moved; the reason names its new host.
pub const CLOSE_MOVED: u16 = 4001;
/// Websocket close code: the console closed (the VM stopped, or its host went away).
pub const CLOSE_GONE: u16 = 4002;
/// Websocket close code: the console could not be reached; the reason says why.
pub const CLOSE_UNREACHABLE: u16 = 4004;

/// After the console's connection ends, how long to wait for word that the
/// VM moved before telling the page it is gone: the source QEMU may quit a
/// moment before the coordinator records the migration's end.
const MOVE_GRACE: Duration = Duration::from_secs(3);

/// The session cookie of one console page (path-scoped to it).
const CONSOLE_COOKIE: &str = "flotilla_console";
/// The session cookie of the fleet page.
const FLEET_COOKIE: &str = "flotilla_fleet";

/// How the web endpoint is set up.
pub struct WebSettings {
    /// Where to listen for HTTPS.
    pub listen: SocketAddr,
    /// The `https://host:port` that printed URLs start with.
    pub base_url: String,
    /// noVNC's directory (with `core/rfb.js`).
    pub novnc_dir: PathBuf,
    /// How long a ticket may wait to be opened.
    pub ticket_ttl: Duration,
    /// The coordinator's certificate, for HTTPS.
    pub tls: rustls::ServerConfig,
}

/// Why the web endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// noVNC is not where it was said to be.
    #[error("--novnc-dir {dir}: {reason} (install Debian's novnc, or npm's @novnc/novnc, and point --novnc-dir at it)")]
    NoVnc {
        /// The directory.
        dir: String,
        /// What is missing.
        reason: String,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr} for the web console: {reason}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// What every handler shares.
pub struct Web {
    auth: Mutex<WebAuth>,
    fleet: Addr<Fleet>,
    moves: tokio::sync::broadcast::Sender<Moved>,
    base_url: String,
}

fn random() -> [u8; 32] {
    let mut b = [0u8; 32];
    // Without the kernel's randomness there is no safe ticket: fail closed.
    if getrandom::fill(&mut b).is_err() {
        tracing::error!(
            "no randomness from the kernel; exiting rather than issue guessable tickets"
        );
        std::process::exit(70);
    }
    b
}

/// `s` as one URL path segment.
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `s` safe inside HTML text and attribute values.
fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

impl Web {
    /// Answers an operator's [`OperatorRequest::WebTicket`]: a URL that
    /// opens the console of `console` (which must run and have VNC), or the
    /// fleet page.
    pub async fn ticket(&self, console: Option<String>) -> OperatorResponse {
        let (grant, path) = match console {
            Some(name) => {
                match self
                    .fleet
                    .send(ConsoleCall {
                        name: name.clone(),
                        serial: false,
                    })
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return OperatorResponse::Error(e),
                    Err(e) => {
                        return OperatorResponse::Error(OperatorError::Unavailable(e.to_string()))
                    }
                }
                let path = format!("/console/{}", path_segment(&name));
                (Grant::Console(name), path)
            }
            None => (Grant::Fleet, "/".to_string()),
        };
        let mut auth = self.lock();
        let ticket = auth.issue(grant, random(), Instant::now());
        OperatorResponse::WebUrl {
            url: format!("{}{path}?ticket={ticket}", self.base_url),
            expires_secs: auth.ticket_ttl().as_secs(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WebAuth> {
        // A handler that panicked mid-update leaves maps that are still
        // maps: carry on with them.
        self.auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the request's session cookies open `wanted`.
    fn session_opens(&self, req: &HttpRequest, wanted: &Grant) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut auth = self.lock();
        let mut refusal = Refusal::NoSession;
        for name in [CONSOLE_COOKIE, FLEET_COOKIE] {
            if let Some(c) = req.cookie(name) {
                match auth.check(Some(c.value()), wanted, now) {
                    Ok(()) => return Ok(()),
                    Err(r) => refusal = r,
                }
            }
        }
        Err(refusal)
    }
}

/// Starts the HTTPS endpoint on actix's runtime; runs until the process ends.
pub fn start(
    settings: WebSettings,
    fleet: Addr<Fleet>,
    moves: tokio::sync::broadcast::Sender<Moved>,
) -> Result<Arc<Web>, WebError> {
    let rfb = settings.novnc_dir.join("core/rfb.js");
    if !rfb.is_file() {
        return Err(WebError::NoVnc {
            dir: settings.novnc_dir.display().to_string(),
            reason: format!("{} is missing", rfb.display()),
        });
    }
    let shared = Arc::new(Web {
        auth: Mutex::new(WebAuth::new(settings.ticket_ttl)),
        fleet,
        moves,
        base_url: settings.base_url,
    });
    let state = web::Data::from(shared.clone());
    let novnc = settings.novnc_dir;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/", web::get().to(fleet_page))
            .route("/api/fleet", web::get().to(fleet_json))
            .route("/api/events", web::get().to(events))
            .route("/console/{name}", web::get().to(console_page))
            .route("/console/{name}/ws", web::get().to(console_ws))
            .service(actix_files::Files::new("/novnc", &novnc))
    })
    // Pages and relays are few; two workers keep the runtime light.
    .workers(2)
    .disable_signals()
    .listen_rustls_0_23(
        std::net::TcpListener::bind(settings.listen).map_err(|e| WebError::Listen {
            addr: settings.listen,
            reason: e.to_string(),
        })?,
        settings.tls,
    )
    .map_err(|e| WebError::Listen {
        addr: settings.listen,
        reason: e.to_string(),
    })?
    .run();
    actix::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "web endpoint stopped");
        }
    });
    Ok(shared)
}

fn forbidden(r: Refusal) -> HttpResponse {
    tracing::info!(refusal = %r, "web request refused");
    HttpResponse::Forbidden()
        .content_type("text/plain; charset=utf-8")
        .body(format!("403 Forbidden: {r}\n"))
}

fn session_cookie(name: &'static str, id: String, path: String) -> Cookie<'static> {
    Cookie::build(name, id)
        .path(path)
        .secure(true)
        .http_only(true)
        // Lax, not Strict: a ticket URL clicked in a chat or mail client is a
        // cross-site navigation, and its redirect must still carry the cookie.
        .same_site(SameSite::Lax)
        .max_age(actix_web::cookie::time::Duration::seconds(
            SESSION_TTL.as_secs() as i64,
        ))
        .finish()
}

#[derive(serde::Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

/// Trades `ticket` for a session cookie and redirects to `path` (so that a
/// reload does not replay the ticket).
fn redeem(
    state: &Web,
    ticket: &str,
    wanted: &Grant,
    cookie: &'static str,
    path: String,
) -> HttpResponse {
    let redeemed = state
        .lock()
        .redeem(ticket, random(), Instant::now())
        .and_then(|(id, grant)| match grant.opens(wanted) {
            true => Ok(id),
            false => Err(Refusal::NotGranted(path.clone())),
        });
    match redeemed {
        Ok(id) => HttpResponse::SeeOther()
            .insert_header((header::LOCATION, path.clone()))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .cookie(session_cookie(cookie, id, path))
            .finish(),
        Err(r) => forbidden(r),
    }
}

async fn console_page(
    req: HttpRequest,
    name: web::Path<String>,
    query: web::Query<TicketQuery>,
    state: web::Data<Web>,
) -> HttpResponse {
    let name = name.into_inner();
    let wanted = Grant::Console(name.clone());
    let path = format!("/console/{}", path_segment(&name));
    if let Some(t) = &query.ticket {
        return redeem(&state, t, &wanted, CONSOLE_COOKIE, path);
    }
    match state.session_opens(&req, &wanted) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(CONSOLE_PAGE.replace("{{NAME}}", &html(&name))),
        Err(r) => forbidden(r),
    }
}

async fn console_ws(
    req: HttpRequest,
    body: web::Payload,
    name: web::Path<String>,
    state: web::Data<Web>,
) -> actix_web::Result<HttpResponse> {
    let name = name.into_inner();
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if let Err(r) = check_origin(origin, Some(req.connection_info().host())) {
        return Ok(forbidden(r));
    }
    if let Err(r) = state.session_opens(&req, &Grant::Console(name.clone())) {
        return Ok(forbidden(r));
    }
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let web = state.into_inner();
    actix_web::rt::spawn(bridge(web, name, session, messages));
    Ok(response)
}

/// Why a bridge ended, as the page is told in the close frame.
fn close(code: u16, reason: String) -> actix_ws::CloseReason {
    actix_ws::CloseReason {
        code: actix_ws::CloseCode::Other(code),
        description: Some(fit_close_reason(reason)),
    }
}

/// `reason` cut at a character boundary to the 123 bytes a close frame holds.
fn fit_close_reason(mut reason: String) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    reason
}

/// Waits for a completed migration of `vm`; `None` when no more can come.
async fn moved_to(moves: &mut tokio::sync::broadcast::Receiver<Moved>, vm: &str) -> Option<String> {
    loop {
        match moves.recv().await {
            Ok(m) if m.vm == vm => return Some(m.to),
            Ok(_) => {}
            // Missed some: the next one of this VM still counts.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// Opens the relay to the VM's console through its host's agent and
/// completes QEMU's half of the handshake.
async fn open_console(
    web: &Web,
    name: &str,
) -> Result<
    (
        String,
        impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    ),
    String,
> {
    let link = match web
        .fleet
        .send(ConsoleCall {
            name: name.into(),
            serial: false,
        })
        .await
    {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    };
    let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| e.to_string())?;
    quic::write_frame(&mut send, &AgentRequest::OpenConsole { name: name.into() })
        .await
        .map_err(|e| e.to_string())?;
    match quic::read_frame::<AgentReply>(&mut recv).await {
        Ok(AgentReply {
            response: AgentResponse::ConsoleOpened { .. },
            ..
        }) => {}
        Ok(AgentReply {
            response: AgentResponse::Error(e),
            ..
        }) => return Err(format!("{}: {e}", link.host)),
        Ok(other) => return Err(format!("{}: unexpected answer {other:?}", link.host)),
        Err(e) => return Err(format!("{}: {e}", link.host)),
    }
    let mut upstream = tokio::io::join(recv, send);
    crate::rfb::client_handshake(&mut upstream, link.password.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    Ok((link.host, upstream))
}

/// Carries one browser websocket to the VM's console until either side
/// ends or the VM moves.
async fn bridge(
    web: Arc<Web>,
    name: String,
    ws: actix_ws::Session,
    mut messages: actix_ws::MessageStream,
) {
    // Subscribed before the console is looked up: a migration that ends
    // while the relay opens is not missed.
    let mut moves = web.moves.subscribe();
    let (host, mut upstream) = match open_console(&web, &name).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(vm = %name, error = %e, "web console unreachable");
            let _ = ws.close(Some(close(CLOSE_UNREACHABLE, e))).await;
            return;
        }
    };
    tracing::info!(vm = %name, %host, "web console bridged");
    // The websocket as a byte stream, so the RFB handshake and the copy
    // work on it as on any socket.
    let (mut browser, pump_end) = tokio::io::duplex(64 * 1024);
    let (mut pump_rx, mut pump_tx) = tokio::io::split(pump_end);
    let incoming = {
        let mut ws = ws.clone();
        actix_web::rt::spawn(async move {
            while let Some(Ok(msg)) = messages.next().await {
                let written = match msg {
                    actix_ws::Message::Binary(b) => pump_tx.write_all(&b).await,
                    actix_ws::Message::Ping(p) => {
                        let _ = ws.pong(&p).await;
                        Ok(())
                    }
                    actix_ws::Message::Close(_) => break,
                    _ => Ok(()),
                };
                if written.is_err() {
                    break;
                }
            }
            let _ = pump_tx.shutdown().await;
        })
    };
    let outgoing = {
        let mut ws = ws.clone();
        actix_web::rt::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = pump_rx.read(&mut buf).await {
                if ws.binary(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut splice = actix_web::rt::spawn(async move {
        crate::rfb::server_handshake(&mut browser)
            .await
            .map_err(|e| e.to_string())?;
        tokio::io::copy_bidirectional(&mut browser, &mut upstream)
            .await
            .map_err(|e| e.to_string())
    });
    // Both branches are cancel-safe: a join handle and a broadcast receiver.
    let reason = tokio::select! {
        ended = &mut splice => {
            tracing::info!(vm = %name, %host, ?ended, "web console relay ended");
            match tokio::time::timeout(MOVE_GRACE, moved_to(&mut moves, &name)).await {
                Ok(Some(to)) => close(CLOSE_MOVED, to),
                _ => close(CLOSE_GONE, format!("the console of '{name}' closed")),
            }
        }
        to = moved_to(&mut moves, &name) => match to {
            Some(to) => close(CLOSE_MOVED, to),
            None => close(CLOSE_GONE, "coordinator stopping".into()),
        },
    };
    splice.abort();
    incoming.abort();
    outgoing.abort();
    tracing::info!(vm = %name, code = ?reason.code, reason = ?reason.description, "web console closed");
    let mut ws = ws;
    if reason.code == actix_ws::CloseCode::Other(CLOSE_MOVED) {
        // Said first as text, which the page acts on at once: a browser
        // reports the close only after the closing handshake, which can
        // take a second.
        let to = reason.description.clone().unwrap_or_default();
        let _ = ws
            .text(serde_json::json!({ "moved": to }).to_string())
            .await;
    }
    let _ = ws.close(Some(reason)).await;
}

async fn fleet_page(
    req: HttpRequest,
    query: web::Query<TicketQuery>,
    state: web::Data<Web>,
) -> HttpResponse {
    if let Some(t) = &query.ticket {
        return redeem(&state, t, &Grant::Fleet, FLEET_COOKIE, "/".into());
    }
    match state.session_opens(&req, &Grant::Fleet) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(FLEET_PAGE),
        Err(r) => forbidden(r),
    }
}

async fn ask(state: &Web, request: OperatorRequest) -> OperatorResponse {
    state
        .fleet
        .send(OperatorCall {
            operator: "web".into(),
            request,
            progress: None,
            notes: None,
        })
        .await
        .unwrap_or_else(|e| OperatorResponse::Error(OperatorError::Unavailable(e.to_string())))
}

async fn fleet_json(req: HttpRequest, state: web::Data<Web>) -> HttpResponse {
    if let Err(r) = state.session_opens(&req, &Grant::Fleet) {
        return forbidden(r);
    }
    let hosts = ask(&state, OperatorRequest::Hosts).await;
    let vms = ask(&state, OperatorRequest::List { all: true }).await;
    let placements = ask(&state, OperatorRequest::Placements).await;
    match (hosts, vms, placements) {
        (
            OperatorResponse::Hosts(hosts),
            OperatorResponse::Vms(vms),
            OperatorResponse::Placements(placements),
        ) => {
            let placements: std::collections::BTreeMap<_, _> = placements
                .into_iter()
                .map(|p| (p.name, p.explanation))
                .collect();
            let hosts: Vec<_> = hosts
                .into_iter()
                .map(|h| {
                    serde_json::json!({
                        "name": h.name, "state": h.state, "cpus": h.cpus,
                        "memory_mib": h.memory_mib, "vms": h.vms,
                        "committed_vcpus": h.committed_vcpus,
                        "committed_memory_mib": h.committed_memory_mib,
                        "networks": h.networks.iter().map(|n| serde_json::json!({
                            "name": n.name, "mode": n.mode,
                            "address": n.address, "error": n.error,
                        })).collect::<Vec<_>>(),
                        "last_seen_secs": h.last_seen_secs,
                    })
                })
                .collect();
            let vms: Vec<_> = vms
                .into_iter()
                .map(|v| {
                    serde_json::json!({
                        "name": v.name, "state": v.state, "host": v.host,
                        "console": format!("/console/{}", path_segment(&v.name)),
                        "placement": placements.get(&v.name),
                    })
                })
                .collect();
            HttpResponse::Ok()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .json(serde_json::json!({ "hosts": hosts, "vms": vms }))
        }
        other => HttpResponse::ServiceUnavailable()
            .content_type("text/plain; charset=utf-8")
            .body(format!("{other:?}\n")),
    }
}

/// The event log as Server-Sent Events: the recent lines, then each new one.
async fn events(req: HttpRequest, state: web::Data<Web>) -> HttpResponse {
    if let Err(r) = state.session_opens(&req, &Grant::Fleet) {
        return forbidden(r);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    state.fleet.do_send(EventsCall {
        follow: true,
        sink: tx,
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let frame = format!("data: {}\n\n", line.replace('\n', " "));
        Some((
            Ok::<_, actix_web::Error>(actix_web::web::Bytes::from(frame)),
            rx,
        ))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .streaming(body)
}

/// The console page: noVNC on the websocket, reconnecting on its own.
///
/// The page builds the WebSocket itself and hands it to noVNC, because
/// noVNC's disconnect event does not carry the close code that says the VM
/// moved. `window.flotilla` is for people debugging and for the tests.
const CONSOLE_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{NAME}} · Flotilla console</title>
<style>
 body { margin: 0; background: #1d1f21; color: #e0e0e0; font: 14px system-ui, sans-serif; }
 header { display: flex; gap: 1em; padding: 6px 10px; background: #2b2e31; }
 #banner { display: none; padding: 6px 10px; background: #2e7d32; color: #fff; }
 #banner.show { display: block; }
 #screen { display: inline-block; margin: 10px; }
</style></head>
<body>
<header><strong>{{NAME}}</strong><span id="status">connecting…</span></header>
<div id="banner"></div>
<div id="screen"></div>
<script type="module">
import RFB from '/novnc/core/rfb.js';
const url = 'wss://' + location.host + location.pathname.replace(/\/$/, '') + '/ws';
const state = window.flotilla = { connects: 0, connectedAt: [], closes: [], moves: [], movedTo: null };
const status = t => document.getElementById('status').textContent = t;
const screen = document.getElementById('screen');
let retry = 250;
function moved(to, via) {
  state.movedTo = to;
  state.moves.push({ to, via, at: Date.now() });
  const b = document.getElementById('banner');
  b.textContent = 'moved to ' + to;
  b.classList.add('show');
  status('reconnecting to ' + to + '…');
}
function connect() {
  // Each connection draws into its own box, removed the moment it is
  // replaced: the old socket's closing handshake may take a while.
  const box = document.createElement('div');
  screen.appendChild(box);
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  let replaced = false;
  const replace = () => {
    if (replaced) return false;
    replaced = true;
    box.remove();
    return true;
  };
  ws.addEventListener('message', e => {
    // The coordinator's notice that the guest moved comes as text (noVNC
    // ignores text frames), just before it closes the socket with 4001:
    // reconnecting now saves waiting for the closing handshake.
    if (typeof e.data !== 'string') return;
    const notice = JSON.parse(e.data);
    if (notice.moved && replace()) {
      moved(notice.moved, 'notice');
      connect();
    }
  });
  ws.addEventListener('close', e => {
    state.closes.push({ code: e.code, reason: e.reason, at: Date.now() });
    if (!replace()) return;
    if (e.code === 4001) {
      moved(e.reason, 'close');
      connect();
    } else if (e.code === 1006 && state.connects === 0) {
      status('refused: the session has expired or was never opened; run flotilla webconsole again');
    } else {
      status('disconnected (' + (e.reason || e.code) + '); retrying…');
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 5000);
    }
  });
  const rfb = new RFB(box, ws, { shared: true });
  rfb.scaleViewport = false;
  rfb.addEventListener('connect', () => {
    state.connects += 1;
    state.connectedAt.push(Date.now());
    retry = 250;
    status(state.movedTo ? 'connected (now on ' + state.movedTo + ')' : 'connected');
  });
}
connect();
</script>
</body></html>
"#;

/// The fleet page: hosts, VMs and the live event stream, in plain HTML.
const FLEET_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Flotilla fleet</title>
<style>
 body { margin: 1em; font: 14px system-ui, sans-serif; color: #222; }
 table { border-collapse: collapse; margin-bottom: 1.5em; }
 th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; vertical-align: top; }
 th { background: #f3f3f3; }
 #events { font: 12px ui-monospace, monospace; white-space: pre-wrap; background: #f7f7f7;
           padding: 6px; max-height: 40em; overflow-y: auto; }
 .unreachable { color: #b00020; } .draining { color: #a65f00; }
</style></head>
<body>
<h1>Flotilla fleet</h1>
<h2>Hosts</h2>
<table id="hosts"><thead><tr><th>Host</th><th>State</th><th>VMs</th><th>vCPUs committed</th>
<th>Memory committed</th><th>Networks</th></tr></thead><tbody></tbody></table>
<h2>VMs</h2>
<table id="vms"><thead><tr><th>VM</th><th>State</th><th>Host</th><th>Console</th>
<th>Last placement</th></tr></thead><tbody></tbody></table>
<h2>Events</h2>
<div id="events"></div>
<script>
function cell(tr, text, cls) {
  const td = document.createElement('td');
  td.textContent = text ?? '';
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}
async function refresh() {
  const r = await fetch('/api/fleet', { cache: 'no-store' });
  if (!r.ok) return;
  const f = await r.json();
  const hosts = document.querySelector('#hosts tbody');
  hosts.replaceChildren(...f.hosts.map(h => {
    const tr = document.createElement('tr');
    tr.dataset.host = h.name;
    cell(tr, h.name); cell(tr, h.state, h.state); cell(tr, h.vms);
    cell(tr, h.committed_vcpus + ' / ' + h.cpus);
    cell(tr, h.committed_memory_mib + ' / ' + h.memory_mib + ' MiB');
    cell(tr, h.networks.map(n => n.name + ' (' + n.mode + ') ' + (n.address ?? n.error ?? '')).join('\n'));
    return tr;
  }));
  const vms = document.querySelector('#vms tbody');
  vms.replaceChildren(...f.vms.map(v => {
    const tr = document.createElement('tr');
    tr.dataset.vm = v.name;
    cell(tr, v.name); cell(tr, v.state); cell(tr, v.host);
    const c = cell(tr, '');
    if (v.state === 'running') {
      const a = document.createElement('a');
      a.href = v.console; a.textContent = 'console';
      c.appendChild(a);
    }
    cell(tr, v.placement);
    return tr;
  }));
}
refresh();
setInterval(refresh, 2000);
const log = document.getElementById('events');
new EventSource('/api/events').onmessage = e => {
  log.textContent += e.data + '\n';
  log.scrollTop = log.scrollHeight;
  refresh();
};
</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_in_paths_and_pages() {
        assert_eq!(path_segment("web01"), "web01");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(html("<x a='1'>&"), "&lt;x a=&#39;1&#39;&gt;&amp;");
    }

    #[test]
    fn the_close_reason_fits_a_close_frame() {
        let r = close(CLOSE_MOVED, "x".repeat(500));
        assert_eq!(r.description.map(|d| d.len()), Some(123));
        // Two-byte characters: cut before the one that would not fit.
        let r = close(CLOSE_MOVED, "é".repeat(100));
        assert_eq!(r.description.map(|d| d.len()), Some(122));
        let r = close(CLOSE_MOVED, "host-b".into());
        assert_eq!(r.description.as_deref(), Some("host-b"));
    }
}
