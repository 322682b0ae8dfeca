//! The coordinator's event log: what `flotilla events [--follow]` shows.
//!
//! Lines for host and VM transitions (connected, unreachable, started,
//! stopped, placed or not, migrating with progress, migrated), each stamped
//! in UTC. The newest lines are kept for operators who ask later; followers
//! get every new line as it happens and are dropped when they go away. The
//! clock is an input.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_shared::proto::MigrationProgress;

use tokio::sync::mpsc::UnboundedSender;

/// How many recent lines are kept.
pub const KEEP: usize = 1000;

/// Recent events and the operators following them.
#[derive(Debug, Default)]
pub struct EventLog {
    recent: VecDeque<String>,
    followers: Vec<UnboundedSender<String>>,
}

impl EventLog {
    /// Records `line` at `now` and passes it to every follower still listening.
    pub fn emit(&mut self, now: SystemTime, line: &str) {
        let stamped = format!("{} {line}", utc(now));
        self.followers.retain(|f| f.send(stamped.clone()).is_ok());
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(stamped);
    }

    /// Sends the recent lines to `sink`; with `follow`, keeps sending new ones.
    pub fn subscribe(&mut self, sink: UnboundedSender<String>, follow: bool) {
        for line in &self.recent {
            if sink.send(line.clone()).is_err() {
                return;
            }
        }
        if follow {
            self.followers.push(sink);
        }
    }
}

/// How often a running migration's progress becomes an event line.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Decides which of a migration's progress samples become event lines.
///
/// The operator's progress bar gets every sample (10 ms apart); the event log
/// is read by people and kept for later, so it gets a status change at once
/// and otherwise one line per [`PROGRESS_EVERY`].
#[derive(Debug, Default)]
pub struct ProgressSampler {
    last: Option<(Instant, String)>,
}

impl ProgressSampler {
    /// Whether the sample with `status` seen at `now` should be logged.
    pub fn should_log(&mut self, now: Instant, status: &str) -> bool {
        let due = match &self.last {
            None => true,
            Some((at, s)) => s != status || now.duration_since(*at) >= PROGRESS_EVERY,
        };
        if due {
            self.last = Some((now, status.to_string()));
        }
        due
    }
}

/// `vm web01 migration active 42% of 64.0 MiB (27.0 MiB sent, 118.2 MiB/s, pass 1)`.
pub fn migration_progress_line(name: &str, p: &MigrationProgress) -> String {
    format!("vm {name} migration {}", migration_progress(p))
}

/// `active 42% of 64.0 MiB (27.0 MiB sent, 118.2 MiB/s, pass 1)`: one progress sample.
pub fn migration_progress(p: &MigrationProgress) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    // QEMU reports no rate until its first bandwidth sample, and "0.0 MiB/s"
    // beside a moving percentage reads as a stall.
    let rate = match p.throughput_bps {
        0 => String::new(),
        bps => format!(", {:.1} MiB/s", bps as f64 / MIB),
    };
    let disks = disk_progress(p);
    // Memory has not started while the disk mirrors catch up.
    if !p.mirrors.is_empty() && p.total == 0 {
        return format!("copying disks: {disks}");
    }
    let memory = format!(
        "{} {}% of {:.1} MiB ({:.1} MiB sent{rate}, pass {})",
        p.status,
        migration_percent(p),
        p.total as f64 / MIB,
        p.transferred as f64 / MIB,
        p.dirty_sync_count
    );
    match disks.is_empty() {
        true => memory,
        false => format!("{memory}; disks {disks}"),
    }
}

/// `42% of 1024.0 MiB, 1 of 2 in sync`: the disk mirrors of a storage copy,
/// empty when there are none.
pub fn disk_progress(p: &MigrationProgress) -> String {
    if p.mirrors.is_empty() {
        return String::new();
    }
    let (len, done) = p.disk();
    let percent = (u128::from(done) * 100)
        .checked_div(u128::from(len))
        .map_or(0, |d| d.min(100));
    let ready = p.mirrors.iter().filter(|m| m.ready).count();
    format!(
        "{percent}% of {:.1} MiB, {ready} of {} in sync",
        len as f64 / (1024.0 * 1024.0),
        p.mirrors.len()
    )
}

