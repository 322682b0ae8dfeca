//! `flotilla`: the operator CLI.
//!
//! Offline verbs (`validate`, `certs`) run here; fleet verbs send one
//! `OperatorRequest` to the coordinator over QUIC with mutual TLS and print
//! the answer as a table (or JSON with `--json`). Exit codes: 0 success, 1 the
//! coordinator refused or the request failed, 2 the CLI could not ask at all.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use flotilla_shared::net::pki::{self, Role};
use flotilla_shared::net::{quic, tls};
use flotilla_shared::proto::{
    ClientMessage, CopyMode, MigrationOutcome, OperatorError, OperatorRequest, OperatorResponse,
    ServerMessage,
};
use flotilla_shared::xml::validate::validate_document;

/// Operate a Flotilla fleet of QEMU/KVM hosts.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print JSON instead of tables (list-like verbs).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConnArgs {
    /// The coordinator, HOST:PORT, or several separated by commas: all are
    /// dialled at once and the first to answer is used.
    #[arg(long, global = true, env = "FLOTILLA_COORDINATOR")]
    coordinator: Option<String>,
    /// Seconds to wait for a coordinator's handshake. One where nothing
    /// listens fails at once.
    #[arg(long, global = true, default_value_t = 1.0)]
    connect_timeout_secs: f64,
    /// Seconds a request keeps trying while coordinators elect a leader:
    /// a follower's "not the leader" is followed to the leader, and a
    /// request that is safe to repeat (reads, `define`, `ha`, `autostart`)
    /// is sent again when its coordinator dies before answering.
    #[arg(long, global = true, default_value_t = 15.0)]
    retry_secs: f64,
    /// Directory written by `flotilla certs`.
    #[arg(long, global = true, env = "FLOTILLA_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Which operator certificate to present.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_OPERATOR",
        default_value = "admin"
    )]
    operator: String,
}

