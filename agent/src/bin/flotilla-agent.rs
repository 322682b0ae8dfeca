//! `flotilla-agent`: the per-host daemon, a one-shot local start, and a local control client.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use flotilla_agent::argv::{Accel, Ovmf, QemuHost};
use flotilla_agent::console::{ConsoleAuth, ConsoleSettings};
use flotilla_agent::control::{self, AgentCall, Request, Response};
use flotilla_agent::coordinator_link::{self, LinkSettings};
use flotilla_agent::dac::QemuUser;
use flotilla_agent::host_actor::{AgentSettings, HostAgent};
use flotilla_agent::host_networks::HostNetworks;
use flotilla_agent::qemu_process::StartTimeouts;
use flotilla_shared::config_file;

/// Flotilla host agent: owns this host's networks and QEMU processes.
///
/// Examples:
///   flotilla-agent --name host-a --networks-dir /etc/flotilla/networks --state-dir /var/lib/flotilla
///   flotilla-agent --networks-dir N --state-dir S --once-start web01.xml
///   flotilla-agent --state-dir S ctl list
#[derive(Parser)]
#[command(
    name = "flotilla-agent",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
struct Cli {
    /// TOML file whose keys are these long flags (flags and environment override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This host's name (default: the kernel hostname).
    #[arg(long, env = "FLOTILLA_HOST")]
    name: Option<String>,
    /// Directory of libvirt network XML files defining this host's networks.
    #[arg(long, default_value = "/etc/flotilla/networks")]
    networks_dir: PathBuf,
    /// Directory for VM state and the control socket.
    #[arg(long, default_value = "/var/lib/flotilla")]
    state_dir: PathBuf,
    /// What to do with a console on a non-loopback address with no password.
    #[arg(long, value_enum, default_value = "warn")]
    console_auth: AuthPolicy,
    /// Listen address for VNC consoles that name none (libvirt's vnc_listen).
    #[arg(long, default_value = "127.0.0.1")]
    vnc_listen: String,
    /// Listen address for SPICE consoles that name none (libvirt's spice_listen).
    #[arg(long, default_value = "127.0.0.1")]
    spice_listen: String,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    emulator: PathBuf,
    /// Accelerator: kvm when /dev/kvm works, else tcg.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// SPICE's TLS certificates (ca-cert.pem, server-cert.pem,
    /// server-key.pem, readable by QEMU's user), libvirt's
    /// spice_tls_x509_cert_dir: SPICE displays then get a TLS port.
    #[arg(long)]
    spice_tls_dir: Option<PathBuf>,
    /// The unprivileged user QEMU runs as (libvirt's qemu.conf `user`); its
    /// primary group should reach /dev/kvm. `root` runs QEMU unconfined.
    #[arg(long, default_value = "flotilla-qemu")]
    qemu_user: String,
    /// Start one VM on this host without a coordinator, print its live XML and console, and exit.
    #[arg(long, value_name = "FILE")]
    once_start: Option<PathBuf>,
    /// The coordinator, HOST:PORT, or several separated by commas (all are
    /// dialled; a follower names the leader; in TOML, a list); without it
    /// the agent runs standalone.
    #[arg(long, env = "FLOTILLA_COORDINATOR", value_delimiter = ',')]
    coordinator: Vec<String>,
    /// Directory written by `flotilla certs` (needs ca.pem and agent-NAME.pem).
    #[arg(long, env = "FLOTILLA_TLS_DIR", default_value = "/etc/flotilla/tls")]
    tls_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (daemon mode).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Network whose address receives incoming live migrations (default: the address this host reaches the coordinator from).
    #[arg(long)]
    migration_network: Option<String>,
    /// Pet this watchdog device (e.g. /dev/watchdog from softdog) each second
    /// while the host's lease holds or no HA guest runs: a hung agent resets
    /// the host. Never inside a test namespace: the whole machine resets.
    #[arg(long, value_name = "DEVICE")]
    watchdog: Option<PathBuf>,
    /// The watchdog's timeout in seconds, at least the device's own (softdog:
    /// `modprobe softdog soft_margin=10`); the coordinator waits this much
    /// longer before restarting the host's HA guests elsewhere.
    #[arg(long, default_value_t = 10)]
    watchdog_timeout_secs: u32,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuthPolicy {
    Warn,
    Require,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Talk to the running agent on this host through its control socket.
    Ctl {
        #[command(subcommand)]
        verb: Ctl,
        /// Print JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Run the fence keeper for this state directory (the agent starts one
    /// itself when it joins a coordinator): it kills the host's HA guests
    /// once the host's lease has lapsed, even when the agent is hung or gone.
    FenceKeeper,
}

#[derive(Subcommand)]
enum Ctl {
    /// Start a VM from domain XML.  Example: ctl start web01.xml
    Start { file: PathBuf },
    /// ACPI shutdown, escalating to quit.  Example: ctl shutdown web01 --timeout 30
    Shutdown {
        name: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Kill a VM.  Example: ctl destroy web01
    Destroy { name: String },
    /// Running VMs.  Example: ctl list
    List,
    /// Console URIs.  Example: ctl domdisplay web01
    Domdisplay { name: String },
    /// Live XML.  Example: ctl dumpxml web01
    Dumpxml { name: String },
    /// Networks and their current addresses.  Example: ctl net-list
    NetList,
    /// Re-read the networks directory (as SIGHUP does).  Example: ctl reload
    Reload,
    /// Migration destination: start paused, print the URI to send to.  Example: ctl migrate-incoming web01.xml --storage-token T
    MigrateIncoming {
        file: PathBuf,
        /// Refuse unless every writable disk's marker holds this token (see mark-storage).
        #[arg(long)]
        storage_token: Option<String>,
        /// Accept writable disks this host does not share with the source.
        #[arg(long = "unsafe")]
        allow_unsafe: bool,
    },
    /// Migration source: write a token beside each writable disk for the destination to read back.  Example: ctl mark-storage web01 --token T
    MarkStorage {
        name: String,
        #[arg(long)]
        token: String,
    },
    /// Migration source: send a VM.  Example: ctl migrate-out web01 --uri tcp:198.18.2.1:49152
    MigrateOut {
        name: String,
        #[arg(long)]
        uri: String,
        #[arg(long)]
        max_downtime: Option<u64>,
        #[arg(long)]
        bandwidth: Option<u64>,
        #[arg(long)]
        auto_converge: bool,
    },
    /// query-migrate.  Example: ctl migration-status web01
    MigrationStatus { name: String },
    /// migrate_cancel.  Example: ctl migrate-cancel web01
    MigrateCancel { name: String },
    /// Migration destination: resume the received VM.  Example: ctl migrate-finish web01
    MigrateFinish { name: String },
    /// Resume a paused VM.  Example: ctl resume web01
    Resume { name: String },
    /// Run a QEMU human monitor command.  Example: ctl qemu-monitor-command web01 --hmp 'info status'
    QemuMonitorCommand {
        name: String,
        #[arg(long)]
        hmp: String,
    },
}

fn main() -> ExitCode {
    let argv = match config_file::merged_argv(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            // The whole chain: a read error names the file, its source says why.
            eprintln!("flotilla-agent: {:#}", anyhow::Error::new(e));
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    init_tracing(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla-agent: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::Ctl { verb, json }) = &cli.command {
        let sys = System::new();
        return sys.block_on(ctl(&cli.state_dir, verb, *json));
    }
    if let Some(Command::FenceKeeper) = &cli.command {
        std::fs::create_dir_all(&cli.state_dir)
            .with_context(|| format!("cannot create {}", cli.state_dir.display()))?;
        flotilla_agent::fence_keeper::run(&cli.state_dir)?;
        return Ok(ExitCode::SUCCESS);
    }
    let settings = settings(&cli)?;
    let networks = HostNetworks::load(&settings.networks_dir)?;
    for p in &networks.problems {
        tracing::warn!("{p}");
    }
    std::fs::create_dir_all(&settings.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            settings.state_dir.display()
        )
    })?;
    let sys = System::new();
    if let Some(file) = &cli.once_start {
        return sys.block_on(once_start(settings, networks, file));
    }
    let link = (!cli.coordinator.is_empty())
        .then(|| cli.coordinator.join(","))
        .map(|coordinator| LinkSettings {
            coordinator,
            tls_dir: cli.tls_dir.clone(),
            host: settings.console.host.clone(),
            machine_types: {
                let mut m = flotilla_agent::machine_types::probe(&settings.qemu.emulator);
                m.kvm = settings.qemu.accel == Accel::Kvm;
                m.cpu_models = flotilla_agent::machine_types::probe_cpu_models(
                    &settings.qemu.emulator,
                    settings.qemu.accel.as_str(),
                );
                m
            },
            state_dir: settings.state_dir.clone(),
            watchdog_secs: cli.watchdog.as_ref().map(|_| cli.watchdog_timeout_secs),
        });
    let watchdog = match &cli.watchdog {
        Some(path) => Some(
            flotilla_agent::watchdog::Watchdog::open(path, cli.watchdog_timeout_secs)
                .with_context(|| format!("cannot open the watchdog {}", path.display()))?,
        ),
        None => None,
    };
    if link.is_some() {
        // Part of a fleet: HA guests need their fence before any can start.
        flotilla_agent::fence_keeper::spawn_if_missing(&settings.state_dir)
            .context("cannot start the fence keeper")?;
    }
    let metrics = cli.metrics_listen;
    sys.block_on(async move {
        if let Some(addr) = metrics {
            flotilla_shared::net::metrics::serve(addr)?;
            tracing::info!(%addr, "metrics at /metrics");
        }
        daemon(settings, networks, link, watchdog).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn settings(cli: &Cli) -> anyhow::Result<AgentSettings> {
    let host = match &cli.name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("cannot read the hostname; pass --name")?
            .to_string_lossy()
            .into_owned(),
    };
    let accel = match cli.accel {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            if flotilla_agent::qemu_process::kvm_usable() {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    };
    let user = QemuUser::resolve(&cli.qemu_user).map_err(anyhow::Error::msg)?;
    if user.is_some() {
        // QEMU's user passes through the state directory to its own VM's.
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(&cli.state_dir) {
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(
                    &cli.state_dir,
                    std::fs::Permissions::from_mode(mode | 0o011),
                )
                .with_context(|| {
                    format!("cannot open {} to QEMU's user", cli.state_dir.display())
                })?;
            }
        }
    }
    let cgroups = flotilla_agent::cgroup::parent_here().map(|p| (p, host.clone()));
    Ok(AgentSettings {
        networks_dir: cli.networks_dir.clone(),
        state_dir: cli.state_dir.clone(),
        console: ConsoleSettings {
            host,
            vnc_listen: cli.vnc_listen.clone(),
            spice_listen: cli.spice_listen.clone(),
            console_auth: match cli.console_auth {
                AuthPolicy::Warn => ConsoleAuth::Warn,
                AuthPolicy::Require => ConsoleAuth::Require,
            },
            spice_tls: cli.spice_tls_dir.is_some(),
        },
        qemu: QemuHost {
            emulator: find_program(&cli.emulator)?,
            accel,
            ovmf: Ovmf::find(Path::new("/")),
            hugepages: hugetlbfs_mount(),
            user,
            cgroups,
            spice_tls: cli.spice_tls_dir.clone(),
        },
        timeouts: StartTimeouts::default(),
        migration_network: cli.migration_network.clone(),
    })
}

/// The first hugetlbfs mount this agent sees, for guests backed by huge pages.
fn hugetlbfs_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "hugetlbfs").then(|| PathBuf::from(dir))
    })
}

