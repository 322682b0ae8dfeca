//! Leader election among coordinators that share one etcd (`--store etcd`).
//!
//! Each coordinator holds one etcd lease for its whole life. Under it, it
//! announces itself (`P/coordinators/ADDRESS`) and campaigns with etcd's
//! Election API (`P/election`), which makes the oldest live campaign the
//! leader. The leader's election key's `create_revision` is its **fencing
//! epoch**: every write of the leader's store compares it
//! ([`crate::etcd_store`]), and agents refuse a coordinator whose epoch is
//! lower than one they have seen.
//!
//! A coordinator whose lease keep-alives go unanswered for most of the TTL
//! ([`LeaseWatch`], pure) cannot know whether etcd still holds its lease:
//! it stops at once, as Kubernetes' controller-manager does on a lost
//! lease, and its supervisor starts it again as a follower. Losing the lease
//! is the only way leadership ends, so a leader never has to unwind its
//! fleet core.
//!
//! Failover takes the lease's TTL (from the leader's last keep-alive), plus
//! up to half a second of etcd's expiry check, plus the new leader's load.
//! etcd raises a TTL below its minimum (1.5 election timeouts, rounded up to
//! whole seconds) silently, so the deploy steps run etcd with a 500 ms
//! election timeout, which allows the 1 s TTL this defaults to.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use flotilla_shared::proto::{ClusterStatus, CoordinatorEntry, EtcdMember};

use crate::etcd_store::{self, CoordinatorInfo, EtcdSettings, EtcdStore, Fence};
use crate::store::StoreError;

/// Whether the lease still holds, as far as this process can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep going.
    Held,
    /// Unconfirmed for too long: etcd may have expired it (or be electing
    /// its own leader, when no lease expires). A leader must stop; a
    /// follower, which acts on nothing, keeps trying.
    Lost(String),
    /// etcd says the lease is gone: nothing this process holds under it
    /// (announcement, campaign) exists any more.
    Expired,
}

/// Tracks a lease from its keep-alive answers. A lease is alive until the
/// TTL after the *send* of the last answered keep-alive (etcd renewed it no
/// earlier than that); the holder gives up when most of that TTL passed
/// without an answer, leaving the rest for its last writes to fail by
/// fencing rather than to land.
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    ttl: Duration,
    /// When the last answered keep-alive (or the grant) was sent.
    renewed_at: Instant,
    /// Send times of keep-alives not answered yet, oldest first.
    in_flight: VecDeque<Instant>,
}

impl LeaseWatch {
    /// A lease of `ttl`, granted by a request sent at `sent`.
    pub fn new(ttl: Duration, sent: Instant) -> LeaseWatch {
        LeaseWatch {
            ttl,
            renewed_at: sent,
            in_flight: VecDeque::new(),
        }
    }

    /// How often to send keep-alives: four per TTL, so one lost answer
    /// costs a quarter of it.
    pub fn period(&self) -> Duration {
        self.ttl / 4
    }

    /// A keep-alive was sent at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.in_flight.push_back(now);
    }

    /// etcd answered the oldest keep-alive in flight with `ttl_left` seconds
    /// (0: the lease is gone).
    pub fn answered(&mut self, ttl_left: i64) -> Verdict {
        let sent = self.in_flight.pop_front();
        if ttl_left <= 0 {
            return Verdict::Expired;
        }
        if let Some(sent) = sent {
            self.renewed_at = self.renewed_at.max(sent);
        }
        Verdict::Held
    }

    /// The keep-alive stream broke: answers to what was in flight will not come.
    pub fn stream_lost(&mut self) {
        self.in_flight.clear();
    }

    /// Whether the lease is still safely held at `now`: not once two
    /// thirds of the TTL passed since the last renewal.
    pub fn check(&self, now: Instant) -> Verdict {
        let deadline = self.renewed_at + self.ttl * 2 / 3;
        if now >= deadline {
            Verdict::Lost(format!(
                "no keep-alive answered for {} ms of the lease's {} ms",
                now.duration_since(self.renewed_at).as_millis(),
                self.ttl.as_millis()
            ))
        } else {
            Verdict::Held
        }
    }
}

/// This coordinator's lease, kept alive by a task of its own.
pub struct Session {
    client: Client,
    prefix: String,
    address: String,
    lease: i64,
}

/// The election's name under the prefix.
fn election(prefix: &str) -> String {
    format!("{}/election", prefix.trim_end_matches('/'))
}

fn coordinator_key(prefix: &str, address: &str) -> String {
    format!("{}/coordinators/{address}", prefix.trim_end_matches('/'))
}

