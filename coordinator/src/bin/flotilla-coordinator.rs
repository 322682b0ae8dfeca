//! `flotilla-coordinator`: the fleet's control plane over QUIC with mutual TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::{CommandFactory, Parser, ValueEnum};
use flotilla_coordinator::etcd_store::{self, EtcdSettings, EtcdStore, EtcdTls};
use flotilla_coordinator::fencing::FencePolicy;
use flotilla_coordinator::fleet::{Fleet, FleetSettings};
use flotilla_coordinator::leadership::{ClusterView, EtcdCluster, Session, Verdict};
use flotilla_coordinator::scheduler::{Policy, Strategy};
use flotilla_coordinator::server::{self, Plane, Serving};
use flotilla_coordinator::store::{RedbStore, Store};
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
    /// Where the fleet's state lives: the embedded redb (one coordinator),
    /// or etcd, shared by several coordinators of which one leads.
    #[arg(long, value_enum, default_value = "redb")]
    store: StoreArg,
    /// etcd's client URLs, comma-separated (with --store etcd; in TOML, a list).
    #[arg(long, value_delimiter = ',', value_name = "URL,…")]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this fleet in etcd.
    #[arg(long, default_value = "/flotilla")]
    etcd_prefix: String,
    /// CA certificate that signed etcd's certificates (PEM); with
    /// --etcd-cert and --etcd-key, etcd is reached over TLS.
    #[arg(long, requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// This coordinator's etcd client certificate (PEM).
    #[arg(long, requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// This coordinator's etcd client key (PEM).
    #[arg(long, requires = "etcd_ca")]
    etcd_key: Option<PathBuf>,
    /// Seconds of the leader's etcd lease: a dead leader is replaced this
    /// long after its last keep-alive. etcd raises it to its own minimum
    /// (1.5 election timeouts, rounded up).
    #[arg(long, default_value_t = 1)]
    leader_lease_secs: u64,
    /// The address agents and operators reach this coordinator at, as
    /// followers name it (default: --listen, which must then not be 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    Redb,
    Etcd,
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

