//! The live-migration state machine: one VM moving from a source host to a
//! destination host, as a cancellable job.
//!
//! Pure and sans-IO, like quinn-proto's `Connection`: the driver feeds it
//! [`Input`]s (agent answers, `query-migrate` progress, an operator's abort,
//! clock ticks with an explicit `now`) and carries out the [`Command`]s it
//! returns. It never sleeps, reads a clock or touches a socket.
//!
//! The invariant it keeps: the guest runs on exactly one host at every
//! moment. The source runs until QEMU reports the migration `completed`; the
//! destination stays paused until the machine tells it to `cont`; only after
//! the destination runs does the source quit. Every failure before that point
//! leaves the guest on the source and removes the destination's QEMU.
//!
//! A storage-copying migration (`--copy-storage-all`/`-inc`) mirrors the
//! disks first, as libvirt does: `Mirroring` waits until every mirror is
//! ready, the memory stream then runs with the source set to pause before
//! switchover, and only once each mirror has concluded in sync does the
//! source switch over. Any end that leaves the guest on the source drops
//! the mirrors there (`CancelMirrors`) before the destination goes.
//!
//! ```text
//! Preparing ──Prepared{nbd}──▶ Mirroring ──Progress(all ready)──▶ Performing
//!    Performing ──Progress(pre-switchover)──▶ CompleteMirrors ──Progress(all concluded)──▶ ContinueSwitchover
//!
//! Preparing ──Prepared──▶ Performing ──SourceCompleted──▶ Finishing ──Finished──▶ Confirming ──▶ Completed
//!     │                      │  ▲ Progress (SwitchToPostcopy once)   │                    (SourceQuit + Confirmed)
//!     │ PrepareFailed        │  │                                    │ FinishFailed
//!     ▼                      ▼  │ Abort / Tick past deadline /       ▼
//!   Failed ◀──SourceFailed── Aborting ◀── DestinationLost          Failed (ResumeSource, DestroyDestination)
//!                            │
//!                            └──SourceFailed──▶ Aborted
//! ```

use std::time::{Duration, Instant};

use flotilla_shared::proto::{CopyMode, MigrationProgress, NbdServer};

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationParams {
    /// Maximum tolerated downtime.
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap.
    pub bandwidth_mib_s: Option<u64>,
    /// Enable QEMU's auto-converge capability.
    pub auto_converge: bool,
    /// Switch to post-copy after the first pre-copy pass.
    pub postcopy: bool,
    /// Abort if not completed in this time.
    pub timeout: Option<Duration>,
    /// Copy the writable disks to the destination.
    pub copy_storage: Option<CopyMode>,
    /// Accept disks the storage safety rules call unsafe.
    pub allow_unsafe: bool,
}

/// Where the job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Destination is starting QEMU with `-incoming defer`.
    Preparing,
    /// The source mirrors its disks into the destination's NBD server; the
    /// memory stream starts once every mirror is ready.
    Mirroring,
    /// Source is sending state.
    Performing,
    /// Source reported completion; destination is being resumed.
    Finishing,
    /// Destination runs; source is quitting and the placement is being recorded.
    Confirming,
    /// Done: the guest runs on the destination only.
    Completed,
    /// The destination could not resume the guest: it is being removed, and
    /// the source resumes only once that is confirmed.
    Reverting {
        /// Why.
        reason: String,
    },
    /// An abort or failure is being undone.
    Aborting {
        /// Why.
        reason: String,
    },
    /// Cancelled: the guest runs on the source.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Failed: the guest runs on the source.
    Failed {
        /// Why.
        reason: String,
    },
    /// The destination was lost while resuming the guest: its state is there
    /// and the source stays paused, so the guest belongs to the destination,
    /// which runs it or holds it paused until it reports again.
    InDoubt {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// True once nothing more will happen.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::Aborted { .. } | Phase::Failed { .. } | Phase::InDoubt { .. }
        )
    }

    /// True when the guest ended on the destination (or belongs to it).
    pub fn on_destination(&self) -> bool {
        matches!(self, Phase::Completed | Phase::InDoubt { .. })
    }
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The destination's QEMU listens for the stream at `uri`.
    Prepared {
        /// e.g. `tcp:198.18.2.1:49152`.
        uri: String,
        /// Where copied disks go, when the destination serves them.
        nbd: Option<NbdServer>,
    },
    /// The source started its disk mirrors.
    MirrorsStarted,
    /// A step of the disk mirrors failed on the source.
    MirrorFailed(String),
    /// The destination could not prepare.
    PrepareFailed(String),
    /// A progress sample from the source.
    Progress(MigrationProgress),
    /// The source's QEMU reports `completed`.
    SourceCompleted(MigrationProgress),
    /// The source's migration failed or was cancelled; the source resumed.
    SourceFailed(String),
    /// The destination runs and its console answers.
    Finished,
    /// The destination could not be resumed.
    FinishFailed(String),
    /// The destination was lost while resuming: it may run the guest.
    FinishUnknown(String),
    /// The destination's QEMU died.
    DestinationLost(String),
    /// The source's QEMU is gone (expected after completion).
    SourceQuit,
    /// The new placement is recorded.
    Confirmed,
    /// The new placement could not be written.
    RecordFailed(String),
    /// The destination's QEMU is gone (removed, or was never there).
    DestinationDestroyed,
    /// Removing the destination got no answer: it may still run the guest.
    DestroyUnknown(String),
    /// An operator cancelled the job.
    Abort(String),
    /// Time passes (timeouts).
    Tick,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start the destination QEMU with `-incoming defer` from the migratable XML.
    PrepareDestination,
    /// Set capabilities and parameters, then `migrate` on the source.
    StartMigration {
        /// Where to send.
        uri: String,
        /// How.
        params: MigrationParams,
    },
    /// Mirror the source's writable disks into `nbd`.
    StartMirrors {
        /// The destination's NBD server.
        nbd: NbdServer,
    },
    /// The source paused before switchover: finish every ready mirror.
    CompleteMirrors,
    /// Every mirror concluded in sync: let the source switch over.
    ContinueSwitchover,
    /// Drop the source's mirrors; its own disks stay as they are.
    CancelMirrors,
    /// `migrate-start-postcopy` on the source.
    SwitchToPostcopy,
    /// `migrate_cancel` on the source.
    CancelMigration,
    /// `cont` the destination and confirm its console.
    FinishDestination,
    /// `cont` the source again (its migration completed but the destination failed).
    ResumeSource,
    /// `quit` the source QEMU.
    QuitSource,
    /// Kill the destination QEMU and free its ports.
    DestroyDestination,
    /// Record that the VM now runs on the destination.
    RecordPlacement,
    /// Tell the operator.
    Report(Report),
}