fn etcd_error(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

impl Session {
    /// Grants the lease (`ttl`, or etcd's minimum if larger), announces
    /// `address` under it, and keeps it alive; `lost` runs with each
    /// [`Verdict::Lost`] (once per episode) and with [`Verdict::Expired`],
    /// after which the keep-alives stop. Call on the runtime that made `client`.
    pub async fn open(
        client: Client,
        prefix: &str,
        address: &str,
        ttl: Duration,
        lost: impl Fn(Verdict) + Send + 'static,
    ) -> Result<Session, StoreError> {
        let sent = Instant::now();
        let grant = client
            .lease_client()
            .grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(etcd_error)?;
        let granted = Duration::from_secs(grant.ttl().max(1) as u64);
        if granted > ttl {
            tracing::warn!(
                asked_ms = ttl.as_millis() as u64,
                granted_ms = granted.as_millis() as u64,
                "etcd raised the leader lease to its minimum (1.5 election timeouts); failover takes that long"
            );
        }
        let session = Session {
            client,
            prefix: prefix.to_string(),
            address: address.to_string(),
            lease: grant.id(),
        };
        let info = CoordinatorInfo {
            address: address.to_string(),
            pid: std::process::id(),
        };
        session
            .client
            .kv_client()
            .put(
                coordinator_key(prefix, address),
                serde_json::to_vec(&info).map_err(|e| StoreError::Backend(e.to_string()))?,
                Some(etcd_client::PutOptions::new().with_lease(grant.id())),
            )
            .await
            .map_err(etcd_error)?;
        tokio::spawn(keep_alive(
            session.client.clone(),
            grant.id(),
            LeaseWatch::new(granted, sent),
            lost,
        ));
        Ok(session)
    }

    /// Waits until this coordinator leads; its fence, whose revision is the
    /// epoch. `client` must carry no per-call timeout: a campaign waits for
    /// as long as another coordinator leads.
    pub async fn campaign(&self, client: &Client) -> Fence {
        let mut election_client = client.election_client();
        loop {
            // A campaign cut off (its etcd member died) is resumed: the same
            // lease makes the same key, so nothing is doubled.
            match election_client
                .campaign(election(&self.prefix), self.address.clone(), self.lease)
                .await
            {
                Ok(r) => match r.leader() {
                    Some(key) => {
                        return Fence {
                            key: key.key().to_vec(),
                            revision: key.rev(),
                        }
                    }
                    None => tracing::warn!("etcd answered a campaign without a leader key"),
                },
                Err(e) => tracing::warn!(error = %e, "campaign interrupted; resuming"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Gives the lease back: the election key and the announcement go at
    /// once, so a planned stop fails over without waiting for the TTL.
    pub async fn close(&self) {
        let _ = self.client.lease_client().revoke(self.lease).await;
    }
}

async fn keep_alive(
    client: Client,
    lease: i64,
    mut watch: LeaseWatch,
    lost: impl Fn(Verdict) + Send + 'static,
) {
    let mut tick = tokio::time::interval(watch.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream = None;
    // Reported once per episode of silence.
    let mut reported = false;
    loop {
        if stream.is_none() {
            // The first request goes out with the stream itself. A stream
            // broken by a dead member is opened again at once, on another.
            let sent = Instant::now();
            match client.lease_client().keep_alive(lease).await {
                Ok(s) => {
                    watch.sent(sent);
                    stream = Some(s);
                }
                Err(e) => tracing::warn!(error = %e, "cannot open the lease keep-alive stream"),
            }
        }
        match watch.check(Instant::now()) {
            Verdict::Held => reported = false,
            verdict if !reported => {
                tracing::error!(?verdict, "coordinator lease unconfirmed");
                reported = true;
                lost(verdict);
            }
            _ => {}
        }
        let Some((keeper, answers)) = stream.as_mut() else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        tokio::select! {
            _ = tick.tick() => {
                let sent = Instant::now();
                match keeper.keep_alive().await {
                    Ok(()) => watch.sent(sent),
                    Err(_) => { watch.stream_lost(); stream = None; }
                }
            }
            // Cancel-safe: a message is either returned or left in the stream.
            answer = answers.message() => match answer {
                Ok(Some(a)) => {
                    if watch.answered(a.ttl()) == Verdict::Expired {
                        tracing::error!("etcd says this coordinator's lease expired");
                        lost(Verdict::Expired);
                        return;
                    }
                }
                Ok(None) | Err(_) => { watch.stream_lost(); stream = None; }
            }
        }
    }
}

/// What `flotilla cluster` shows, and whom followers name as the leader.
pub enum ClusterView {
    /// One coordinator on redb: it leads.
    Single {
        /// Its address.
        address: String,
    },
    /// Coordinators on etcd.
    Etcd(Box<EtcdCluster>),
}

/// This coordinator's view of an etcd control plane.
pub struct EtcdCluster {
    /// The client.
    pub client: Client,
    /// How it was reached (for per-member status).
    pub settings: EtcdSettings,
    /// This coordinator's address.
    pub address: String,
    /// Reads for follower answers.
    pub store: Arc<EtcdStore>,
}

impl ClusterView {
    /// The elected leader's address, if any.
    pub async fn leader(&self) -> Option<String> {
        match self {
            ClusterView::Single { address } => Some(address.clone()),
            ClusterView::Etcd(e) => leader_key(&e.client, &e.settings.prefix)
                .await
                .map(|(address, _)| address),
        }
    }

    /// The follower's store, for read-only answers.
    pub fn store(&self) -> Option<Arc<EtcdStore>> {
        match self {
            ClusterView::Single { .. } => None,
            ClusterView::Etcd(e) => Some(e.store.clone()),
        }
    }

    /// The control plane now.
    pub async fn status(&self) -> ClusterStatus {
        match self {
            ClusterView::Single { address } => ClusterStatus {
                store: "redb".into(),
                answered_by: address.clone(),
                coordinators: vec![CoordinatorEntry {
                    address: address.clone(),
                    leader: true,
                    epoch: 0,
                    pid: std::process::id(),
                }],
                members: Vec::new(),
            },
            ClusterView::Etcd(e) => {
                let (client, settings, address) = (&e.client, &e.settings, &e.address);
                let leader = leader_key(client, &settings.prefix).await;
                let prefix = format!("{}/coordinators/", settings.prefix.trim_end_matches('/'));
                let mut coordinators = Vec::new();
                if let Ok(r) = client
                    .kv_client()
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
                {
                    for kv in r.kvs() {
                        if let Ok(info) = serde_json::from_slice::<CoordinatorInfo>(kv.value()) {
                            let leads = leader.as_ref().is_some_and(|(a, _)| *a == info.address);
                            coordinators.push(CoordinatorEntry {
                                leader: leads,
                                epoch: if leads {
                                    leader.as_ref().map_or(0, |(_, rev)| *rev as u64)
                                } else {
                                    0
                                },
                                address: info.address,
                                pid: info.pid,
                            });
                        }
                    }
                }
                ClusterStatus {
                    store: "etcd".into(),
                    answered_by: address.clone(),
                    coordinators,
                    members: members(client, settings).await,
                }
            }
        }
    }
}

/// The leader's address and epoch, from its election key.
async fn leader_key(client: &Client, prefix: &str) -> Option<(String, i64)> {
    let r = client
        .election_client()
        .leader(election(prefix))
        .await
        .ok()?;
    let kv = r.kv()?;
    Some((
        String::from_utf8_lossy(kv.value()).into_owned(),
        kv.create_revision(),
    ))
}

/// etcd's members, each asked for its status on its own client URLs.
async fn members(client: &Client, settings: &EtcdSettings) -> Vec<EtcdMember> {
    let list = match client.cluster_client().member_list().await {
        Ok(l) => l,
        Err(e) => {
            return vec![EtcdMember {
                name: "?".into(),
                id: "?".into(),
                client_urls: settings.endpoints.clone(),
                healthy: false,
                raft_leader: false,
                error: Some(format!("member list: {e}")),
            }]
        }
    };
    let mut out = Vec::new();
    for m in list.members() {
        let one = EtcdSettings {
            endpoints: m.client_urls().to_vec(),
            ..settings.clone()
        };
        let status = async {
            let c = etcd_store::connect(&one, true)
                .await
                .map_err(|e| e.to_string())?;
            c.maintenance_client()
                .status()
                .await
                .map_err(|e| e.to_string())
        };
        let status = tokio::time::timeout(Duration::from_secs(1), status)
            .await
            .unwrap_or_else(|_| Err("no answer within 1 s".into()));
        out.push(EtcdMember {
            name: m.name().to_string(),
            id: format!("{:x}", m.id()),
            client_urls: m.client_urls().to_vec(),
            healthy: status.is_ok(),
            raft_leader: status.as_ref().is_ok_and(|s| s.leader() == m.id()),
            error: status.err(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_given_up_after_two_thirds_of_its_ttl_without_an_answer() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = LeaseWatch::new(ms(1000), t0);
        assert_eq!(w.period(), ms(250));
        assert_eq!(w.check(t0 + ms(600)), Verdict::Held);
        assert!(matches!(w.check(t0 + ms(667)), Verdict::Lost(_)));
        // An answer renews from when its request was sent, not when it came.
        w.sent(t0 + ms(250));
        w.sent(t0 + ms(500));
        assert_eq!(w.answered(1), Verdict::Held);
        assert_eq!(w.check(t0 + ms(900)), Verdict::Held);
        assert!(matches!(w.check(t0 + ms(917)), Verdict::Lost(_)));
        assert_eq!(w.answered(1), Verdict::Held);
        assert_eq!(w.check(t0 + ms(1100)), Verdict::Held);
        // A late answer to an old request never moves the renewal back.
        w.sent(t0 + ms(750));
        w.stream_lost();
        w.sent(t0 + ms(800));
        assert_eq!(w.answered(1), Verdict::Held);
        assert!(matches!(w.check(t0 + ms(1467)), Verdict::Lost(_)));
        // etcd saying the lease is gone ends it at once.
        w.sent(t0 + ms(900));
        assert_eq!(w.answered(0), Verdict::Expired);
    }
}
