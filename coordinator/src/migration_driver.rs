//! Drives one [`Migration`] over the source and destination agents.
//!
//! The thin async shell around the pure state machine: it carries out each
//! [`Command`] as an agent request, turns answers and `query-migrate` samples
//! into [`Input`]s, ticks the clock, and relays operator aborts. It decides
//! nothing itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use flotilla_shared::net::quic;
use flotilla_shared::proto::{AgentRequest, AgentResponse, MigrationProgress, OperatorResponse};
use tokio::sync::mpsc;

use crate::migration::{Command, Input, Migration, MigrationParams, MigrationStats, Phase, Report};
use crate::store::Store;

/// How often the source is asked for progress: completion is noticed at most
/// this late, so it bounds the migration's added wall time. One poll is a
/// QUIC round trip and a `query-migrate`, well under a millisecond.
const POLL: Duration = Duration::from_millis(10);
/// Check the destination's liveness every this many polls (200 ms).
const DEST_CHECK_EVERY: u32 = 20;
/// How long one agent request may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything one migration needs.
pub struct MigrationJob {
    /// The VM.
    pub name: String,
    /// Source host.
    pub source: String,
    /// Destination host.
    pub dest: String,
    /// Connection to the source agent.
    pub source_conn: quinn::Connection,
    /// Connection to the destination agent.
    pub dest_conn: quinn::Connection,
    /// The migratable definition (nothing host-specific).
    pub xml: String,
    /// What the operator asked for.
    pub params: MigrationParams,
    /// Where the new placement is recorded.
    pub store: Arc<dyn Store>,
    /// Progress samples for the operator.
    pub progress: mpsc::UnboundedSender<MigrationProgress>,
    /// Abort requests (reason).
    pub aborts: mpsc::UnboundedReceiver<String>,
    /// The destination's consoles, once it is prepared.
    pub dest_consoles: Vec<flotilla_shared::proto::ConsoleInfo>,
}

/// `spice://ADDR:PORT` → (ADDR, PORT); other consoles need no relocation.
fn spice_target(uri: &str) -> Option<(String, u16)> {
    let rest = uri.strip_prefix("spice://")?;
    let (host, port) = rest.rsplit_once(':')?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port.parse().ok()?,
    ))
}

enum Step {
    Do(Command),
    Got(Input),
}

fn stats(p: &MigrationProgress) -> MigrationStats {
    MigrationStats {
        status: p.status.clone(),
        transferred: p.transferred,
        remaining: p.remaining,
        total: p.total,
        throughput_bps: p.throughput_bps,
        dirty_sync_count: p.dirty_sync_count,
        expected_downtime_ms: p.expected_downtime_ms,
        downtime_ms: p.downtime_ms,
    }
}

fn progress(s: &MigrationStats) -> MigrationProgress {
    MigrationProgress {
        status: s.status.clone(),
        transferred: s.transferred,
        remaining: s.remaining,
        total: s.total,
        throughput_bps: s.throughput_bps,
        dirty_sync_count: s.dirty_sync_count,
        expected_downtime_ms: s.expected_downtime_ms,
        downtime_ms: s.downtime_ms,
        total_time_ms: None,
        error: None,
    }
}