/// How far the migration is, 0–100, from what is left to send.
pub fn migration_percent(p: &MigrationProgress) -> u64 {
    // Remaining shrinks to 0 as pages are sent; transferred may exceed total
    // when pages are resent, so it is not the measure of completion.
    // In u128: the sizes come from QEMU and must not overflow into a panic.
    let done = u128::from(p.total.saturating_sub(p.remaining)) * 100;
    done.checked_div(u128::from(p.total))
        .map_or(0, |d| d.min(100) as u64)
}

/// `2026-11-25T01:50:03Z`.
pub fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(utc(at(1_709_208_000)), "2024-02-29T12:00:00Z");
        assert_eq!(utc(at(1_796_003_403)), "2026-11-30T01:50:03Z");
    }

    #[test]
    fn followers_get_the_backlog_then_new_lines_and_late_readers_the_backlog() {
        let mut log = EventLog::default();
        log.emit(at(0), "host a connected");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        log.subscribe(tx, true);
        log.emit(at(1), "vm x started on a");
        assert_eq!(
            rx.try_recv().ok().as_deref(),
            Some("1970-01-01T00:00:00Z host a connected")
        );
        assert_eq!(
            rx.try_recv().ok().as_deref(),
            Some("1970-01-01T00:00:01Z vm x started on a")
        );
        drop(rx);
        log.emit(at(2), "vm x stopped");
        assert!(log.followers.is_empty(), "a gone follower is dropped");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        log.subscribe(tx, false);
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        assert_eq!(lines.len(), 3);
        assert!(log.followers.is_empty(), "not following");
    }

    #[test]
    fn progress_lines_are_throttled_but_status_changes_always_show() {
        let t0 = Instant::now();
        let mut s = ProgressSampler::default();
        assert!(s.should_log(t0, "active"), "the first sample");
        assert!(!s.should_log(t0 + Duration::from_millis(25), "active"));
        assert!(!s.should_log(t0 + Duration::from_millis(999), "active"));
        assert!(s.should_log(t0 + Duration::from_millis(1000), "active"));
        assert!(s.should_log(t0 + Duration::from_millis(1010), "postcopy-active"));
        assert!(!s.should_log(t0 + Duration::from_millis(1020), "postcopy-active"));
    }

    #[test]
    fn progress_line_counts_completion_from_what_is_left() {
        let mib = 1024 * 1024;
        let p = MigrationProgress {
            status: "active".into(),
            transferred: 80 * mib,
            remaining: 16 * mib,
            total: 64 * mib,
            throughput_bps: 120 * mib,
            dirty_sync_count: 2,
            expected_downtime_ms: 3,
            downtime_ms: None,
            total_time_ms: None,
            error: None,
            mirrors: Vec::new(),
        };
        assert_eq!(
            migration_progress_line("web01", &p),
            "vm web01 migration active 75% of 64.0 MiB (80.0 MiB sent, 120.0 MiB/s, pass 2)"
        );
        let empty = MigrationProgress {
            total: 0,
            ..p.clone()
        };
        assert!(migration_progress_line("web01", &empty).contains(" 0% "));
        let huge = MigrationProgress {
            total: u64::MAX,
            remaining: 0,
            ..p.clone()
        };
        assert_eq!(migration_percent(&huge), 100);
        let unrated = MigrationProgress {
            throughput_bps: 0,
            ..p
        };
        assert_eq!(
            migration_progress(&unrated),
            "active 75% of 64.0 MiB (80.0 MiB sent, pass 2)"
        );
    }

    #[test]
    fn keeps_only_the_newest_lines() {
        let mut log = EventLog::default();
        for i in 0..(KEEP as u64 + 5) {
            log.emit(at(i), &format!("e{i}"));
        }
        assert_eq!(log.recent.len(), KEEP);
        assert!(log.recent.front().is_some_and(|l| l.ends_with(" e5")));
    }
}
