//! `VmActor`: one actor per running VM, owning its QEMU process.
//!
//! The actor holds the QMP handle and the pid. A watcher task forwards QMP
//! events to the host actor and, when the QMP connection closes, waits for the
//! process to be gone, flips the `gone` watch and reports [`VmGone`] with the
//! tail of QEMU's log. Shutdown asks the guest (ACPI `system_powerdown`) and
//! escalates to `quit`, then SIGKILL; destroy goes straight to signals.

use std::time::Duration;
use tracing::Instrument as _;

use actix::prelude::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::argv::VmPaths;
use crate::qemu_process::{log_tail, process_matches, signal};
use crate::qmp::{QmpClient, QmpEvent};

/// A QEMU event, forwarded to whoever watches the host.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct VmEvent {
    /// The VM.
    pub name: String,
    /// The QMP event.
    pub event: QmpEvent,
}

/// The VM's QEMU is gone.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct VmGone {
    /// The VM.
    pub name: String,
    /// Its pid.
    pub pid: i32,
    /// Why, as far as the agent knows.
    pub reason: String,
    /// The last lines QEMU wrote to stderr.
    pub log_tail: String,
}

/// Ask the guest to power off; escalate after `timeout`.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, String>")]
pub struct Shutdown {
    /// How long the guest gets before `quit`.
    pub timeout: Duration,
}

/// Kill the VM now.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, String>")]
pub struct Destroy;

/// Ask QEMU for its run state, waiting at most this long.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, String>")]
pub struct QueryStatus(pub Duration);

/// A QEMU process the agent has started or found again, ready to be owned.
#[derive(Debug)]
pub struct QemuProcess {
    /// The VM's name.
    pub name: String,
    /// The VM's UUID (on QEMU's command line).
    pub uuid: String,
    /// QEMU's pid.
    pub pid: i32,
    /// The VM's state files.
    pub paths: VmPaths,
    /// The monitor.
    pub qmp: QmpClient,
    /// Monitor events; closes when QEMU goes away.
    pub events: mpsc::UnboundedReceiver<QmpEvent>,
    /// Present when this agent spawned the process, absent after a re-attach.
    pub child: Option<tokio::process::Child>,
}

/// Run one QMP command and return its `return` value.
#[derive(Debug, Message)]
#[rtype(result = "Result<Value, String>")]
pub struct QmpCall {
    /// The command.
    pub command: &'static str,
    /// Its arguments (`null` for none).
    pub arguments: Value,
}

/// Run a human monitor command and return its output.
#[derive(Debug, Message)]
#[rtype(result = "Result<String, String>")]
pub struct MonitorCommand(pub String);

/// One running VM.
pub struct VmActor {
    name: String,
    pid: i32,
    qmp: QmpClient,
    gone: watch::Receiver<bool>,
}

impl VmActor {
    /// Takes ownership of a started or re-attached QEMU.
    pub fn start(
        process: QemuProcess,
        on_event: Recipient<VmEvent>,
        on_gone: Recipient<VmGone>,
    ) -> Addr<VmActor> {
        let QemuProcess {
            name,
            uuid,
            pid,
            paths,
            qmp,
            mut events,
            child,
        } = process;
        let (gone_tx, gone) = watch::channel(false);
        let watcher_name = name.clone();
        actix::spawn(async move {
            while let Some(event) = events.recv().await {
                on_event.do_send(VmEvent {
                    name: watcher_name.clone(),
                    event,
                });
            }
            let reason = wait_for_exit(pid, &uuid, child).await;
            let _ = gone_tx.send(true);
            on_gone.do_send(VmGone {
                name: watcher_name,
                pid,
                reason,
                log_tail: log_tail(&paths.log(), 10),
            });
        });
        VmActor {
            name,
            pid,
            qmp,
            gone,
        }
        .start()
    }
}