async fn call(conn: &quinn::Connection, req: AgentRequest) -> Result<AgentResponse, String> {
    match quic::call::<_, AgentResponse>(conn, &req, AGENT_TIMEOUT).await {
        Ok(AgentResponse::Error(e)) => Err(e),
        Ok(r) => Ok(r),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the job to its end and returns the operator's answer.
pub async fn run(job: MigrationJob) -> OperatorResponse {
    // Instrumented, not entered: a guard across `.await` leaks the span.
    let span = tracing::info_span!("migration", vm = %job.name, from = %job.source, to = %job.dest);
    drive(job).instrument(span).await
}

async fn drive(mut job: MigrationJob) -> OperatorResponse {
    let started = Instant::now();
    let (mut machine, first) = Migration::start(job.params.clone(), started);
    let mut queue: VecDeque<Step> = first.into_iter().map(Step::Do).collect();
    let mut outcome: Option<(Phase, Duration, Option<MigrationStats>)> = None;
    let mut polls: u32 = 0;
    loop {
        while let Some(step) = queue.pop_front() {
            match step {
                Step::Got(input) => queue.extend(
                    machine
                        .handle(input, Instant::now())
                        .into_iter()
                        .map(Step::Do),
                ),
                Step::Do(cmd) => {
                    if let Some(input) = execute(&mut job, cmd, &mut outcome).await {
                        queue.push_back(Step::Got(input));
                    }
                }
            }
        }
        if machine.phase().is_terminal() {
            break;
        }
        // Waiting on QEMU: sample progress, watch for aborts, let time pass.
        tokio::select! {
            reason = job.aborts.recv() => {
                if let Some(reason) = reason {
                    queue.push_back(Step::Got(Input::Abort(reason)));
                }
            }
            _ = tokio::time::sleep(POLL) => {
                if matches!(machine.phase(), Phase::Performing | Phase::Aborting { .. }) {
                    polls = polls.wrapping_add(1);
                    let check_dest = polls.is_multiple_of(DEST_CHECK_EVERY);
                    queue.extend(sample(&job, check_dest).await.into_iter().map(Step::Got));
                }
                queue.push_back(Step::Got(Input::Tick));
            }
        }
    }
    let (phase, elapsed, stats) =
        outcome.unwrap_or((machine.phase().clone(), started.elapsed(), None));
    let (on, word) = match &phase {
        Phase::Completed => (job.dest.clone(), "completed".to_string()),
        Phase::Aborted { reason } => (job.source.clone(), format!("aborted: {reason}")),
        Phase::Failed { reason } => (job.source.clone(), format!("failed: {reason}")),
        other => (job.source.clone(), format!("{other:?}")),
    };
    tracing::info!(outcome = %word, elapsed_ms = elapsed.as_millis() as u64, "migration ended");
    OperatorResponse::Migrated {
        name: job.name.clone(),
        from: job.source.clone(),
        on,
        outcome: word,
        elapsed_ms: elapsed.as_millis() as u64,
        stats: stats.map(|s| progress(&s)),
    }
}

/// One progress sample from the source, and when asked the destination's liveness.
async fn sample(job: &MigrationJob, check_dest: bool) -> Vec<Input> {
    let mut inputs = Vec::new();
    let name = job.name.clone();
    if check_dest {
        let req = AgentRequest::MigrationStatus { name: name.clone() };
        if let Err(e) = call(&job.dest_conn, req).await {
            inputs.push(Input::DestinationLost(e));
        }
    }
    match call(&job.source_conn, AgentRequest::MigrationStatus { name }).await {
        Ok(AgentResponse::Migration(p)) => match p.status.as_str() {
            "completed" => inputs.push(Input::SourceCompleted(stats(&p))),
            "failed" => inputs.push(Input::SourceFailed(
                p.error.clone().unwrap_or_else(|| "failed".into()),
            )),
            "cancelled" => inputs.push(Input::SourceFailed("cancelled".into())),
            _ => inputs.push(Input::Progress(stats(&p))),
        },
        Ok(other) => inputs.push(Input::SourceFailed(format!("unexpected answer {other:?}"))),
        Err(e) => inputs.push(Input::SourceFailed(e)),
    }
    inputs
}

async fn execute(
    job: &mut MigrationJob,
    cmd: Command,
    outcome: &mut Option<(Phase, Duration, Option<MigrationStats>)>,
) -> Option<Input> {
    let name = job.name.clone();
    // Steps go to the log at info (the span names VM, source and destination);
    // per-sample progress is only debug, or it would drown them.
    match &cmd {
        Command::Report(Report::Progress(_)) => tracing::debug!(command = ?cmd, "migration step"),
        _ => tracing::info!(command = ?cmd, "migration step"),
    }
    match cmd {
        Command::PrepareDestination => {
            let req = AgentRequest::MigrateIncoming {
                xml: job.xml.clone(),
                source: format!("migration of '{name}' from {}", job.source),
                postcopy: job.params.postcopy,
            };
            Some(match call(&job.dest_conn, req).await {
                Ok(AgentResponse::Incoming { uri, vm }) => {
                    job.dest_consoles = vm.consoles;
                    Input::Prepared { uri }
                }
                Ok(other) => Input::PrepareFailed(format!("unexpected answer {other:?}")),
                Err(e) => Input::PrepareFailed(e),
            })
        }
        Command::StartMigration { uri, params } => {
            // As libvirt does: SPICE clients learn the destination before switchover.
            for c in &job.dest_consoles {
                if let Some((hostname, port)) = spice_target(&c.uri) {
                    let req = AgentRequest::ClientMigrateInfo {
                        name: name.clone(),
                        hostname,
                        port,
                    };
                    if let Err(e) = call(&job.source_conn, req).await {
                        return Some(Input::SourceFailed(e));
                    }
                }
            }
            let req = AgentRequest::MigrateOut {
                name,
                uri,
                max_downtime_ms: params.max_downtime_ms,
                bandwidth_mib_s: params.bandwidth_mib_s,
                auto_converge: params.auto_converge,
                postcopy: params.postcopy,
            };
            match call(&job.source_conn, req).await {
                Ok(_) => None,
                Err(e) => Some(Input::SourceFailed(e)),
            }
        }
        Command::SwitchToPostcopy => {
            match call(&job.source_conn, AgentRequest::StartPostcopy { name }).await {
                Ok(_) => None,
                Err(e) => Some(Input::SourceFailed(format!("migrate-start-postcopy: {e}"))),
            }
        }
        Command::CancelMigration => {
            if let Err(e) = call(&job.source_conn, AgentRequest::MigrateCancel { name }).await {
                tracing::warn!(error = %e, "migrate_cancel failed");
            }
            None
        }
        Command::FinishDestination => Some(
            match call(&job.dest_conn, AgentRequest::MigrateFinish { name }).await {
                Ok(_) => Input::Finished,
                Err(e) => Input::FinishFailed(e),
            },
        ),
        Command::ResumeSource => {
            if let Err(e) = call(&job.source_conn, AgentRequest::Resume { name }).await {
                tracing::error!(error = %e, "cannot resume the source after a failed finish");
            }
            None
        }
        Command::QuitSource => {
            if let Err(e) = call(&job.source_conn, AgentRequest::Destroy { name }).await {
                tracing::error!(error = %e, "source did not quit after migration");
            }
            Some(Input::SourceQuit)
        }
        Command::DestroyDestination => {
            if let Err(e) = call(&job.dest_conn, AgentRequest::Destroy { name }).await {
                tracing::warn!(error = %e, "destination cleanup");
            }
            None
        }
        Command::RecordPlacement => {
            if let Err(e) = job.store.set_placement(&name, Some(job.dest.clone()), true) {
                tracing::error!(error = %e, "cannot record the new placement");
            }
            Some(Input::Confirmed)
        }
        Command::Report(Report::Progress(s)) => {
            let _ = job.progress.send(progress(&s));
            None
        }
        Command::Report(Report::Postcopy) => None,
        Command::Report(Report::Refused(msg)) => {
            tracing::warn!("{msg}");
            None
        }
        Command::Report(Report::Outcome {
            phase,
            elapsed,
            stats,
        }) => {
            *outcome = Some((phase, elapsed, stats));
            None
        }
    }
}