/// How the agent request that carried out a [`Command`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepFailure {
    /// The agent answered with an error: the step did not happen.
    Refused(String),
    /// No answer (connection lost, timeout): the step may or may not have happened.
    Lost(String),
}

impl StepFailure {
    fn text(&self) -> String {
        match self {
            StepFailure::Refused(e) => e.clone(),
            StepFailure::Lost(e) => format!("no answer: {e}"),
        }
    }
}

impl Command {
    /// The input a failure of this command's agent request means, if any.
    ///
    /// Owned here, not by the driver: whether a lost answer may have done the
    /// step decides between resuming the source and leaving the guest to the
    /// destination.
    pub fn failure_input(&self, failure: StepFailure) -> Option<Input> {
        let e = failure.text();
        match self {
            Command::PrepareDestination => Some(Input::PrepareFailed(e)),
            Command::StartMirrors { .. } => Some(Input::MirrorFailed(e)),
            // A refused completion leaves the source paused before
            // switchover; a lost one is told apart by the next poll.
            Command::CompleteMirrors => match failure {
                StepFailure::Refused(_) => Some(Input::MirrorFailed(e)),
                StepFailure::Lost(_) => None,
            },
            Command::StartMigration { .. } => Some(Input::SourceFailed(e)),
            Command::SwitchToPostcopy => {
                Some(Input::SourceFailed(format!("migrate-start-postcopy: {e}")))
            }
            Command::FinishDestination => Some(match failure {
                StepFailure::Refused(_) => Input::FinishFailed(e),
                StepFailure::Lost(_) => Input::FinishUnknown(e),
            }),
            // The source's QEMU completed its migration, so it cannot run the
            // guest again unless told to `cont`; whether `quit` reached it or
            // not, the guest runs on the destination only. A source that
            // comes back holding the paused copy has it removed as stale.
            Command::QuitSource => Some(Input::SourceQuit),
            Command::DestroyDestination => Some(match failure {
                // "Not running" is what a refused destroy means.
                StepFailure::Refused(_) => Input::DestinationDestroyed,
                StepFailure::Lost(_) => Input::DestroyUnknown(e),
            }),
            Command::RecordPlacement => Some(Input::RecordFailed(e)),
            // Polls tell: a cancel that did not arrive leaves the migration to
            // complete or fail on its own, a failed resume leaves the source
            // paused, a failed clean-up leaves a paused copy that
            // reconciliation removes as stale.
            Command::CancelMigration
            | Command::ResumeSource
            | Command::ContinueSwitchover
            | Command::CancelMirrors
            | Command::Report(_) => None,
        }
    }
}

/// The reason a storage copy failed on the source.
fn copy_failed(e: &str) -> String {
    format!("copying the disks failed on the source: {e}")
}

/// The first mirror that reports an error, as `disk vda: …`.
fn mirror_error(s: &MigrationProgress) -> Option<String> {
    s.mirrors
        .iter()
        .find_map(|m| m.error.as_ref().map(|e| format!("disk {}: {e}", m.target)))
}

/// What the operator sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A progress sample.
    Progress(MigrationProgress),
    /// The job switched to post-copy.
    Postcopy,
    /// The job ended.
    Outcome {
        /// The final phase.
        phase: Phase,
        /// Wall time from start to end.
        elapsed: Duration,
        /// Final statistics, if the source got that far.
        stats: Option<MigrationProgress>,
    },
    /// A request that could not be honoured now.
    Refused(String),
}

/// One VM's migration job.
#[derive(Debug, Clone)]
pub struct Migration {
    params: MigrationParams,
    phase: Phase,
    started: Instant,
    postcopy_active: bool,
    /// The source reported `completed`: the destination holds the guest.
    source_completed: bool,
    source_done: bool,
    placement_recorded: bool,
    last_stats: Option<MigrationProgress>,
    /// Where the memory stream goes once the mirrors are ready.
    uri: Option<String>,
    /// Mirrors were asked for on the source: an end on the source drops them.
    mirrors_started: bool,
    /// `CompleteMirrors` was sent for this pause before switchover.
    mirrors_completing: bool,
    /// `ContinueSwitchover` was sent.
    switchover_continued: bool,
}