#[derive(Subcommand)]
enum Command {
    /// Check libvirt domain or network XML files offline.
    ///
    /// Example: flotilla validate web01.xml public-net.xml
    Validate {
        /// Files to check; each is a <domain> or a <network>.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Create and issue certificates.
    #[command(subcommand)]
    Certs(Certs),
    /// The coordinators, which one leads and its fencing epoch, and the
    /// etcd members under them with their health.
    ///
    /// Example: flotilla --coordinator 198.18.0.1:7443,198.18.0.2:7443 cluster
    Cluster,
    /// Store a VM definition (libvirt domain XML).
    ///
    /// Example: flotilla define web01.xml
    Define {
        /// The libvirt domain XML file to store.
        file: PathBuf,
    },
    /// Remove a stopped VM's definition.
    ///
    /// Example: flotilla undefine web01
    Undefine {
        /// The VM's name.
        name: String,
    },
    /// List running VMs (with --all, every defined VM).
    ///
    /// Example: flotilla list --all --json
    List {
        /// Include defined VMs that are not running.
        #[arg(long)]
        all: bool,
    },
    /// Print a VM's stored definition, or with --live its running XML.
    ///
    /// Example: flotilla dumpxml web01 --live
    Dumpxml {
        /// The VM's name.
        name: String,
        /// The running XML from its host: resolved addresses and ports.
        #[arg(long)]
        live: bool,
        /// Include console passwords, as virsh's --security-info.
        #[arg(long)]
        security_info: bool,
    },
    /// List a VM's network interfaces: host device, type, source, model, MAC.
    ///
    /// Example: flotilla domiflist web01
    Domiflist {
        /// The VM's name.
        name: String,
    },
    /// Start a VM where the scheduler chooses, or on --host.
    ///
    /// Example: flotilla start web01 --host host-a
    Start {
        /// The VM's name.
        name: String,
        /// Start on this host instead of the scheduler's choice.
        #[arg(long)]
        host: Option<String>,
    },
    /// Ask a VM's guest to power off (ACPI), escalating after --timeout seconds.
    ///
    /// Example: flotilla shutdown web01 --timeout 60
    Shutdown {
        /// The VM's name.
        name: String,
        /// Seconds to wait for the guest before stopping QEMU.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stop a VM immediately.
    ///
    /// Example: flotilla destroy web01
    Destroy {
        /// The VM's name.
        name: String,
    },
    /// Print where a VM's consoles listen now (vnc://ADDR:PORT).
    ///
    /// Example: flotilla domdisplay web01
    Domdisplay {
        /// The VM's name.
        name: String,
    },
    /// List the fleet's hosts.
    ///
    /// Example: flotilla hosts
    Hosts,
    /// List a host's networks with their current addresses.
    ///
    /// Example: flotilla net-list --host host-a
    NetList {
        /// The host's name, as `flotilla hosts` lists it.
        #[arg(long)]
        host: String,
    },
    /// Live-migrate a running VM, showing progress; Ctrl-C offers to abort.
    ///
    /// Example: flotilla migrate web01 --to host-b --max-downtime 300 --timeout 120
    Migrate {
        /// The VM's name.
        name: String,
        /// Destination host; the scheduler picks one when absent.
        #[arg(long)]
        to: Option<String>,
        /// Maximum downtime in milliseconds.
        #[arg(long)]
        max_downtime: Option<u64>,
        /// Bandwidth cap in MiB/s.
        #[arg(long)]
        bandwidth: Option<u64>,
        /// Let QEMU throttle the guest so the migration converges.
        #[arg(long)]
        auto_converge: bool,
        /// Switch to post-copy once pre-copy has made one full pass.
        #[arg(long)]
        postcopy: bool,
        /// Abort when not done within this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Copy every writable disk to the destination's own storage during
        /// the migration (NBD mirrors), as `virsh migrate --copy-storage-all`.
        #[arg(long, conflicts_with = "copy_storage_inc")]
        copy_storage_all: bool,
        /// Copy only the top image of each writable disk's qcow2 chain; its
        /// backing files must exist on the destination.
        #[arg(long)]
        copy_storage_inc: bool,
        /// Migrate even though a writable disk is not on storage the
        /// destination shares (as `virsh migrate --unsafe`).
        #[arg(long = "unsafe")]
        allow_unsafe: bool,
    },
    /// Cancel a running migration; the VM keeps running on its source.
    ///
    /// Example: flotilla migrate-abort web01
    MigrateAbort {
        /// The VM's name.
        name: String,
    },
    /// Stop placing VMs on a host and migrate every VM off it.
    ///
    /// Example: flotilla host-drain host-a --parallel 2
    HostDrain {
        /// The host's name, as `flotilla hosts` lists it.
        host: String,
        /// Migrations at once.
        #[arg(long, default_value_t = 2)]
        parallel: u32,
    },
    /// Let the scheduler place VMs on a drained host again.
    ///
    /// Example: flotilla host-undrain host-a
    HostUndrain {
        /// The host's name, as `flotilla hosts` lists it.
        host: String,
    },
    /// Attach to the VM's serial console, as virsh console: what the guest
    /// writes to its first serial port appears here and what you type goes
    /// to it. Ctrl-] detaches.
    ///
    /// Example: flotilla console web01
    Console {
        /// The VM's name.
        name: String,
    },
    /// Show recent fleet events; with --follow, keep streaming them.
    ///
    /// Example: flotilla events --follow
    Events {
        /// Keep streaming new events until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Print a URL that opens the VM's console in a browser, once.
    ///
    /// The URL holds a one-time ticket that expires after 60 s; opening it
    /// gives the browser a 15-minute session for this VM's console, which
    /// follows the VM across live migrations.
    ///
    /// Example: flotilla webconsole web01
    Webconsole {
        /// The VM's name.
        name: String,
    },
    /// Print a URL that opens the fleet page in a browser, once.
    ///
    /// Example: flotilla web-login
    WebLogin,
    /// Why each VM is where it is: the scheduler's last explanation.
    ///
    /// Example: flotilla placements
    Placements,
    /// Turn high availability on or off: an HA VM whose host is cut off is
    /// restarted elsewhere once the host's lease has certainly lapsed.
    ///
    /// Example: flotilla ha web01 on
    Ha {
        /// The VM's name.
        name: String,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Declare a cut-off host fenced (you made sure it is off): its HA VMs
    /// restart elsewhere at once. For hosts that report no working fence.
    ///
    /// Example: flotilla host-fenced host-a
    HostFenced {
        /// The host's name, as `flotilla hosts` lists it.
        host: String,
    },
    /// One VM in detail: state, host, sizes, high availability.
    ///
    /// Example: flotilla dominfo web01
    Dominfo {
        /// The VM's name.
        name: String,
    },
    /// Reset the VM's hardware at once, as the reset button (virsh reset).
    ///
    /// Example: flotilla reboot web01
    Reboot {
        /// The VM's name.
        name: String,
    },
    /// Pause the VM's CPUs; it keeps its memory and host (virsh suspend).
    ///
    /// Example: flotilla suspend web01
    Suspend {
        /// The VM's name.
        name: String,
    },
    /// Resume a suspended VM (virsh resume).
    ///
    /// Example: flotilla resume web01
    Resume {
        /// The VM's name.
        name: String,
    },
    /// List the VM's disks: target and source (virsh domblklist).
    ///
    /// Example: flotilla domblklist web01 --details
    Domblklist {
        /// The VM's name.
        name: String,
        /// Also the disk type and device.
        #[arg(long)]
        details: bool,
    },
    /// The guest's interfaces and addresses, from its guest agent
    /// (virsh domifaddr --source agent; the guest runs qemu-guest-agent).
    ///
    /// Example: flotilla domifaddr web01 --source agent
    Domifaddr {
        /// The VM's name.
        name: String,
        /// Where the addresses come from; only the guest agent is asked.
        #[arg(long, default_value = "agent", value_parser = ["agent"])]
        source: String,
    },
    /// Edit the VM's stored definition in $EDITOR, then validate and store
    /// it as define does (virsh edit). A definition that is refused is kept
    /// in a file whose path is printed, and nothing stored changes.
    ///
    /// Example: EDITOR=nano flotilla edit web01
    Edit {
        /// The VM's name.
        name: String,
    },
    /// Start the VM whenever the coordinator starts and the fleet is up
    /// (virsh autostart); --disable turns it off.
    ///
    /// Example: flotilla autostart web01
    Autostart {
        /// The VM's name.
        name: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// Print a shell completion script.
    ///
    /// Example: flotilla completion bash > /etc/bash_completion.d/flotilla
    Completion {
        /// The shell to print the script for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum Certs {
    /// Create a CA, the coordinator's certificate and an operator certificate.
    ///
    /// Example: flotilla certs init --dir /etc/flotilla/tls
    Init {
        /// The TLS directory to create (`--tls-dir` of every binary).
        #[arg(long)]
        dir: PathBuf,
        /// Name of the first operator certificate.
        #[arg(long, default_value = "admin")]
        operator: String,
        /// Extra DNS names for the coordinator certificate.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Issue a certificate for an agent host, an operator or an etcd member.
    ///
    /// Example: flotilla certs issue --dir /etc/flotilla/tls --agent host-a
    ///          flotilla certs issue --dir /etc/flotilla/tls --etcd node1 --san 10.0.0.1
    Issue {
        /// The TLS directory `certs init` created; it holds the CA key.
        #[arg(long)]
        dir: PathBuf,
        #[arg(
            long,
            conflicts_with_all = ["operator", "etcd"],
            required_unless_present_any = ["operator", "etcd"]
        )]
        /// An agent certificate for this host name.
        agent: Option<String>,
        /// An operator certificate with this name.
        #[arg(long, conflicts_with = "etcd")]
        operator: Option<String>,
        /// An etcd member's certificate (server, peer and client use; the
        /// coordinator on the same node dials etcd with it too).
        #[arg(long, requires = "san")]
        etcd: Option<String>,
        /// The etcd member's addresses or DNS names.
        #[arg(long, requires = "etcd")]
        san: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let request = match cli.command {
        Command::Validate { files } => {
            return Ok(if validate(&files)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Certs(c) => return certs(c).map(|()| ExitCode::SUCCESS),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "flotilla",
                &mut std::io::stdout(),
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Define { file } => OperatorRequest::Define {
            xml: std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?,
            source: file.display().to_string(),
        },
        Command::Undefine { name } => OperatorRequest::Undefine { name },
        Command::List { all } => OperatorRequest::List { all },
        Command::Dumpxml {
            name,
            live,
            security_info,
        } => OperatorRequest::DumpXml {
            name,
            live,
            security_info,
        },
        Command::Domiflist { name } => return domiflist(&cli.conn, name, cli.json),
        Command::Domblklist { name, details } => {
            return domblklist(&cli.conn, name, details, cli.json)
        }
        Command::Edit { name } => return edit(&cli.conn, name),
        Command::Reboot { name } => OperatorRequest::Reboot { name },
        Command::Suspend { name } => OperatorRequest::Suspend { name },
        Command::Resume { name } => OperatorRequest::Resume { name },
        Command::Domifaddr { name, .. } => OperatorRequest::DomIfAddr { name },
        Command::Autostart { name, disable } => {
            OperatorRequest::SetAutostart { name, on: !disable }
        }
        Command::Start { name, host } => OperatorRequest::Start { name, host },
        Command::Shutdown { name, timeout } => OperatorRequest::Shutdown {
            name,
            timeout_secs: timeout,
        },
        Command::Destroy { name } => OperatorRequest::Destroy { name },
        Command::Domdisplay { name } => OperatorRequest::DomDisplay { name },
        Command::Hosts => OperatorRequest::Hosts,
        Command::NetList { host } => OperatorRequest::NetList { host },
        Command::MigrateAbort { name } => OperatorRequest::MigrateAbort { name },
        Command::HostDrain { host, parallel } => OperatorRequest::HostDrain { host, parallel },
        Command::HostUndrain { host } => OperatorRequest::HostUndrain { host },
        Command::Events { follow } => OperatorRequest::Events { follow },
        Command::Console { name } => return console(&cli.conn, name),
        Command::Webconsole { name } => OperatorRequest::WebTicket {
            console: Some(name),
        },
        Command::WebLogin => OperatorRequest::WebTicket { console: None },
        Command::Placements => OperatorRequest::Placements,
        Command::Cluster => OperatorRequest::Cluster,
        Command::Ha { name, state } => OperatorRequest::SetHa {
            name,
            on: state == "on",
        },
        Command::HostFenced { host } => OperatorRequest::HostFenced { host },
        Command::Dominfo { name } => OperatorRequest::DomInfo { name },
        Command::Migrate {
            name,
            to,
            max_downtime,
            bandwidth,
            auto_converge,
            postcopy,
            timeout,
            copy_storage_all,
            copy_storage_inc,
            allow_unsafe,
        } => OperatorRequest::Migrate {
            name,
            to,
            max_downtime_ms: max_downtime,
            bandwidth_mib_s: bandwidth,
            auto_converge,
            postcopy,
            timeout_secs: timeout,
            copy_storage: match (copy_storage_all, copy_storage_inc) {
                (true, _) => Some(CopyMode::All),
                (false, true) => Some(CopyMode::Inc),
                (false, false) => None,
            },
            allow_unsafe,
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = match request {
        OperatorRequest::Migrate { .. }
        | OperatorRequest::HostDrain { .. }
        | OperatorRequest::Events { .. } => rt.block_on(at_the_leader(&cli.conn, |conn| {
            let request = request.clone();
            async move {
                match request {
                    OperatorRequest::Migrate { .. } => migrate(&conn, request, cli.json).await,
                    _ => streamed(&conn, request, cli.json).await,
                }
            }
        }))?,
        _ => rt.block_on(ask(&cli.conn, request))?,
    };
    Ok(print(response, cli.json))
}

/// Runs a streaming request (`call`) against the coordinators, following a
/// follower's "not the leader" to the leader for up to `--retry-secs`. A
/// follower acts on none of these, so sending again is safe.
async fn at_the_leader<F, Fut>(conn: &ConnArgs, call: F) -> anyhow::Result<OperatorResponse>
where
    F: Fn(ConnArgs) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<OperatorResponse>>,
{
    let deadline = std::time::Instant::now()
        + Duration::try_from_secs_f64(conn.retry_secs).unwrap_or_default();
    let mut target = conn.clone();
    loop {
        match call(target.clone()).await? {
            OperatorResponse::Error(OperatorError::NotLeader { leader })
                if std::time::Instant::now() < deadline =>
            {
                target.coordinator = match leader {
                    Some(l) => Some(l),
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        conn.coordinator.clone()
                    }
                };
            }
            r => return Ok(r),
        }
    }
}

/// [`current_xml`], read as a domain.
fn current_domain(
    conn: &ConnArgs,
    name: &str,
) -> anyhow::Result<Result<flotilla_shared::xml::Domain, OperatorResponse>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(match current_xml(&rt, conn, name)? {
        Ok(xml) => Ok(flotilla_shared::xml::Domain::parse("the coordinator's answer", &xml)?.model),
        Err(other) => Err(other),
    })
}

/// The running XML when the VM runs (it names host devices), else the
/// stored definition; `Err` is the answer to print instead.
fn current_xml(
    rt: &tokio::runtime::Runtime,
    conn: &ConnArgs,
    name: &str,
) -> anyhow::Result<Result<String, OperatorResponse>> {
    let live = OperatorRequest::DumpXml {
        name: name.to_string(),
        live: true,
        security_info: false,
    };
    Ok(match rt.block_on(ask(conn, live))? {
        OperatorResponse::Xml(x) => Ok(x),
        OperatorResponse::Error(_) => {
            let stored = OperatorRequest::DumpXml {
                name: name.to_string(),
                live: false,
                security_info: false,
            };
            match rt.block_on(ask(conn, stored))? {
                OperatorResponse::Xml(x) => Ok(x),
                other => Err(other),
            }
        }
        other => Err(other),
    })
}

/// `virsh domblklist [--details]`.
fn domblklist(
    conn: &ConnArgs,
    name: String,
    details: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let domain = match current_domain(conn, &name)? {
        Ok(d) => d,
        Err(other) => return Ok(print(other, json)),
    };
    let rows: Vec<[String; 4]> = domain
        .disks()
        .map(|d| {
            [
                d.disk_type.clone().unwrap_or_else(|| "file".into()),
                d.device.clone().unwrap_or_else(|| "disk".into()),
                d.target_dev.clone().unwrap_or_else(|| "-".into()),
                d.source_path().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|[t, dev, target, source]| {
                serde_json::json!({"type": t, "device": dev, "target": target, "source": source})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if details {
        println!(" {:<6} {:<7} {:<7} Source", "Type", "Device", "Target");
        println!("{}", "-".repeat(60));
        for [t, dev, target, source] in rows {
            println!(" {t:<6} {dev:<7} {target:<7} {source}");
        }
    } else {
        println!(" {:<7} Source", "Target");
        println!("{}", "-".repeat(40));
        for [_, _, target, source] in rows {
            println!(" {target:<7} {source}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `virsh edit`: the stored definition, secrets included, through $EDITOR.
fn edit(conn: &ConnArgs, name: String) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stored = OperatorRequest::DumpXml {
        name: name.clone(),
        live: false,
        security_info: true,
    };
    let before = match rt.block_on(ask(conn, stored))? {
        OperatorResponse::Xml(x) => x,
        other => return Ok(print(other, false)),
    };
    let dir = std::env::temp_dir();
    let file = dir.join(format!("flotilla-edit-{name}-{}.xml", std::process::id()));
    {
        use std::io::Write;
        // The definition may hold console passwords: only this user reads it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        f.write_all(before.as_bytes())?;
    }
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&file)
        .status()
        .with_context(|| format!("cannot run the editor '{editor}'"))?;
    if !status.success() {
        bail!(
            "the editor '{editor}' failed ({status}); nothing changed, your edit is in {}",
            file.display()
        );
    }
    let after = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    if after == before {
        let _ = std::fs::remove_file(&file);
        println!("Domain '{name}' XML configuration not changed.");
        return Ok(ExitCode::SUCCESS);
    }
    let define = OperatorRequest::Define {
        xml: after,
        source: file.display().to_string(),
    };
    match rt.block_on(ask(conn, define))? {
        OperatorResponse::Defined { name, warnings, .. } => {
            let _ = std::fs::remove_file(&file);
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("Domain '{name}' XML configuration edited.");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let code = print(other, false);
            eprintln!(
                "error: the definition was not changed; your edit is kept in {}",
                file.display()
            );
            Ok(code)
        }
    }
}

/// `virsh domiflist`: from the running XML when the VM runs (it names the
/// host devices), else from the stored definition.
fn domiflist(conn: &ConnArgs, name: String, json: bool) -> anyhow::Result<ExitCode> {
    let domain = match current_domain(conn, &name)? {
        Ok(d) => d,
        Err(other) => return Ok(print(other, json)),
    };
    let rows: Vec<[String; 5]> = domain
        .interfaces()
        .map(|i| {
            let source = match i.if_type.as_str() {
                "network" => i.source_network.clone(),
                "bridge" => i.source_bridge.clone(),
                "direct" => i.source_dev.clone(),
                _ => None,
            };
            [
                i.target_dev.clone().unwrap_or_else(|| "-".into()),
                i.if_type.clone(),
                source.unwrap_or_else(|| "-".into()),
                i.model.clone().unwrap_or_else(|| "-".into()),
                i.mac.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|[dev, t, source, model, mac]| {
                serde_json::json!({"interface": dev, "type": t, "source": source, "model": model, "mac": mac})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!(
            " {:<10} {:<9} {:<10} {:<8} MAC",
            "Interface", "Type", "Source", "Model"
        );
        println!("{}", "-".repeat(60));
        for [dev, t, source, model, mac] in rows {
            println!(" {dev:<10} {t:<9} {source:<10} {model:<8} {mac}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(conn: &ConnArgs) -> anyhow::Result<quinn::Connection> {
    let Some(target) = &conn.coordinator else {
        bail!("no coordinator: pass --coordinator HOST:PORT or set FLOTILLA_COORDINATOR");
    };
    let entries: Vec<&str> = target
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        bail!("--coordinator '{target}': no HOST:PORT in it");
    }
    connect_any(conn, &entries).await
}

/// The first of `entries` to complete a handshake.
async fn connect_any(conn: &ConnArgs, entries: &[&str]) -> anyhow::Result<quinn::Connection> {
    let Some(dir) = &conn.tls_dir else {
        bail!("no certificates: pass --tls-dir DIR or set FLOTILLA_TLS_DIR");
    };
    let config = tls::client_config(dir, Role::Operator, &conn.operator)?;
    let timeout = Duration::try_from_secs_f64(conn.connect_timeout_secs)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| {
            format!(
                "--connect-timeout-secs {}: must be a positive number of seconds",
                conn.connect_timeout_secs
            )
        })?;
    match quic::connect_first(entries, config, timeout).await {
        Ok((_, connection)) => Ok(connection),
        Err(failures) => bail!("cannot connect to the coordinator: {}", failures.join("; ")),
    }
}

/// Ctrl-], virsh console's escape: detaches.
const DETACH: u8 = 0x1d;

/// `flotilla console NAME`: the serial console through the coordinator.
fn console(conn: &ConnArgs, name: String) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let connection = rt.block_on(connect(conn))?;
    let (mut send, mut recv) = rt.block_on(connection.open_bi())?;
    rt.block_on(quic::write_frame(
        &mut send,
        &ClientMessage::Operator(OperatorRequest::Console { name: name.clone() }),
    ))?;
    match rt.block_on(quic::read_frame::<ServerMessage>(&mut recv))? {
        ServerMessage::Operator(OperatorResponse::ConsoleAttached { host, device }) => {
            eprintln!("Connected to domain '{name}' on {host} ({device})\r");
            eprintln!("Escape character is ^] (Ctrl + ])\r");
        }
        ServerMessage::Operator(OperatorResponse::Error(OperatorError::NotLeader {
            leader: Some(leader),
        })) if conn.coordinator.as_deref() != Some(leader.as_str()) => {
            // A follower: attach through the leader it names.
            let mut at_leader = conn.clone();
            at_leader.coordinator = Some(leader);
            drop(rt);
            return console(&at_leader, name);
        }
        ServerMessage::Operator(other) => return Ok(print(other, false)),
        other => bail!("unexpected answer {other:?}"),
    }
    // Keystrokes go through as they are typed, like virsh's raw terminal.
    let raw = std::io::stdin()
        .is_terminal()
        .then(RawTerminal::enter)
        .flatten();
    // stdin is read on a thread of its own: a blocking read ends with the
    // process, and the escape is seen before anything after it is sent.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let chunk = &buf[..n];
                    let (data, detach) = match chunk.iter().position(|b| *b == DETACH) {
                        Some(i) => (&chunk[..i], true),
                        None => (chunk, false),
                    };
                    if !data.is_empty() && tx.blocking_send(data.to_vec()).is_err() {
                        return;
                    }
                    if detach {
                        return;
                    }
                }
            }
        }
    });
    let result: anyhow::Result<()> = rt.block_on(async move {
        use std::io::Write;
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                n = recv.read(&mut buf) => match n? {
                    Some(n) => {
                        out.write_all(&buf[..n])?;
                        out.flush()?;
                    }
                    None => return Ok(()),
                },
                chunk = rx.recv() => match chunk {
                    Some(c) => send.write_all(&c).await?,
                    // Detached (or stdin ended): leave the guest running.
                    None => {
                        let _ = send.finish();
                        return Ok(());
                    }
                },
            }
        }
    });
    drop(raw);
    eprintln!();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// The terminal in raw mode (no echo, no line editing, no signals) until
/// dropped, set and restored with stty as the console's user would.
struct RawTerminal(String);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let saved = std::process::Command::new("stty")
            .arg("-g")
            .stdin(std::process::Stdio::inherit())
            .output()
            .ok()?;
        let saved = String::from_utf8(saved.stdout).ok()?.trim().to_string();
        std::process::Command::new("stty")
            .args(["raw", "-echo"])
            .stdin(std::process::Stdio::inherit())
            .status()
            .ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty")
            .arg(&self.0)
            .stdin(std::process::Stdio::inherit())
            .status();
    }
}

/// Sends a request whose answer is preceded by notes, printing them as they come.
async fn streamed(
    conn: &ConnArgs,
    request: OperatorRequest,
    json: bool,
) -> anyhow::Result<OperatorResponse> {
    // Event lines are the output itself; drain notes are commentary on stderr.
    let events = matches!(request, OperatorRequest::Events { .. });
    let connection = connect(conn).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    quic::write_frame(&mut send, &ClientMessage::Operator(request)).await?;
    let _ = send.finish();
    loop {
        match quic::read_frame::<ServerMessage>(&mut recv).await? {
            ServerMessage::Note(line) if events => println!("{line}"),
            ServerMessage::Note(line) if !json => eprintln!("{line}"),
            ServerMessage::Note(_) | ServerMessage::Progress(_) => {}
            ServerMessage::Operator(r) => return Ok(r),
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

/// Sends a migration and renders its progress frames until the outcome arrives.
async fn migrate(
    conn: &ConnArgs,
    request: OperatorRequest,
    json: bool,
) -> anyhow::Result<OperatorResponse> {
    let OperatorRequest::Migrate { name, .. } = &request else {
        bail!("not a migration");
    };
    let name = name.clone();
    let connection = connect(conn).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    quic::write_frame(&mut send, &ClientMessage::Operator(request)).await?;
    let _ = send.finish();
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} migrating [{bar:30}] {percent}% of {total_bytes}, {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut aborting = false;
    let mut last_line: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            frame = quic::read_frame::<ServerMessage>(&mut recv) => match frame? {
                ServerMessage::Progress(p) => {
                    // The bar fills with what has been sent once: resent
                    // dirty pages would push `transferred` past the total.
                    // Disks (a storage copy) and memory fill one bar.
                    let (disk_len, disk_done) = p.disk();
                    bar.set_length(p.total + disk_len);
                    bar.set_position(p.total.saturating_sub(p.remaining) + disk_done);
                    // QEMU has no rate before its first bandwidth sample.
                    let rate = match p.throughput_bps {
                        0 => String::new(),
                        bps => format!(", {}/s", indicatif::HumanBytes(bps)),
                    };
                    let disks = match flotilla_coordinator::events::disk_progress(&p) {
                        d if d.is_empty() => d,
                        d => format!(", disks {d}"),
                    };
                    bar.set_message(format!(
                        "{} sent{rate}, pass {}, expected downtime {} ms{disks}",
                        indicatif::HumanBytes(p.transferred),
                        p.dirty_sync_count,
                        p.expected_downtime_ms
                    ));
                    if !bar.is_hidden() {
                        continue;
                    }
                    // Without a terminal, one line a second is plenty.
                    let due = last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                    if !json && due {
                        last_line = Some(std::time::Instant::now());
                        eprintln!("progress: {}", flotilla_coordinator::events::migration_progress(&p));
                    }
                }
                ServerMessage::Operator(r) => {
                    bar.finish_and_clear();
                    return Ok(r);
                }
                other => bail!("unexpected answer {other:?}"),
            },
            _ = tokio::signal::ctrl_c(), if !aborting => {
                bar.suspend(|| eprint!("\nAbort the migration of '{name}'? The VM stays on its source. [y/N] "));
                let yes = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    tokio::task::spawn_blocking(|| {
                        let mut line = String::new();
                        let _ = std::io::stdin().read_line(&mut line);
                        line.trim().eq_ignore_ascii_case("y")
                    })
                    .await
                    .unwrap_or(false)
                } else {
                    true
                };
                if yes {
                    aborting = true;
                    let r = ask(conn, OperatorRequest::MigrateAbort { name: name.clone() }).await?;
                    bar.suspend(|| eprintln!("{r:?}"));
                }
            }
        }
    }
}

/// Whether sending `request` twice does what sending it once does: only
/// such a request is sent again when its coordinator died before answering
/// (a define of the same XML changes nothing the second time).
fn safe_to_repeat(request: &OperatorRequest) -> bool {
    matches!(
        request,
        OperatorRequest::Define { .. }
            | OperatorRequest::List { .. }
            | OperatorRequest::DumpXml { .. }
            | OperatorRequest::DomInfo { .. }
            | OperatorRequest::DomDisplay { .. }
            | OperatorRequest::Hosts
            | OperatorRequest::NetList { .. }
            | OperatorRequest::Placements
            | OperatorRequest::Cluster
            | OperatorRequest::SetHa { .. }
            | OperatorRequest::SetAutostart { .. }
            | OperatorRequest::HostUndrain { .. }
    )
}

async fn ask(conn: &ConnArgs, request: OperatorRequest) -> anyhow::Result<OperatorResponse> {
    let target = conn.coordinator.clone().unwrap_or_default();
    let retry = Duration::try_from_secs_f64(conn.retry_secs).with_context(|| {
        format!(
            "--retry-secs {}: must be a number of seconds",
            conn.retry_secs
        )
    })?;
    let deadline = std::time::Instant::now() + retry;
    // Where a follower said the leader is.
    let mut leader: Option<String> = None;
    let mut pause = Duration::from_millis(20);
    loop {
        let connection = match &leader {
            Some(l) => match connect_any(conn, &[l.as_str()]).await {
                Ok(c) => c,
                // Named a moment ago and gone now: back to the list.
                Err(_) => connect(conn).await?,
            },
            None => connect(conn).await?,
        };
        let peer = connection.remote_address();
        let message = ClientMessage::Operator(request.clone());
        let reply = tokio::select! {
            r = quic::call::<_, ServerMessage>(&connection, &message, Duration::from_secs(300)) => r,
            () = quic::until_gone(peer) => Err(flotilla_shared::proto::FrameError::Stream(
                format!("coordinator {peer} went away before answering (its port is closed)"),
            )),
        };
        connection.close(0u32.into(), b"done");
        let more_time = std::time::Instant::now() < deadline;
        match reply {
            Ok(ServerMessage::Operator(OperatorResponse::Error(OperatorError::NotLeader {
                leader: named,
            }))) if more_time => {
                if named.is_none() || named == leader {
                    // An election is under way: ask again shortly.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                leader = named;
            }
            Ok(ServerMessage::Operator(r)) => return Ok(r),
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(e) if more_time && safe_to_repeat(&request) => {
                tracing::debug!(error = %e, "coordinator went away before answering; asking again");
                leader = None;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(e).with_context(|| format!("coordinator at {target}")),
        }
    }
}

fn print(response: OperatorResponse, json: bool) -> ExitCode {
    let failed = match &response {
        OperatorResponse::Error(_) => true,
        OperatorResponse::Migrated { outcome, .. } => *outcome != MigrationOutcome::Completed,
        OperatorResponse::Drained { failed, .. } => !failed.is_empty(),
        _ => false,
    };
    if json {
        // `cluster --json`: one object per coordinator, as scripts expect.
        let text = match &response {
            OperatorResponse::Cluster(c) => serde_json::to_string_pretty(&c.coordinators),
            _ => serde_json::to_string_pretty(&response),
        };
        match text {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: {e}"),
        }
        return if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        };
    }
    match response {
        OperatorResponse::Defined {
            name,
            uuid,
            generation,
            warnings,
        } => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("Domain '{name}' defined (uuid {uuid}, generation {generation})");
        }
        OperatorResponse::WebUrl { url, expires_secs } => {
            println!("{url}");
            eprintln!("(opens once, within {expires_secs} s)");
        }
        OperatorResponse::Placements(notes) => {
            for n in notes {
                println!("{:<20} {}", n.name, n.explanation);
            }
        }
        OperatorResponse::Cluster(c) => {
            println!("store: {} (answered by {})", c.store, c.answered_by);
            println!(
                "{:<24} {:<9} {:>10} {:>8}",
                "COORDINATOR", "ROLE", "EPOCH", "PID"
            );
            for k in &c.coordinators {
                let role = if k.leader { "leader" } else { "follower" };
                println!("{:<24} {role:<9} {:>10} {:>8}", k.address, k.epoch, k.pid);
            }
            if !c.members.is_empty() {
                println!();
                println!(
                    "{:<12} {:<18} {:<9} {:<6} CLIENT URLS",
                    "ETCD MEMBER", "ID", "HEALTH", "RAFT"
                );
                for m in &c.members {
                    let health = if m.healthy { "healthy" } else { "down" };
                    let raft = if m.raft_leader { "leader" } else { "" };
                    println!(
                        "{:<12} {:<18} {health:<9} {raft:<6} {}{}",
                        m.name,
                        m.id,
                        m.client_urls.join(","),
                        m.error
                            .as_ref()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        OperatorResponse::Done(m) if m.is_empty() => {}
        OperatorResponse::Done(m) => println!("{m}"),
        OperatorResponse::Vms(vms) => {
            println!(
                "{:<20} {:<10} {:<12} {:>4} {:<3}  UUID",
                "NAME", "STATE", "HOST", "GEN", "HA"
            );
            for v in vms {
                println!(
                    "{:<20} {:<10} {:<12} {:>4} {:<3}  {}",
                    v.name,
                    v.state,
                    v.host.unwrap_or_else(|| "-".into()),
                    v.generation,
                    if v.ha { "on" } else { "off" },
                    v.uuid
                );
            }
        }
        OperatorResponse::DomInfo(d) => {
            let e = d.entry;
            println!("{:<16}{}", "Name:", e.name);
            println!("{:<16}{}", "UUID:", e.uuid);
            println!("{:<16}{}", "State:", e.state);
            println!("{:<16}{}", "Host:", e.host.as_deref().unwrap_or("-"));
            println!("{:<16}{}", "CPU(s):", d.vcpus);
            println!("{:<16}{} KiB", "Max memory:", d.memory_kib);
            println!("{:<16}yes", "Persistent:");
            println!("{:<16}{}", "Generation:", e.generation);
            println!("{:<16}{}", "HA:", if e.ha { "on" } else { "off" });
            println!("{:<16}{}", "Incarnation:", e.incarnation);
            if let Some(why) = e.pending_restart {
                println!("{:<16}{why}", "Restart:");
            }
        }
        OperatorResponse::Xml(x) => print!("{x}"),
        OperatorResponse::GuestInterfaces { interfaces, .. } => {
            print!("{}", flotilla_shared::proto::domifaddr_table(&interfaces));
        }
        OperatorResponse::ConsoleAttached { host, device } => {
            println!("console attached on {host} ({device})");
        }
        OperatorResponse::Started {
            name,
            host,
            consoles,
            explanation,
            warnings,
        } => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("Domain '{name}' started on {host} ({explanation})");
            for c in consoles {
                println!("console: {}", c.uri);
            }
        }
        OperatorResponse::Consoles { consoles, .. } => {
            for c in consoles {
                let note = if c.authenticated {
                    ""
                } else {
                    "  (unauthenticated)"
                };
                println!("{}{note}", c.uri);
            }
        }
        OperatorResponse::Hosts(hosts) => {
            println!(
                "{:<16} {:<12} {:>5} {:>10} {:>4} {:>10} {:>10}  LAST SEEN",
                "NAME", "STATE", "CPUS", "MEMORY", "VMS", "VCPU USED", "MEM USED"
            );
            for h in hosts {
                let seen = if h.last_seen_secs == u64::MAX {
                    "never (since coordinator start)".to_string()
                } else {
                    format!("{}s ago", h.last_seen_secs)
                };
                println!(
                    "{:<16} {:<12} {:>5} {:>7}MiB {:>4} {:>10} {:>7}MiB  {seen}",
                    h.name,
                    h.state,
                    h.cpus,
                    h.memory_mib,
                    h.vms,
                    h.committed_vcpus,
                    h.committed_memory_mib
                );
            }
        }
        OperatorResponse::Networks { networks, .. } => {
            print!("{}", flotilla_shared::proto::net_list_table(&networks));
        }
        OperatorResponse::Migrated {
            name,
            from,
            on,
            outcome,
            elapsed_ms,
            stats,
        } => {
            let figures = stats
                .map(|s| {
                    format!(
                        ", downtime {} ms, {} transferred",
                        s.downtime_ms.unwrap_or(0),
                        indicatif::HumanBytes(s.transferred)
                    )
                })
                .unwrap_or_default();
            if outcome == MigrationOutcome::Completed {
                println!(
                    "Migration of '{name}' from {from} to {on} completed in {:.2}s{figures}",
                    elapsed_ms as f64 / 1000.0
                );
            } else {
                println!("Migration of '{name}' {outcome}; it runs on {on}");
                return ExitCode::from(1);
            }
        }
        OperatorResponse::Drained {
            host,
            moved,
            failed: not_moved,
        } => {
            println!(
                "Host {host} drained: {} VM(s) moved, {} could not move",
                moved.len(),
                not_moved.len()
            );
            for (vm, to) in moved {
                println!("  {vm} -> {to}");
            }
            for (vm, why) in not_moved {
                println!("  {vm}: {why}");
            }
        }
        OperatorResponse::Error(e) => eprintln!("error: {e}"),
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn certs(c: Certs) -> anyhow::Result<()> {
    let written = match c {
        Certs::Init { dir, operator, san } => pki::init(&dir, &operator, &san)?,
        Certs::Issue {
            dir,
            agent: Some(host),
            ..
        } => pki::issue(&dir, Role::Agent, &host, &[])?,
        // Before --operator: the global --operator (default "admin") fills
        // that field whether or not it was given here.
        Certs::Issue {
            dir,
            etcd: Some(name),
            san,
            ..
        } => pki::issue_etcd(&dir, &name, &san)?,
        Certs::Issue {
            dir,
            operator: Some(name),
            ..
        } => pki::issue(&dir, Role::Operator, &name, &[])?,
        Certs::Issue { .. } => {
            bail!("certs issue needs --agent HOST, --operator NAME or --etcd NAME --san ADDR")
        }
    };
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Validates each file and prints its verdict; true when all are valid.
fn validate(files: &[PathBuf]) -> anyhow::Result<bool> {
    let mut all_ok = true;
    for file in files {
        let (ok, lines) = validate_file(file)?;
        all_ok &= ok;
        for line in lines {
            println!("{line}");
        }
    }
    Ok(all_ok)
}

fn validate_file(file: &Path) -> anyhow::Result<(bool, Vec<String>)> {
    let name = file.display().to_string();
    let limit = flotilla_shared::xml::tree::MAX_DOCUMENT_BYTES;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {name}"))?;
    if bytes.len() > limit {
        // Refuse before decoding: the limit exists so we never hold huge inputs.
        return Ok((
            false,
            vec![format!(
                "{name}:1:1: error: /: document is {} bytes, over the limit of {limit}",
                bytes.len()
            )],
        ));
    }
    match String::from_utf8(bytes) {
        Ok(text) => {
            let v = validate_document(&name, &text);
            Ok((v.ok, v.lines))
        }
        Err(e) => Ok((
            false,
            vec![format!("{name}:1:1: error: /: not UTF-8 text: {e}")],
        )),
    }
}
