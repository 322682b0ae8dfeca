//! `flotilla-coordinator`: the fleet's control plane over QUIC with mutual TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::{CommandFactory, Parser, ValueEnum};
use flotilla_coordinator::fencing::FencePolicy;
use flotilla_coordinator::fleet::{Fleet, FleetSettings};
use flotilla_coordinator::scheduler::{Policy, Strategy};
use flotilla_coordinator::server;
use flotilla_coordinator::store::RedbStore;
use flotilla_coordinator::web::WebSettings;
use flotilla_shared::config_file;
use flotilla_shared::net::{quic, tls};

/// Flotilla coordinator: keeps VM definitions, schedules them onto hosts.
///
/// Example:
///   flotilla-coordinator --listen 198.19.0.1:7443 --data-dir /var/lib/flotilla-coordinator --tls-dir /etc/flotilla/tls
#[derive(Parser)]
#[command(
    name = "flotilla-coordinator",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
struct Cli {
    /// TOML file whose keys are these long flags (flags and environment override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP address to listen on for QUIC.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, default_value = "/var/lib/flotilla-coordinator")]
    data_dir: PathBuf,
    /// Directory written by `flotilla certs`.
    #[arg(long, env = "FLOTILLA_TLS_DIR", default_value = "/etc/flotilla/tls")]
    tls_dir: PathBuf,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 2)]
    heartbeat_secs: u64,
    /// Seconds without a heartbeat before a host is shown unreachable.
    #[arg(long, default_value_t = 10)]
    heartbeat_timeout_secs: u64,
    /// Seconds each acknowledged heartbeat renews a host's lease (L): a host
    /// cut off for this long kills its HA guests.
    #[arg(long, default_value_t = 8.0)]
    lease_secs: f64,
    /// Extra seconds, past the lease, before a silent host's HA VMs are
    /// restarted elsewhere (the fence keeper's poll and the kill).
    #[arg(long, default_value_t = 2.0)]
    fence_margin_secs: f64,
    /// Bound on how much faster this clock may run than a host's (ρ).
    #[arg(long, default_value_t = 1e-3)]
    clock_rate_bound: f64,
    /// Placement strategy.
    #[arg(long, value_enum, default_value = "spread")]
    strategy: StrategyArg,
    /// vCPU overcommit ratio.
    #[arg(long, default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// Memory overcommit ratio.
    #[arg(long, default_value_t = 1.0)]
    memory_overcommit: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Threads for QUIC and TLS (handshakes, packets, streams); decisions
    /// run on a thread of their own whatever this says.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    quic_threads: u16,
    /// Serve the web console and fleet page over HTTPS at ADDR (TCP).
    #[arg(long)]
    web_listen: Option<SocketAddr>,
    /// The https://HOST:PORT that printed web URLs start with (default: the
    /// --web-listen address). Browsers must reach it, and the certificate
    /// should name it (`flotilla certs init --san`).
    #[arg(long, requires = "web_listen")]
    web_url: Option<String>,
    /// noVNC's directory, with core/rfb.js (Debian's novnc package puts it here).
    #[arg(long, default_value = "/usr/share/novnc")]
    novnc_dir: PathBuf,
    /// Seconds a web ticket may wait to be opened.
    #[arg(long, default_value_t = 60)]
    web_ticket_secs: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    Spread,
    Binpack,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A flag's seconds as a duration, refusing what no duration is.
fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{flag} {v}: not a number of seconds"))
}

/// The lease must outlast a heartbeat's round plus the 2 s before expiry in
/// which a host refuses starts, or hosts would refuse every start (and kill
/// their HA guests at the first late acknowledgement).
fn lease(lease_secs: f64, heartbeat_secs: u64) -> anyhow::Result<Duration> {
    let lease = secs("--lease-secs", lease_secs)?;
    let floor = Duration::from_secs(heartbeat_secs.max(1) + 2);
    if lease <= floor {
        bail!(
            "--lease-secs {lease_secs}: must be more than --heartbeat-secs + 2 ({} s), the \
             time a host needs to renew it before it stops starting VMs",
            floor.as_secs()
        );
    }
    Ok(lease)
}