impl Migration {
    /// Starts a job at `now`; returns it with its first commands.
    pub fn start(params: MigrationParams, now: Instant) -> (Migration, Vec<Command>) {
        let m = Migration {
            params,
            phase: Phase::Preparing,
            started: now,
            postcopy_active: false,
            source_completed: false,
            source_done: false,
            placement_recorded: false,
            last_stats: None,
            uri: None,
            mirrors_started: false,
            mirrors_completing: false,
            switchover_continued: false,
        };
        (m, vec![Command::PrepareDestination])
    }

    /// Takes over a switchover a previous coordinator left half done: the
    /// source reports `postmigrate` and the destination holds the received
    /// guest paused. The job starts at `Finishing`, so the destination is
    /// resumed and the source quits only after it runs, or, if the
    /// destination refuses, the source resumes.
    pub fn resume_switchover(now: Instant) -> (Migration, Vec<Command>) {
        let m = Migration {
            params: MigrationParams::default(),
            phase: Phase::Finishing,
            started: now,
            postcopy_active: false,
            source_completed: true,
            source_done: false,
            placement_recorded: false,
            last_stats: None,
            uri: None,
            mirrors_started: false,
            mirrors_completing: false,
            switchover_continued: false,
        };
        (m, vec![Command::FinishDestination])
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The destination got the whole guest at some point (the source
    /// completed, or post-copy began): it may hold a copy that can run.
    pub fn reached_switchover(&self) -> bool {
        self.source_completed || self.postcopy_active
    }

    /// The newest statistics.
    pub fn stats(&self) -> Option<&MigrationProgress> {
        self.last_stats.as_ref()
    }

    fn end(&mut self, phase: Phase, now: Instant, mut cmds: Vec<Command>) -> Vec<Command> {
        if self.mirrors_started && !phase.on_destination() {
            // The guest stays on its own disks: the mirrors go first, so
            // nothing writes to the destination's NBD server when it goes.
            cmds.insert(0, Command::CancelMirrors);
        }
        self.phase = phase.clone();
        cmds.push(Command::Report(Report::Outcome {
            phase,
            elapsed: now.duration_since(self.started),
            stats: self.last_stats.clone(),
        }));
        cmds
    }

    fn abort(&mut self, reason: String, now: Instant) -> Vec<Command> {
        match &self.phase {
            Phase::Preparing | Phase::Mirroring => self.end(
                Phase::Aborted { reason },
                now,
                vec![Command::DestroyDestination],
            ),
            Phase::Performing if self.postcopy_active => vec![Command::Report(Report::Refused(
                format!("cannot abort ({reason}): the guest already runs on the destination in post-copy"),
            ))],
            Phase::Performing => {
                self.phase = Phase::Aborting { reason };
                vec![Command::CancelMigration]
            }
            Phase::Finishing | Phase::Confirming => vec![Command::Report(Report::Refused(format!(
                "cannot abort ({reason}): the migration already completed"
            )))],
            _ => Vec::new(),
        }
    }

    /// Feeds one input at `now`; returns what to do.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Command> {
        if self.phase.is_terminal() {
            return Vec::new();
        }
        let timed_out = self
            .params
            .timeout
            .is_some_and(|t| now.duration_since(self.started) >= t);
        match (self.phase.clone(), input) {
            (Phase::Preparing | Phase::Mirroring | Phase::Performing, Input::Tick) if timed_out => {
                let t = self.params.timeout.unwrap_or_default();
                self.abort(format!("timed out after {}s", t.as_secs()), now)
            }
            (_, Input::Tick) => Vec::new(),
            (_, Input::Abort(reason)) => self.abort(reason, now),

            (Phase::Preparing, Input::Prepared { uri, nbd }) => match nbd {
                Some(nbd) if self.params.copy_storage.is_some() => {
                    self.phase = Phase::Mirroring;
                    self.uri = Some(uri);
                    self.mirrors_started = true;
                    vec![Command::StartMirrors { nbd }]
                }
                // Nothing to copy (no writable disk): memory only.
                _ => {
                    self.phase = Phase::Performing;
                    vec![Command::StartMigration {
                        uri,
                        params: self.params.clone(),
                    }]
                }
            },
            (Phase::Mirroring, Input::MirrorsStarted) => Vec::new(),
            (Phase::Mirroring, Input::MirrorFailed(e)) => self.end(
                Phase::Failed {
                    reason: copy_failed(&e),
                },
                now,
                vec![Command::DestroyDestination],
            ),
            (Phase::Mirroring, Input::Progress(s)) => {
                let mut cmds = vec![Command::Report(Report::Progress(s.clone()))];
                let failed = mirror_error(&s).or_else(|| {
                    s.mirrors
                        .iter()
                        .find(|m| !m.ready && m.status == "concluded")
                        .map(|m| {
                            format!(
                                "disk {}: the mirror stopped before it was in sync",
                                m.target
                            )
                        })
                });
                let all_ready = !s.mirrors.is_empty() && s.mirrors.iter().all(|m| m.ready);
                self.last_stats = Some(s);
                if let Some(e) = failed {
                    cmds.extend(self.end(
                        Phase::Failed {
                            reason: copy_failed(&e),
                        },
                        now,
                        vec![Command::DestroyDestination],
                    ));
                    return cmds;
                }
                if all_ready {
                    self.phase = Phase::Performing;
                    cmds.push(Command::StartMigration {
                        uri: self.uri.take().unwrap_or_default(),
                        params: self.params.clone(),
                    });
                }
                cmds
            }
            (Phase::Mirroring, Input::DestinationLost(e)) => self.end(
                Phase::Failed {
                    reason: format!("destination QEMU died while receiving the disks: {e}"),
                },
                now,
                vec![Command::DestroyDestination],
            ),
            (Phase::Mirroring, Input::SourceFailed(e)) => self.end(
                Phase::Failed {
                    reason: format!("migration failed on the source: {e}"),
                },
                now,
                vec![Command::DestroyDestination],
            ),
            (Phase::Performing, Input::MirrorFailed(e)) => {
                self.phase = Phase::Aborting {
                    reason: copy_failed(&e),
                };
                vec![Command::CancelMigration]
            }
            (Phase::Preparing, Input::PrepareFailed(e)) => self.end(
                Phase::Failed {
                    reason: format!("destination refused: {e}"),
                },
                now,
                Vec::new(),
            ),
            (Phase::Preparing, Input::DestinationLost(e)) => self.end(
                Phase::Failed {
                    reason: format!("destination QEMU died while preparing: {e}"),
                },
                now,
                vec![Command::DestroyDestination],
            ),

            (Phase::Performing, Input::Progress(s)) if s.status == "pre-switchover" => {
                // Paused before switchover (only storage copies ask for it):
                // the mirrors finish now, with the guest stopped, and the
                // source switches over only once each concluded in sync.
                let mut cmds = vec![Command::Report(Report::Progress(s.clone()))];
                let failed = mirror_error(&s);
                let concluded = s.mirrors.iter().all(|m| m.status == "concluded");
                self.last_stats = Some(s);
                if let Some(e) = failed {
                    self.phase = Phase::Aborting {
                        reason: copy_failed(&e),
                    };
                    cmds.push(Command::CancelMigration);
                } else if !self.mirrors_completing {
                    self.mirrors_completing = true;
                    cmds.push(Command::CompleteMirrors);
                } else if concluded && !self.switchover_continued {
                    self.switchover_continued = true;
                    cmds.push(Command::ContinueSwitchover);
                }
                cmds
            }
            (Phase::Performing | Phase::Aborting { .. }, Input::Progress(s)) => {
                let mut cmds = vec![Command::Report(Report::Progress(s.clone()))];
                let first_pass_done = s.dirty_sync_count >= 1;
                if self.phase == Phase::Performing
                    && self.params.postcopy
                    && !self.postcopy_active
                    && first_pass_done
                {
                    self.postcopy_active = true;
                    cmds.push(Command::SwitchToPostcopy);
                    cmds.push(Command::Report(Report::Postcopy));
                }
                self.last_stats = Some(s);
                cmds
            }
            (Phase::Performing | Phase::Aborting { .. }, Input::SourceCompleted(s)) => {
                // Completion wins over a late abort: the state is already across.
                self.last_stats = Some(s);
                self.source_completed = true;
                self.phase = Phase::Finishing;
                vec![Command::FinishDestination]
            }
            // In post-copy the guest already runs on the destination: a source
            // that failed (or a poll that got no answer) must not cost it its
            // only running copy.
            (Phase::Performing, Input::SourceFailed(e)) if self.postcopy_active => self.end(
                Phase::InDoubt {
                    reason: format!(
                        "the source failed during post-copy ({e}); the guest runs on the \
                         destination"
                    ),
                },
                now,
                Vec::new(),
            ),
            (Phase::Performing, Input::SourceFailed(e)) => self.end(
                Phase::Failed {
                    reason: format!("migration failed on the source: {e}"),
                },
                now,
                vec![Command::DestroyDestination],
            ),
            (Phase::Aborting { reason }, Input::SourceFailed(_)) => self.end(
                Phase::Aborted { reason },
                now,
                vec![Command::DestroyDestination],
            ),
            (Phase::Performing, Input::DestinationLost(e)) if !self.postcopy_active => {
                self.phase = Phase::Aborting {
                    reason: format!("destination QEMU died: {e}"),
                };
                vec![Command::CancelMigration]
            }
            (Phase::Performing, Input::DestinationLost(e)) => self.end(
                Phase::Failed {
                    reason: format!(
                        "destination QEMU died during post-copy: {e}; the guest is lost and \
                         must be restarted from its disks"
                    ),
                },
                now,
                vec![Command::QuitSource],
            ),

            (Phase::Finishing, Input::Finished) => {
                self.phase = Phase::Confirming;
                vec![Command::QuitSource, Command::RecordPlacement]
            }
            // A lost destination poll says nothing here: the resume may
            // already have run the guest there, so only the answer to the
            // resume itself decides between the two hosts.
            (Phase::Finishing, Input::FinishFailed(e)) => {
                if self.postcopy_active {
                    return self.end(
                        Phase::Failed {
                            reason: format!("destination failed after post-copy: {e}"),
                        },
                        now,
                        vec![Command::DestroyDestination],
                    );
                }
                // The resume may have half-happened (it ran, then the console
                // check failed): the destination goes first, and the source
                // resumes only once it is gone.
                self.phase = Phase::Reverting {
                    reason: format!("destination could not resume the guest: {e}"),
                };
                vec![Command::DestroyDestination]
            }
            (Phase::Reverting { reason }, Input::DestinationDestroyed) => {
                self.end(Phase::Failed { reason }, now, vec![Command::ResumeSource])
            }
            (Phase::Reverting { reason }, Input::DestroyUnknown(e)) => self.end(
                Phase::InDoubt {
                    reason: format!(
                        "{reason}; removing the destination got no answer ({e}), so the source \
                         stays paused until the destination reports"
                    ),
                },
                now,
                Vec::new(),
            ),

            (Phase::Finishing, Input::FinishUnknown(e)) => self.end(
                Phase::InDoubt {
                    reason: format!(
                        "destination lost while resuming the guest ({e}); the source stays \
                         paused and the guest belongs to the destination"
                    ),
                },
                now,
                Vec::new(),
            ),

            (Phase::Confirming, Input::RecordFailed(e)) => {
                self.placement_recorded = true;
                let mut cmds = vec![Command::Report(Report::Refused(format!(
                    "the new placement was not recorded ({e}); the destination's next report \
                     records it"
                )))];
                cmds.extend(self.maybe_complete(now));
                cmds
            }
            (Phase::Confirming, Input::SourceQuit) => {
                self.source_done = true;
                self.maybe_complete(now)
            }
            (Phase::Confirming, Input::Confirmed) => {
                self.placement_recorded = true;
                self.maybe_complete(now)
            }

            // Anything else is out of order for this phase; ignoring it is safe
            // because each phase waits only for the inputs listed above.
            _ => Vec::new(),
        }
    }

    fn maybe_complete(&mut self, now: Instant) -> Vec<Command> {
        if self.source_done && self.placement_recorded {
            self.end(Phase::Completed, now, Vec::new())
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::proto::MirrorProgress;

    fn stats(sync: u64) -> MigrationProgress {
        MigrationProgress {
            transferred: 1000,
            remaining: 10,
            total: 64 << 20,
            dirty_sync_count: sync,
            ..Default::default()
        }
    }

    fn prepared(params: MigrationParams) -> (Migration, Instant) {
        let t0 = Instant::now();
        let (mut m, cmds) = Migration::start(params.clone(), t0);
        assert_eq!(cmds, vec![Command::PrepareDestination]);
        let cmds = m.handle(
            Input::Prepared {
                uri: "tcp:198.18.2.1:49152".into(),
                nbd: None,
            },
            t0,
        );
        assert_eq!(
            cmds,
            vec![Command::StartMigration {
                uri: "tcp:198.18.2.1:49152".into(),
                params
            }]
        );
        assert_eq!(m.phase(), &Phase::Performing);
        (m, t0)
    }

    fn outcome(cmds: &[Command]) -> Option<&Phase> {
        cmds.iter().find_map(|c| match c {
            Command::Report(Report::Outcome { phase, .. }) => Some(phase),
            _ => None,
        })
    }

    #[test]
    fn happy_path_quits_the_source_only_after_the_destination_runs() {
        let (mut m, t0) = prepared(MigrationParams::default());
        assert_eq!(
            m.handle(Input::Progress(stats(0)), t0),
            vec![Command::Report(Report::Progress(stats(0)))]
        );
        assert_eq!(
            m.handle(Input::SourceCompleted(stats(2)), t0),
            vec![Command::FinishDestination]
        );
        assert_eq!(m.phase(), &Phase::Finishing);
        assert_eq!(
            m.handle(Input::Finished, t0),
            vec![Command::QuitSource, Command::RecordPlacement]
        );
        assert!(
            m.handle(Input::Confirmed, t0).is_empty(),
            "waits for the source to be gone too"
        );
        let cmds = m.handle(Input::SourceQuit, t0 + Duration::from_secs(3));
        assert_eq!(outcome(&cmds), Some(&Phase::Completed));
        assert!(
            m.handle(Input::Abort("late".into()), t0).is_empty(),
            "terminal"
        );
    }

    #[test]
    fn destination_refusal_touches_nothing() {
        let t0 = Instant::now();
        let (mut m, _) = Migration::start(MigrationParams::default(), t0);
        let cmds = m.handle(Input::PrepareFailed("disk /x missing".into()), t0);
        assert_eq!(cmds.len(), 1, "only the report: {cmds:?}");
        assert_eq!(
            m.phase(),
            &Phase::Failed {
                reason: "destination refused: disk /x missing".into()
            }
        );
    }

    #[test]
    fn abort_while_preparing_removes_the_destination() {
        let t0 = Instant::now();
        let (mut m, _) = Migration::start(MigrationParams::default(), t0);
        let cmds = m.handle(Input::Abort("operator".into()), t0);
        assert_eq!(cmds[0], Command::DestroyDestination);
        assert_eq!(
            outcome(&cmds),
            Some(&Phase::Aborted {
                reason: "operator".into()
            })
        );
    }

    #[test]
    fn abort_while_performing_cancels_then_cleans_up() {
        let (mut m, t0) = prepared(MigrationParams::default());
        assert_eq!(
            m.handle(Input::Abort("ctrl-c".into()), t0),
            vec![Command::CancelMigration]
        );
        assert_eq!(
            m.phase(),
            &Phase::Aborting {
                reason: "ctrl-c".into()
            }
        );
        let cmds = m.handle(Input::SourceFailed("cancelled".into()), t0);
        assert_eq!(cmds[0], Command::DestroyDestination);
        assert_eq!(
            outcome(&cmds),
            Some(&Phase::Aborted {
                reason: "ctrl-c".into()
            })
        );
    }

    #[test]
    fn completion_racing_an_abort_still_finishes() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::Abort("ctrl-c".into()), t0);
        assert_eq!(
            m.handle(Input::SourceCompleted(stats(1)), t0),
            vec![Command::FinishDestination]
        );
    }

    #[test]
    fn timeout_aborts_like_an_operator() {
        let params = MigrationParams {
            timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let (mut m, t0) = prepared(params);
        assert!(m
            .handle(Input::Tick, t0 + Duration::from_secs(4))
            .is_empty());
        assert_eq!(
            m.handle(Input::Tick, t0 + Duration::from_secs(5)),
            vec![Command::CancelMigration]
        );
        assert_eq!(
            m.phase(),
            &Phase::Aborting {
                reason: "timed out after 5s".into()
            }
        );
    }

    #[test]
    fn source_failure_keeps_the_guest_on_the_source() {
        let (mut m, t0) = prepared(MigrationParams::default());
        let cmds = m.handle(Input::SourceFailed("connection reset".into()), t0);
        assert_eq!(cmds[0], Command::DestroyDestination);
        assert!(!cmds.contains(&Command::QuitSource));
        assert!(matches!(m.phase(), Phase::Failed { .. }));
    }

    #[test]
    fn destination_death_mid_migration_cancels_on_the_source() {
        let (mut m, t0) = prepared(MigrationParams::default());
        assert_eq!(
            m.handle(Input::DestinationLost("killed".into()), t0),
            vec![Command::CancelMigration]
        );
        let cmds = m.handle(Input::SourceFailed("broken pipe".into()), t0);
        assert_eq!(
            outcome(&cmds),
            Some(&Phase::Aborted {
                reason: "destination QEMU died: killed".into()
            })
        );
    }

    #[test]
    fn failed_resume_on_the_destination_resumes_the_source() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::SourceCompleted(stats(1)), t0);
        let cmds = m.handle(Input::FinishFailed("console did not answer".into()), t0);
        assert_eq!(cmds, vec![Command::DestroyDestination]);
        let cmds = m.handle(Input::DestinationDestroyed, t0);
        assert_eq!(cmds[0], Command::ResumeSource);
        assert!(matches!(m.phase(), Phase::Failed { .. }));
    }