/// Waits until the process is really gone after its QMP connection closed.
async fn wait_for_exit(pid: i32, uuid: &str, child: Option<tokio::process::Child>) -> String {
    if let Some(mut child) = child {
        return match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => format!("QEMU exited ({status})"),
            Ok(Err(e)) => format!("QEMU exited (status unknown: {e})"),
            Err(_) => {
                // The monitor closed but the process lingers: it is unmanageable, end it.
                let _ = child.start_kill();
                let _ = child.wait().await;
                "QEMU closed its monitor and was killed".to_string()
            }
        };
    }
    for _ in 0..1000 {
        if !process_matches(pid, uuid) {
            return "QEMU exited".to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(pid, Signal::SIGKILL);
    "QEMU closed its monitor and was killed".to_string()
}

async fn wait_gone(mut gone: watch::Receiver<bool>, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, gone.wait_for(|g| *g))
        .await
        .is_ok_and(|r| r.is_ok())
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The actor lives exactly as long as its QEMU.
        let gone = self.gone.clone();
        ctx.spawn(
            async move { wait_gone(gone, Duration::MAX).await }
                .into_actor(self)
                .map(|_, _, ctx| ctx.stop()),
        );
    }
}

impl Handler<Shutdown> for VmActor {
    type Result = ResponseFuture<Result<String, String>>;

    fn handle(&mut self, msg: Shutdown, _: &mut Self::Context) -> Self::Result {
        let (qmp, gone, pid, name) = (
            self.qmp.clone(),
            self.gone.clone(),
            self.pid,
            self.name.clone(),
        );
        let cmd_timeout = Duration::from_secs(5);
        let span = tracing::info_span!("shutdown", vm = %name, pid);
        Box::pin(
            async move {
                let _ = qmp
                    .execute("system_powerdown", Value::Null, cmd_timeout)
                    .await;
                if wait_gone(gone.clone(), msg.timeout).await {
                    return Ok(format!(
                        "Domain '{name}' is being shutdown: guest powered off"
                    ));
                }
                tracing::warn!("guest ignored ACPI power-down; escalating to quit");
                let _ = qmp.execute("quit", Value::Null, cmd_timeout).await;
                if wait_gone(gone.clone(), Duration::from_secs(5)).await {
                    return Ok(format!(
                    "Domain '{name}' shut down: guest ignored ACPI power-down for {:?}, QEMU quit",
                    msg.timeout
                ));
                }
                signal(pid, Signal::SIGKILL);
                if wait_gone(gone, Duration::from_secs(5)).await {
                    Ok(format!(
                        "Domain '{name}' shut down: QEMU killed after quit failed"
                    ))
                } else {
                    Err(format!("Domain '{name}': QEMU pid {pid} did not exit"))
                }
            }
            // Instrumented, not entered: a guard across `.await` leaks the span.
            .instrument(span),
        )
    }
}

impl Handler<Destroy> for VmActor {
    type Result = ResponseFuture<Result<String, String>>;

    fn handle(&mut self, _: Destroy, _: &mut Self::Context) -> Self::Result {
        let (gone, pid, name) = (self.gone.clone(), self.pid, self.name.clone());
        Box::pin(async move {
            signal(pid, Signal::SIGTERM);
            if !wait_gone(gone.clone(), Duration::from_secs(3)).await {
                signal(pid, Signal::SIGKILL);
                if !wait_gone(gone, Duration::from_secs(5)).await {
                    return Err(format!("Domain '{name}': QEMU pid {pid} did not exit"));
                }
            }
            Ok(format!("Domain '{name}' destroyed"))
        })
    }
}

impl Handler<QueryStatus> for VmActor {
    type Result = ResponseFuture<Result<String, String>>;

    fn handle(&mut self, QueryStatus(timeout): QueryStatus, _: &mut Self::Context) -> Self::Result {
        let qmp = self.qmp.clone();
        Box::pin(async move { qmp.status(timeout).await.map_err(|e| e.to_string()) })
    }
}

impl Handler<MonitorCommand> for VmActor {
    type Result = ResponseFuture<Result<String, String>>;

    fn handle(
        &mut self,
        MonitorCommand(command): MonitorCommand,
        _: &mut Self::Context,
    ) -> Self::Result {
        let qmp = self.qmp.clone();
        Box::pin(async move {
            let out = qmp
                .execute(
                    "human-monitor-command",
                    serde_json::json!({ "command-line": command }),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(out.as_str().unwrap_or_default().to_string())
        })
    }
}

impl Handler<QmpCall> for VmActor {
    type Result = ResponseFuture<Result<Value, String>>;

    fn handle(&mut self, call: QmpCall, _: &mut Self::Context) -> Self::Result {
        let qmp = self.qmp.clone();
        Box::pin(async move {
            qmp.execute(call.command, call.arguments, Duration::from_secs(10))
                .await
                .map_err(|e| e.to_string())
        })
    }
}