fn find_program(p: &Path) -> anyhow::Result<PathBuf> {
    if p.components().count() > 1 {
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .with_context(|| {
            format!(
                "{} not found in PATH (install qemu-system-x86)",
                p.display()
            )
        })
}

async fn daemon(
    settings: AgentSettings,
    networks: HostNetworks,
    link: Option<LinkSettings>,
    watchdog: Option<flotilla_agent::watchdog::Watchdog>,
) -> anyhow::Result<()> {
    let state_dir = settings.state_dir.clone();
    tracing::info!(host = %settings.console.host, accel = settings.qemu.accel.as_str(),
        networks = networks.networks.len(), "agent starting");
    let mut host_agent = HostAgent::new(settings, networks, true);
    if let Some(w) = watchdog {
        tracing::info!(
            timeout_secs = w.timeout_secs(),
            "petting the watchdog while the fence holds"
        );
        host_agent = host_agent.with_watchdog(w);
    }
    let agent = host_agent.start();
    let recipient = agent.clone().recipient();
    let server_dir = state_dir.clone();
    let server = actix::spawn(async move { control::serve(&server_dir, recipient).await });
    if let Some(link) = link {
        actix::spawn(coordinator_link::run(link, agent.clone()));
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Ok(Response::Done(msg) | Response::Error(msg)) = agent.send(AgentCall(Request::ReloadNetworks)).await {
                    tracing::info!("SIGHUP: {msg}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // VMs keep running: the agent's exit is not the guests' business. A
    // deliberate stop disarms the watchdog (the fence keeper still guards).
    let _ = agent.send(flotilla_agent::host_actor::DisarmWatchdog).await;
    server.abort();
    let _ = std::fs::remove_file(control::socket_path(&state_dir));
    tracing::info!("agent stopping; VMs keep running");
    Ok(())
}

async fn once_start(
    settings: AgentSettings,
    networks: HostNetworks,
    file: &Path,
) -> anyhow::Result<ExitCode> {
    let xml =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let request = Request::Start {
        xml,
        source: file.display().to_string(),
        incarnation: 0,
    };
    // A running agent owns this host's VMs and ports: let it do the start.
    let response =
        match control::call(&settings.state_dir, &request, Duration::from_secs(120)).await {
            Ok(r) => r,
            Err(control::ControlError::Connect { .. }) => {
                let agent = HostAgent::new(settings, networks, false).start();
                agent
                    .send(AgentCall(request))
                    .await
                    .context("agent actor stopped")?
            }
            Err(e) => return Err(e.into()),
        };
    match response {
        Response::Started {
            vm,
            live_xml,
            warnings,
        } => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            print!("{live_xml}");
            for c in vm.consoles {
                println!("console: {}", c.uri);
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
        other => bail!("unexpected response {other:?}"),
    }
}

async fn ctl(state_dir: &Path, verb: &Ctl, json: bool) -> anyhow::Result<ExitCode> {
    let request = match verb {
        Ctl::Start { file } => Request::Start {
            xml: std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
            source: file.display().to_string(),
            incarnation: 0,
        },
        Ctl::Shutdown { name, timeout } => Request::Shutdown {
            name: name.clone(),
            timeout_secs: *timeout,
        },
        Ctl::Destroy { name } => Request::Destroy { name: name.clone() },
        Ctl::List => Request::List,
        Ctl::Domdisplay { name } => Request::DomDisplay { name: name.clone() },
        Ctl::Dumpxml { name } => Request::DumpXml { name: name.clone() },
        Ctl::NetList => Request::NetList,
        Ctl::Reload => Request::ReloadNetworks,
        Ctl::MigrateIncoming {
            file,
            storage_token,
            allow_unsafe,
        } => Request::MigrateIncoming {
            xml: std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?,
            source: file.display().to_string(),
            postcopy: false,
            storage_token: storage_token.clone(),
            copy: None,
            allow_unsafe: *allow_unsafe,
            incarnation: 0,
        },
        Ctl::MarkStorage { name, token } => Request::MarkStorage {
            name: name.clone(),
            token: token.clone(),
        },
        Ctl::MigrateOut {
            name,
            uri,
            max_downtime,
            bandwidth,
            auto_converge,
        } => Request::MigrateOut {
            name: name.clone(),
            uri: uri.clone(),
            max_downtime_ms: *max_downtime,
            bandwidth_mib_s: *bandwidth,
            auto_converge: *auto_converge,
            postcopy: false,
        },
        Ctl::MigrationStatus { name } => Request::MigrationStatus { name: name.clone() },
        Ctl::MigrateCancel { name } => Request::MigrateCancel { name: name.clone() },
        Ctl::MigrateFinish { name } => Request::MigrateFinish {
            name: name.clone(),
            paused: false,
        },
        Ctl::Resume { name } => Request::Resume {
            name: name.clone(),
            operator: true,
        },
        Ctl::QemuMonitorCommand { name, hmp } => Request::MonitorCommand {
            name: name.clone(),
            command: hmp.clone(),
        },
    };
    let response = control::call(state_dir, &request, Duration::from_secs(300)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(match response {
            Response::Error(_) => ExitCode::from(1),
            _ => ExitCode::SUCCESS,
        });
    }
    match response {
        Response::Started { vm, warnings, .. } => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("Domain '{}' started (pid {})", vm.name, vm.pid);
            for c in vm.consoles {
                println!("console: {}", c.uri);
            }
        }
        Response::Done(msg) => println!("{}", msg.trim_end()),
        Response::Incoming { vm, uri, nbd } => {
            println!(
                "Domain '{}' waiting for migration (pid {})",
                vm.name, vm.pid
            );
            println!("uri: {uri}");
            if let Some(n) = nbd {
                println!("nbd: {}:{}", n.host, n.port);
            }
        }
        Response::StorageMarked(disks) => println!("{} disk(s) marked", disks.len()),
        Response::ConsoleOpened { addr } => println!("console relay to {addr}"),
        Response::GuestInterfaces(i) => print!("{}", flotilla_shared::proto::domifaddr_table(&i)),
        Response::Migration(p) => {
            println!("status: {}", p.status);
            println!(
                "transferred: {} remaining: {} total: {}",
                p.transferred, p.remaining, p.total
            );
            if let Some(d) = p.downtime_ms {
                println!("downtime_ms: {d}");
            }
            if let Some(t) = p.total_time_ms {
                println!("total_time_ms: {t}");
            }
            if let Some(e) = p.error {
                println!("error: {e}");
            }
        }
        Response::Vms(vms) => {
            println!("{:<20} {:<10} {:>8}  CONSOLES", "NAME", "STATE", "PID");
            for v in vms {
                let uris: Vec<_> = v.consoles.iter().map(|c| c.uri.as_str()).collect();
                println!(
                    "{:<20} {:<10} {:>8}  {}",
                    v.name,
                    v.state,
                    v.pid,
                    uris.join(" ")
                );
            }
        }
        Response::Consoles(cs) => {
            for c in cs {
                let note = if c.authenticated {
                    ""
                } else {
                    "  (unauthenticated)"
                };
                println!("{}{note}", c.uri);
            }
        }
        Response::Xml(x) => print!("{x}"),
        Response::Networks { networks, problems } => {
            print!("{}", flotilla_shared::proto::net_list_table(&networks));
            for p in problems {
                eprintln!("warning: {p}");
            }
        }
        Response::Error(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn with_example(flags: &[&str]) -> Cli {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/agent.toml");
        let mut argv: Vec<OsString> =
            vec!["flotilla-agent".into(), "--config".into(), example.into()];
        argv.extend(flags.iter().map(OsString::from));
        let merged = config_file::merged_argv(argv, &Cli::command()).expect("the example parses");
        Cli::try_parse_from(merged).expect("merged flags parse")
    }

    #[test]
    fn the_shipped_example_config_is_read_and_flags_win() {
        let cli = with_example(&[]);
        assert_eq!(cli.networks_dir, PathBuf::from("/etc/flotilla/networks"));
        assert_eq!(cli.coordinator, ["flotilla-coordinator.example.net:7443"]);
        assert_eq!(cli.migration_network.as_deref(), Some("mgmt"));
        assert!(matches!(cli.log_format, LogFormat::Json));
        assert_eq!(cli.metrics_listen, "0.0.0.0:9465".parse().ok());
        let cli = with_example(&[
            "--state-dir",
            "/srv/state",
            "--log-format=text",
            "--coordinator",
            "a:7443,b:7443",
        ]);
        assert_eq!(cli.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(
            cli.coordinator,
            ["a:7443", "b:7443"],
            "the flag replaces the file's list"
        );
        assert!(matches!(cli.log_format, LogFormat::Text));
        assert_eq!(cli.networks_dir, PathBuf::from("/etc/flotilla/networks"));
    }
}