    #[test]
    fn an_unconfirmed_removal_of_the_destination_keeps_the_source_paused() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::SourceCompleted(stats(1)), t0);
        m.handle(Input::FinishFailed("console did not answer".into()), t0);
        let input = Command::DestroyDestination
            .failure_input(StepFailure::Lost("timeout".into()))
            .expect("an input");
        let cmds = m.handle(input, t0);
        assert!(!cmds.contains(&Command::ResumeSource), "{cmds:?}");
        assert!(matches!(outcome(&cmds), Some(Phase::InDoubt { .. })));
    }

    #[test]
    fn postcopy_switches_once_after_the_first_pass_and_then_refuses_abort() {
        let params = MigrationParams {
            postcopy: true,
            ..Default::default()
        };
        let (mut m, t0) = prepared(params);
        assert!(!m
            .handle(Input::Progress(stats(0)), t0)
            .contains(&Command::SwitchToPostcopy));
        let cmds = m.handle(Input::Progress(stats(1)), t0);
        assert!(cmds.contains(&Command::SwitchToPostcopy));
        assert!(!m
            .handle(Input::Progress(stats(2)), t0)
            .contains(&Command::SwitchToPostcopy));
        let cmds = m.handle(Input::Abort("ctrl-c".into()), t0);
        assert!(matches!(cmds[0], Command::Report(Report::Refused(_))));
        assert_eq!(m.phase(), &Phase::Performing);
    }

    #[test]
    fn abort_after_completion_is_refused() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::SourceCompleted(stats(1)), t0);
        let cmds = m.handle(Input::Abort("ctrl-c".into()), t0);
        assert!(matches!(cmds[0], Command::Report(Report::Refused(_))));
        assert_eq!(m.phase(), &Phase::Finishing);
    }

    #[test]
    fn out_of_order_inputs_are_ignored() {
        let t0 = Instant::now();
        let (mut m, _) = Migration::start(MigrationParams::default(), t0);
        assert!(m.handle(Input::Finished, t0).is_empty());
        assert!(m.handle(Input::SourceCompleted(stats(1)), t0).is_empty());
        assert_eq!(m.phase(), &Phase::Preparing);
    }

    #[test]
    fn a_lost_answer_to_finish_leaves_the_guest_to_the_destination() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::SourceCompleted(stats(1)), t0);
        let input = Command::FinishDestination
            .failure_input(StepFailure::Lost("connection lost".into()))
            .expect("an input");
        assert_eq!(
            input,
            Input::FinishUnknown("no answer: connection lost".into())
        );
        let cmds = m.handle(input, t0);
        // Neither resumes the source nor destroys the destination.
        assert!(!cmds.contains(&Command::ResumeSource), "{cmds:?}");
        assert!(!cmds.contains(&Command::DestroyDestination), "{cmds:?}");
        assert!(
            matches!(outcome(&cmds), Some(Phase::InDoubt { .. })),
            "{cmds:?}"
        );
        assert!(m.phase().on_destination());
    }

    #[test]
    fn failures_map_to_inputs_by_step() {
        let refused = |c: Command| c.failure_input(StepFailure::Refused("no".into()));
        assert_eq!(
            refused(Command::PrepareDestination),
            Some(Input::PrepareFailed("no".into()))
        );
        assert_eq!(
            refused(Command::FinishDestination),
            Some(Input::FinishFailed("no".into()))
        );
        assert_eq!(
            refused(Command::SwitchToPostcopy),
            Some(Input::SourceFailed("migrate-start-postcopy: no".into()))
        );
        assert_eq!(refused(Command::QuitSource), Some(Input::SourceQuit));
        assert_eq!(
            refused(Command::RecordPlacement),
            Some(Input::RecordFailed("no".into()))
        );
        assert_eq!(refused(Command::CancelMigration), None);
        assert_eq!(refused(Command::ResumeSource), None);
        assert_eq!(
            refused(Command::DestroyDestination),
            Some(Input::DestinationDestroyed)
        );
    }

    #[test]
    fn a_failed_placement_write_still_completes_and_says_so() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::SourceCompleted(stats(1)), t0);
        m.handle(Input::Finished, t0);
        let cmds = m.handle(Input::RecordFailed("disk full".into()), t0);
        assert!(
            matches!(&cmds[0], Command::Report(Report::Refused(t)) if t.contains("disk full")),
            "{cmds:?}"
        );
        let cmds = m.handle(Input::SourceQuit, t0);
        assert_eq!(outcome(&cmds), Some(&Phase::Completed));
    }

    #[test]
    fn a_taken_over_switchover_finishes_or_falls_back_to_the_source() {
        let t0 = Instant::now();
        let (mut m, cmds) = Migration::resume_switchover(t0);
        assert_eq!(cmds, vec![Command::FinishDestination]);
        assert_eq!(
            m.handle(Input::Finished, t0),
            vec![Command::QuitSource, Command::RecordPlacement]
        );
        let (mut m, _) = Migration::resume_switchover(t0);
        let cmds = m.handle(Input::FinishFailed("no such VM".into()), t0);
        assert_eq!(cmds, vec![Command::DestroyDestination]);
        let cmds = m.handle(Input::DestinationDestroyed, t0);
        assert_eq!(cmds[0], Command::ResumeSource);
    }

    #[test]
    fn a_lost_destination_during_switchover_waits_for_the_resume_answer() {
        let (mut m, t0) = prepared(MigrationParams::default());
        m.handle(Input::SourceCompleted(stats(1)), t0);
        assert!(m
            .handle(Input::DestinationLost("connection lost".into()), t0)
            .is_empty());
        assert_eq!(m.phase(), &Phase::Finishing);
        assert_eq!(
            m.handle(Input::Finished, t0),
            vec![Command::QuitSource, Command::RecordPlacement]
        );
    }

    #[test]
    fn a_source_failure_in_postcopy_leaves_the_guest_on_the_destination() {
        let params = MigrationParams {
            postcopy: true,
            ..MigrationParams::default()
        };
        let (mut m, t0) = prepared(params);
        let cmds = m.handle(Input::Progress(stats(1)), t0);
        assert!(cmds.contains(&Command::SwitchToPostcopy));
        let cmds = m.handle(Input::SourceFailed("no answer: timeout".into()), t0);
        assert!(!cmds.contains(&Command::DestroyDestination), "{cmds:?}");
        assert!(matches!(outcome(&cmds), Some(Phase::InDoubt { .. })));
        assert!(m.reached_switchover());
    }

    fn mirror(status: &str, ready: bool, error: Option<&str>) -> MirrorProgress {
        MirrorProgress {
            target: "vda".into(),
            status: status.into(),
            len: 100,
            offset: if ready { 100 } else { 40 },
            ready,
            error: error.map(str::to_string),
        }
    }

    fn sample(status: &str, mirrors: Vec<MirrorProgress>) -> MigrationProgress {
        MigrationProgress {
            status: status.into(),
            mirrors,
            ..MigrationProgress::default()
        }
    }

    /// A `--copy-storage-all` job whose destination serves NBD.
    fn mirroring() -> (Migration, Instant, MigrationParams) {
        let params = MigrationParams {
            copy_storage: Some(CopyMode::All),
            ..MigrationParams::default()
        };
        let t0 = Instant::now();
        let (mut m, _) = Migration::start(params.clone(), t0);
        let nbd = NbdServer {
            host: "198.19.0.12".into(),
            port: 49153,
        };
        let cmds = m.handle(
            Input::Prepared {
                uri: "tcp:198.19.0.12:49152".into(),
                nbd: Some(nbd.clone()),
            },
            t0,
        );
        assert_eq!(cmds, vec![Command::StartMirrors { nbd }]);
        assert_eq!(m.phase(), &Phase::Mirroring);
        assert!(m.handle(Input::MirrorsStarted, t0).is_empty());
        (m, t0, params)
    }

    #[test]
    fn a_storage_copy_sends_memory_only_once_every_mirror_is_ready_and_switches_over_in_sync() {
        let (mut m, t0, params) = mirroring();
        let cmds = m.handle(
            Input::Progress(sample("none", vec![mirror("running", false, None)])),
            t0,
        );
        assert!(!cmds
            .iter()
            .any(|c| matches!(c, Command::StartMigration { .. })));
        let cmds = m.handle(
            Input::Progress(sample("none", vec![mirror("ready", true, None)])),
            t0,
        );
        assert_eq!(
            cmds.last(),
            Some(&Command::StartMigration {
                uri: "tcp:198.19.0.12:49152".into(),
                params
            })
        );
        assert_eq!(m.phase(), &Phase::Performing);
        // Paused before switchover: the mirrors finish, and only once they
        // concluded does the source switch over, once.
        let paused =
            |status: &str, ready| sample("pre-switchover", vec![mirror(status, ready, None)]);
        let cmds = m.handle(Input::Progress(paused("ready", true)), t0);
        assert_eq!(cmds.last(), Some(&Command::CompleteMirrors));
        let cmds = m.handle(Input::Progress(paused("waiting", true)), t0);
        assert!(!cmds.contains(&Command::ContinueSwitchover), "{cmds:?}");
        let cmds = m.handle(Input::Progress(paused("concluded", true)), t0);
        assert_eq!(cmds.last(), Some(&Command::ContinueSwitchover));
        let cmds = m.handle(Input::Progress(paused("concluded", true)), t0);
        assert!(
            !cmds.contains(&Command::ContinueSwitchover),
            "sent twice: {cmds:?}"
        );
        let cmds = m.handle(Input::SourceCompleted(stats(2)), t0);
        assert_eq!(cmds, vec![Command::FinishDestination]);
        m.handle(Input::Finished, t0);
        m.handle(Input::SourceQuit, t0);
        let cmds = m.handle(Input::Confirmed, t0);
        assert!(!cmds.contains(&Command::CancelMirrors), "{cmds:?}");
        assert_eq!(outcome(&cmds), Some(&Phase::Completed));
    }

    #[test]
    fn every_end_on_the_source_drops_the_mirrors_before_the_destination() {
        // Aborted while copying the disks.
        let (mut m, t0, _) = mirroring();
        let cmds = m.handle(Input::Abort("aborted by operator".into()), t0);
        assert_eq!(
            &cmds[..2],
            &[Command::CancelMirrors, Command::DestroyDestination]
        );
        assert!(matches!(outcome(&cmds), Some(Phase::Aborted { .. })));
        // A mirror that failed.
        let (mut m, t0, _) = mirroring();
        let broken = sample(
            "none",
            vec![mirror("concluded", false, Some("Input/output error"))],
        );
        let cmds = m.handle(Input::Progress(broken), t0);
        assert_eq!(
            &cmds[1..3],
            &[Command::CancelMirrors, Command::DestroyDestination]
        );
        assert!(matches!(outcome(&cmds), Some(Phase::Failed { reason })
            if reason == "copying the disks failed on the source: disk vda: Input/output error"));
        // Aborted while sending memory: cancel, then the same clean-up.
        let (mut m, t0, _) = mirroring();
        m.handle(
            Input::Progress(sample("none", vec![mirror("ready", true, None)])),
            t0,
        );
        assert_eq!(
            m.handle(Input::Abort("stop".into()), t0),
            vec![Command::CancelMigration]
        );
        let cmds = m.handle(Input::SourceFailed("cancelled".into()), t0);
        assert_eq!(
            &cmds[..2],
            &[Command::CancelMirrors, Command::DestroyDestination]
        );
        // A mirror that failed during the pause before switchover cancels the migration.
        let (mut m, t0, _) = mirroring();
        m.handle(
            Input::Progress(sample("none", vec![mirror("ready", true, None)])),
            t0,
        );
        let broken = sample(
            "pre-switchover",
            vec![mirror("concluded", true, Some("No space left"))],
        );
        let cmds = m.handle(Input::Progress(broken), t0);
        assert_eq!(cmds.last(), Some(&Command::CancelMigration));
        // A source that could not start its mirrors.
        let (mut m, t0, _) = mirroring();
        let cmds = m.handle(Input::MirrorFailed("blockdev-add: refused".into()), t0);
        assert_eq!(
            &cmds[..2],
            &[Command::CancelMirrors, Command::DestroyDestination]
        );
    }

    #[test]
    fn a_copy_with_nothing_to_copy_is_a_plain_migration() {
        let params = MigrationParams {
            copy_storage: Some(CopyMode::Inc),
            ..MigrationParams::default()
        };
        let t0 = Instant::now();
        let (mut m, _) = Migration::start(params.clone(), t0);
        let cmds = m.handle(
            Input::Prepared {
                uri: "tcp:b:49152".into(),
                nbd: None,
            },
            t0,
        );
        assert_eq!(
            cmds,
            vec![Command::StartMigration {
                uri: "tcp:b:49152".into(),
                params
            }]
        );
    }
}