fn main() -> ExitCode {
    let argv = match config_file::merged_argv(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            // The whole chain: a read error names the file, its source says why.
            eprintln!("flotilla-coordinator: {:#}", anyhow::Error::new(e));
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let sys = System::new();
    match sys.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flotilla-coordinator: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(addr) = cli.metrics_listen {
        flotilla_shared::net::metrics::serve(addr)?;
        tracing::info!(%addr, "metrics at /metrics");
    }
    let store = RedbStore::open(&cli.data_dir)
        .with_context(|| format!("opening store in {}", cli.data_dir.display()))?;
    let server_config = tls::server_config(&cli.tls_dir)?;
    // QUIC and TLS get a multi-threaded runtime of their own: with ten
    // thousand agents, packets and handshakes are most of the work, and the
    // actor's thread would serialise them with everything else.
    let quic_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(cli.quic_threads))
        .thread_name("quic")
        .enable_all()
        .build()
        .context("cannot start the QUIC runtime")?;
    let endpoint = {
        let _runtime = quic_rt.enter();
        let socket = quic::fan_in_socket(cli.listen)
            .with_context(|| format!("cannot listen on {}", cli.listen))?;
        let runtime = quinn::default_runtime().context("no runtime for QUIC")?;
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .with_context(|| format!("cannot listen on {}", cli.listen))?
    };
    let settings = FleetSettings {
        heartbeat: Duration::from_secs(cli.heartbeat_secs),
        heartbeat_timeout: Duration::from_secs(cli.heartbeat_timeout_secs),
        fencing: FencePolicy {
            lease: lease(cli.lease_secs, cli.heartbeat_secs)?,
            clock_rate_bound: cli.clock_rate_bound,
            margin: secs("--fence-margin-secs", cli.fence_margin_secs)?,
        },
        policy: Policy {
            strategy: match cli.strategy {
                StrategyArg::Spread => Strategy::Spread,
                StrategyArg::Binpack => Strategy::Binpack,
            },
            cpu_ratio: cli.cpu_overcommit,
            memory_ratio: cli.memory_overcommit,
        },
        // The standard library's per-process random hash keys.
        token_seed: std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        ),
    };
    let fleet = Fleet::new(Arc::new(store), settings)
        .with_context(|| format!("cannot load the store in {}", cli.data_dir.display()))?;
    let moves = fleet.moves();
    let fleet = fleet.start();
    let web = match cli.web_listen {
        Some(listen) => {
            if listen.ip().is_unspecified() && cli.web_url.is_none() {
                bail!("--web-listen {listen} is on every address: say which one URLs name with --web-url https://HOST:{}", listen.port());
            }
            let settings = WebSettings {
                listen,
                base_url: cli
                    .web_url
                    .clone()
                    .unwrap_or_else(|| format!("https://{listen}"))
                    .trim_end_matches('/')
                    .to_string(),
                novnc_dir: cli.novnc_dir.clone(),
                ticket_ttl: Duration::from_secs(cli.web_ticket_secs),
                tls: tls::web_server_config(&cli.tls_dir)?,
            };
            let web = flotilla_coordinator::web::start(settings, fleet.clone(), moves)?;
            tracing::info!(%listen, "web console listening");
            Some(web)
        }
        None => None,
    };
    tracing::info!(listen = %cli.listen, data_dir = %cli.data_dir.display(), "coordinator listening");
    let serving = quic_rt.spawn(server::serve(endpoint.clone(), fleet, web));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = serving => {}
    }
    endpoint.close(0u32.into(), b"coordinator stopping");
    // Not dropped: dropping a runtime from inside another one panics.
    quic_rt.shutdown_background();
    tracing::info!("coordinator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn with_example(flags: &[&str]) -> Cli {
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/config/coordinator.toml"
        );
        let mut argv: Vec<OsString> = vec![
            "flotilla-coordinator".into(),
            "--config".into(),
            example.into(),
        ];
        argv.extend(flags.iter().map(OsString::from));
        let merged = config_file::merged_argv(argv, &Cli::command()).expect("the example parses");
        Cli::try_parse_from(merged).expect("merged flags parse")
    }

    #[test]
    fn a_lease_too_short_to_renew_is_refused() {
        assert_eq!(lease(8.0, 2).ok(), Some(Duration::from_secs(8)));
        assert_eq!(lease(3.5, 1).ok(), Some(Duration::from_millis(3500)));
        let e = lease(4.0, 2).expect_err("too short");
        assert_eq!(
            e.to_string(),
            "--lease-secs 4: must be more than --heartbeat-secs + 2 (4 s), the time a host \
             needs to renew it before it stops starting VMs"
        );
        assert!(lease(-1.0, 2).is_err());
    }

    #[test]
    fn the_shipped_example_config_is_read_and_flags_win() {
        let cli = with_example(&[]);
        assert_eq!(cli.listen, "0.0.0.0:7443".parse().expect("addr"));
        assert_eq!(cli.heartbeat_timeout_secs, 10);
        assert!((cli.cpu_overcommit - 4.0).abs() < f64::EPSILON);
        assert!(matches!(cli.log_format, LogFormat::Json));
        let cli = with_example(&["--heartbeat-secs", "5", "--data-dir", "/srv/d"]);
        assert_eq!(cli.heartbeat_secs, 5);
        assert_eq!(cli.data_dir, PathBuf::from("/srv/d"));
        assert_eq!(cli.heartbeat_timeout_secs, 10);
    }
}