/// How a coordinator stops on its own: its etcd lease can no longer be
/// trusted, so it may not act as leader (its supervisor restarts it as a
/// follower). Distinct from 2, a setup error.
const EXIT_LEASE_LOST: u8 = 3;

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(addr) = cli.metrics_listen {
        flotilla_shared::net::metrics::serve(addr)?;
        tracing::info!(%addr, "metrics at /metrics");
    }
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
        epoch: 0,
    };
    let advertise = match (&cli.advertise, cli.listen.ip().is_unspecified()) {
        (Some(a), _) => a.clone(),
        (None, false) => cli.listen.to_string(),
        (None, true) if cli.store == StoreArg::Etcd => bail!(
            "--listen {} is on every address: say which one followers name with --advertise HOST:{}",
            cli.listen,
            cli.listen.port()
        ),
        (None, true) => cli.listen.to_string(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    match cli.store {
        StoreArg::Redb => {
            let store = RedbStore::open(&cli.data_dir)
                .with_context(|| format!("opening store in {}", cli.data_dir.display()))?;
            let (fleet, web) = lead(&cli, Arc::new(store), settings)
                .with_context(|| format!("cannot load the store in {}", cli.data_dir.display()))?;
            let plane = Plane::single(advertise, fleet, web);
            tracing::info!(listen = %cli.listen, data_dir = %cli.data_dir.display(), "coordinator listening");
            let serving = quic_rt.spawn(server::serve(endpoint.clone(), plane));
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = serving => {}
            }
        }
        StoreArg::Etcd => {
            on_etcd(
                &cli,
                settings,
                advertise,
                endpoint.clone(),
                &quic_rt,
                &mut term,
            )
            .await?;
        }
    }
    endpoint.close(0u32.into(), b"coordinator stopping");
    // Not dropped: dropping a runtime from inside another one panics.
    quic_rt.shutdown_background();
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Serves as one of several coordinators on etcd: a follower at once, the
/// leader once elected, until a signal (or a lost lease, which exits).
async fn on_etcd(
    cli: &Cli,
    settings: FleetSettings,
    advertise: String,
    endpoint: quinn::Endpoint,
    quic_rt: &tokio::runtime::Runtime,
    term: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let etcd = EtcdSettings {
        endpoints: cli.etcd_endpoints.clone(),
        prefix: cli.etcd_prefix.clone(),
        tls: match (&cli.etcd_ca, &cli.etcd_cert, &cli.etcd_key) {
            (Some(ca), Some(cert), Some(key)) => Some(EtcdTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
    };
    if etcd.endpoints.is_empty() {
        bail!("--store etcd needs --etcd-endpoints URL[,URL…]");
    }
    // etcd's gRPC connections and the lease's keep-alives run here,
    // apart from QUIC and from the fleet core's blocking store calls.
    let etcd_rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd")
            .enable_all()
            .build()
            .context("cannot start the etcd runtime")?,
    );
    // Never dropped: its last handle would otherwise go inside the
    // actor system's runtime, where dropping a runtime panics.
    std::mem::forget(etcd_rt.clone());
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // etcd may come up after this process (a node's boot, the
    // demo): wait for it, saying why, as an agent waits for us.
    let mut pause = Duration::from_millis(200);
    let (client, campaign_client, session) = loop {
        let attempt = {
            let etcd = etcd.clone();
            let (prefix, address) = (cli.etcd_prefix.clone(), advertise.clone());
            let ttl = Duration::from_secs(cli.leader_lease_secs.max(1));
            let leading = leading.clone();
            etcd_rt.spawn(async move {
                let client = etcd_store::connect(&etcd, true).await?;
                let campaign_client = etcd_store::connect(&etcd, false).await?;
                let session = Session::open(client.clone(), &prefix, &address, ttl, move |verdict| {
                    let leader = leading.load(std::sync::atomic::Ordering::SeqCst);
                    if leader || verdict == Verdict::Expired {
                        eprintln!("flotilla-coordinator: etcd lease lost ({verdict:?}); stopping so no deposed leader acts");
                        std::process::exit(i32::from(EXIT_LEASE_LOST));
                    }
                })
                .await?;
                Ok::<_, flotilla_coordinator::store::StoreError>((client, campaign_client, session))
            })
        };
        let outcome = tokio::select! {
            r = attempt => r?,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match outcome {
            Ok(up) => break up,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "etcd not reachable yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    };
    let deposed = Arc::new(tokio::sync::Notify::new());
    let reader = EtcdStore::new(
        client.clone(),
        &cli.etcd_prefix,
        None,
        etcd_rt.clone(),
        deposed.clone(),
    )?;
    let (role_tx, role) = tokio::sync::watch::channel(Serving::Follower);
    let plane = Arc::new(Plane {
        role,
        cluster: Arc::new(ClusterView::Etcd(Box::new(EtcdCluster {
            client: client.clone(),
            settings: etcd.clone(),
            address: advertise.clone(),
            store: Arc::new(reader),
        }))),
    });
    tracing::info!(listen = %cli.listen, endpoints = %cli.etcd_endpoints.join(","), "coordinator listening as a follower; campaigning");
    let serving = quic_rt.spawn(server::serve(endpoint.clone(), plane));
    let session = Arc::new(session);
    let campaign = {
        let session = session.clone();
        etcd_rt.spawn(async move { session.campaign(&campaign_client).await })
    };
    let leading_fleet = async {
        let fence = campaign.await?;
        let epoch = fence.revision;
        let store = EtcdStore::new(
            client.clone(),
            &cli.etcd_prefix,
            Some(fence),
            etcd_rt.clone(),
            deposed.clone(),
        )?;
        let settings = FleetSettings {
            epoch: u64::try_from(epoch).unwrap_or(0),
            ..settings
        };
        // From here on, a lease that goes unconfirmed stops the process.
        leading.store(true, std::sync::atomic::Ordering::SeqCst);
        let (fleet, web) = lead(cli, Arc::new(store), settings)?;
        tracing::info!(epoch, "elected leader");
        let _ = role_tx.send(Serving::Leader { fleet, web });
        std::future::pending::<anyhow::Result<()>>().await
    };
    let stopped = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = serving => Ok(()),
        r = leading_fleet => r,
        _ = deposed.notified() => {
            eprintln!("flotilla-coordinator: etcd refused a write: this coordinator is no longer the leader; stopping");
            std::process::exit(i32::from(EXIT_LEASE_LOST));
        }
    };
    // A planned stop hands leadership over at once.
    let closing = session.clone();
    let _ = etcd_rt.spawn(async move { closing.close().await }).await;
    stopped?;
    Ok(())
}

/// Loads the fleet from `store` and starts it, with its web pages when asked.
fn lead(
    cli: &Cli,
    store: Arc<dyn Store>,
    settings: FleetSettings,
) -> anyhow::Result<(Addr<Fleet>, Option<Arc<flotilla_coordinator::web::Web>>)> {
    let fleet = Fleet::new(store, settings)?;
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
    Ok((fleet, web))
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
    fn etcd_endpoints_come_as_a_toml_list_or_a_comma_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "store = \"etcd\"\netcd-endpoints = [\"https://a:2379\", \"https://b:2379\"]\n",
        )
        .expect("write");
        let argv = vec![
            OsString::from("flotilla-coordinator"),
            "--config".into(),
            file.into_os_string(),
        ];
        let merged = config_file::merged_argv(argv, &Cli::command()).expect("merged");
        let cli = Cli::try_parse_from(merged).expect("parse");
        assert!(cli.store == StoreArg::Etcd);
        assert_eq!(cli.etcd_endpoints, ["https://a:2379", "https://b:2379"]);
        let cli = Cli::try_parse_from([
            "flotilla-coordinator",
            "--etcd-endpoints",
            "https://a:2379,https://b:2379",
        ])
        .expect("parse");
        assert_eq!(cli.etcd_endpoints, ["https://a:2379", "https://b:2379"]);
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
