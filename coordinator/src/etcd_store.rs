//! The replicated backend of [`Store`]: etcd (`--store etcd`).
//!
//! Several coordinators share one etcd cluster; only the elected leader
//! ([`crate::leadership`]) writes. Every write is one etcd transaction that
//! also compares the leader's election key's `create_revision` with the one
//! this coordinator won, as etcd's own `concurrency.Election.Proclaim` does:
//! a deposed leader that has not noticed yet (paused, partitioned) finds its
//! key gone or replaced and its write refused as [`StoreError::Fenced`],
//! before anything changes. A row is changed with compare-and-swap on its
//! key's `mod_revision`, so a read-modify-write never loses a concurrent one.
//!
//! Schema (under `--etcd-prefix`, default `/flotilla`; values are the same
//! JSON as the redb tables, so a row reads alike from either backend):
//!
//! | key                          | value                         | written by              |
//! |------------------------------|-------------------------------|-------------------------|
//! | `P/meta/schema`              | schema version (`"1"`)        | the first leader        |
//! | `P/definitions/NAME`         | [`VmRow`] as JSON             | define/start/… (leader) |
//! | `P/uuids/UUID`               | VM name                       | define/undefine         |
//! | `P/hosts/NAME`               | [`HostRow`] as JSON           | agent register (leader) |
//! | `P/election/LEASE`           | the leader's QUIC address     | etcd's Election API     |
//! | `P/coordinators/ADDRESS`     | [`CoordinatorInfo`] as JSON   | each coordinator, leased|
//!
//! Durability: etcd acknowledges a transaction once a quorum has it on disk,
//! so a write is durable when the call returns and group commit
//! ([`Store::begin_group`]) has nothing to add.
//!
//! [`Store`] is synchronous (the fleet's core thread calls it); the calls
//! block on a runtime of this store's own, which also carries the gRPC
//! connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, TlsOptions, Txn, TxnOp,
    TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use crate::store::{defined_row, HostRow, NewDefinition, Store, StoreError, VmRow, SCHEMA_VERSION};

/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Calls that could not connect, tried again on another member (a dead
/// member is tried at most once or twice among three).
const CONNECT_RETRIES: usize = 10;
/// Compare-and-swap retries before a write gives up (only another writer
/// changing the same row in between makes one fail, and fencing leaves
/// none).
const CAS_ATTEMPTS: usize = 8;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Client URLs (`http://10.0.0.1:2379`, …).
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet.
    pub prefix: String,
    /// TLS to etcd: the CA that signed etcd's certificates, and this
    /// coordinator's client certificate and key (PEM files).
    pub tls: Option<EtcdTls>,
}

/// Client TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA certificate (PEM).
    pub ca: std::path::PathBuf,
    /// Client certificate (PEM).
    pub cert: std::path::PathBuf,
    /// Client key (PEM).
    pub key: std::path::PathBuf,
}

/// What a coordinator says about itself under `P/coordinators/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    /// The QUIC address agents and operators use.
    pub address: String,
    /// Its process id, for the operator who wants to find it.
    pub pid: u32,
}

/// The election key this coordinator won: writes are fenced on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The key (`P/election/LEASE`).
    pub key: Vec<u8>,
    /// Its `create_revision`: the fencing epoch.
    pub revision: i64,
}

/// Connects to etcd with the settings' TLS, failing fast when no endpoint
/// answers. Without `timed`, calls may wait indefinitely (a campaign).
pub async fn connect(settings: &EtcdSettings, timed: bool) -> Result<Client, StoreError> {
    let mut options = ConnectOptions::new();
    if timed {
        options = options.with_timeout(CALL_TIMEOUT);
    }
    options = options
        .with_connect_timeout(Duration::from_secs(2))
        // Pings at most every 10 s: etcd closes a connection that pings more
        // often than its --grpc-keepalive-min-time (5 s by default), and a
        // member that dies on this machine or cleanly is noticed by its
        // closed connection anyway.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &settings.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                StoreError::Backend(format!("etcd TLS: cannot read {}: {e}", p.display()))
            })
        };
        options = options.with_tls(
            TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                .identity(etcd_client::Identity::from_pem(
                    read(&tls.cert)?,
                    read(&tls.key)?,
                )),
        );
    }
    Client::connect(&settings.endpoints, Some(options))
        .await
        .map_err(|e| {
            StoreError::Backend(format!(
                "cannot reach etcd at {}: {e}",
                settings.endpoints.join(",")
            ))
        })
}

/// Whether a call failed before anything was sent: the transport could not
/// connect to the member it picked.
pub(crate) fn never_sent(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("tcp connect error") || text.contains("Connection refused")
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

fn decode<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| {
        StoreError::Backend(format!(
            "etcd: key {}: {e}",
            String::from_utf8_lossy(kv.key())
        ))
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(backend)
}

/// The etcd backend: reads from anywhere, writes only under its [`Fence`].
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// `None` on a follower: it reads, and every write is refused.
    fence: Option<Fence>,
    rt: Arc<tokio::runtime::Runtime>,
    /// Told when a write found the fence gone, so the process demotes
    /// itself at once rather than at its next lease check.
    deposed: Arc<tokio::sync::Notify>,
}

impl EtcdStore {
    /// A store over `client` (made on `rt`), writing under `fence` when given.
    pub fn new(
        client: Client,
        prefix: &str,
        fence: Option<Fence>,
        rt: Arc<tokio::runtime::Runtime>,
        deposed: Arc<tokio::sync::Notify>,
    ) -> Result<EtcdStore, StoreError> {
        let store = EtcdStore {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            fence,
            rt,
            deposed,
        };
        store.check_schema()?;
        Ok(store)
    }

    fn key(&self, table: &str, name: &str) -> Vec<u8> {
        format!("{}/{table}/{name}", self.prefix).into_bytes()
    }

    fn table(&self, table: &str) -> Vec<u8> {
        format!("{}/{table}/", self.prefix).into_bytes()
    }

    /// Runs `f` to completion on this store's runtime, also when called
    /// from inside another runtime (where blocking in place would panic).
    fn wait<T: Send, F: Future<Output = T> + Send>(&self, f: F) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.rt.block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            self.rt.block_on(f)
        }
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let key = self.key("meta", "schema");
        let found = self.get_kv(key.clone())?;
        match found {
            Some(kv) if kv.value() == SCHEMA_VERSION.as_bytes() => Ok(()),
            Some(kv) => Err(StoreError::Schema {
                found: String::from_utf8_lossy(kv.value()).into_owned(),
                expected: SCHEMA_VERSION,
            }),
            None if self.fence.is_some() => {
                // Only if still absent: two first leaders cannot both write it.
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, SCHEMA_VERSION, None)]);
                self.commit(txn).map(|_| ())
            }
            None => Ok(()),
        }
    }

    /// Runs one etcd call, again on another member when it could not even
    /// connect to the one it picked (a dead member stays in the client's
    /// list): such a call never reached etcd, so repeating it is safe.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send,
        F: Fn(etcd_client::KvClient) -> Fut + Send + Sync,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send,
    {
        self.wait(async {
            let mut attempt = 0;
            loop {
                match f(self.client.kv_client()).await {
                    Err(e) if attempt < CONNECT_RETRIES && never_sent(&e) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    r => return r.map_err(backend),
                }
            }
        })
    }

    fn get_kv(&self, key: Vec<u8>) -> Result<Option<KeyValue>, StoreError> {
        let r = self.call(|mut kv| {
            let key = key.clone();
            async move { kv.get(key, None).await }
        })?;
        Ok(r.kvs().first().cloned())
    }

    fn get_prefix(&self, prefix: Vec<u8>) -> Result<Vec<KeyValue>, StoreError> {
        let r = self.call(|mut kv| {
            let prefix = prefix.clone();
            async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })?;
        Ok(r.kvs().to_vec())
    }

    /// Commits `txn` under the fence: `Ok(true)` when its own comparisons
    /// held, `Ok(false)` when one of them failed (a concurrent change: read
    /// again), [`StoreError::Fenced`] when the leadership is gone.
    fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        let Some(fence) = &self.fence else {
            return Err(StoreError::NotLeader);
        };
        // Nested: the outer transaction holds only while this coordinator
        // still leads; the inner one is the caller's own compare-and-swap.
        let outer = Txn::new()
            .when([Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.revision,
            )])
            .and_then([TxnOp::txn(txn)]);
        let r = self.call(|mut kv| {
            let outer = outer.clone();
            async move { kv.txn(outer).await }
        })?;
        if !r.succeeded() {
            tracing::error!(
                epoch = fence.revision,
                "write refused by etcd: this coordinator's election key is gone; it is no longer the leader"
            );
            self.deposed.notify_one();
            return Err(StoreError::Fenced {
                epoch: fence.revision,
            });
        }
        match r.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) => Ok(inner.succeeded()),
            other => Err(StoreError::Backend(format!(
                "etcd: unexpected transaction answer {other:?}"
            ))),
        }
    }

    /// Reads a row, changes it and writes it back if nobody wrote it in
    /// between, retrying otherwise.
    fn cas_row(&self, name: &str, change: &mut dyn FnMut(&mut VmRow)) -> Result<VmRow, StoreError> {
        let key = self.key("definitions", name);
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = self.get_kv(key.clone())? else {
                return Err(StoreError::NotFound(name.to_string()));
            };
            let mut row: VmRow = decode(&kv)?;
            change(&mut row);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(key.clone(), encode(&row)?, None)]);
            if self.commit(txn)? {
                return Ok(row);
            }
        }
        Err(StoreError::Backend(format!(
            "etcd: definition '{name}' kept changing under {CAS_ATTEMPTS} attempts to update it"
        )))
    }

    /// Every coordinator that announced itself and still holds its lease.
    pub fn coordinators(&self) -> Result<Vec<CoordinatorInfo>, StoreError> {
        self.get_prefix(self.table("coordinators"))?
            .iter()
            .map(decode)
            .collect()
    }
}

/// The version-0 comparison for an absent key, the `mod_revision` one for a present one.
fn unchanged(key: Vec<u8>, seen: Option<&KeyValue>) -> Compare {
    match seen {
        Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
        None => Compare::version(key, CompareOp::Equal, 0),
    }
}

impl Store for EtcdStore {
    fn define(&self, def: NewDefinition) -> Result<VmRow, StoreError> {
        let key = self.key("definitions", &def.name);
        let uuid_key = self.key("uuids", &def.uuid);
        for _ in 0..CAS_ATTEMPTS {
            let existing_kv = self.get_kv(key.clone())?;
            let holder_kv = self.get_kv(uuid_key.clone())?;
            let existing: Option<VmRow> = existing_kv.as_ref().map(decode).transpose()?;
            let holder = holder_kv
                .as_ref()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
            let unchanged_row = existing.clone();
            let row = defined_row(existing, holder.as_deref(), def.clone())?;
            if Some(&row) == unchanged_row.as_ref() {
                return Ok(row);
            }
            let txn = Txn::new()
                .when([
                    unchanged(key.clone(), existing_kv.as_ref()),
                    unchanged(uuid_key.clone(), holder_kv.as_ref()),
                ])
                .and_then([
                    TxnOp::put(key.clone(), encode(&row)?, None),
                    TxnOp::put(uuid_key.clone(), row.name.clone(), None),
                ]);
            if self.commit(txn)? {
                return Ok(row);
            }
        }
        Err(StoreError::Backend(format!(
            "etcd: definition '{}' kept changing under {CAS_ATTEMPTS} attempts to store it",
            def.name
        )))
    }

    fn undefine(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key("definitions", name);
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = self.get_kv(key.clone())? else {
                return Err(StoreError::NotFound(name.to_string()));
            };
            let row: VmRow = decode(&kv)?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([
                    TxnOp::delete(key.clone(), None),
                    TxnOp::delete(self.key("uuids", &row.uuid), None),
                ]);
            if self.commit(txn)? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!(
            "etcd: definition '{name}' kept changing under {CAS_ATTEMPTS} attempts to remove it"
        )))
    }

    fn get(&self, name: &str) -> Result<Option<VmRow>, StoreError> {
        self.get_kv(self.key("definitions", name))?
            .as_ref()
            .map(decode)
            .transpose()
    }

    fn list(&self) -> Result<Vec<VmRow>, StoreError> {
        // etcd sorts by key, so this is by name as redb's is.
        self.get_prefix(self.table("definitions"))?
            .iter()
            .map(decode)
            .collect()
    }

    fn update_row(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut VmRow),
    ) -> Result<VmRow, StoreError> {
        self.cas_row(name, change)
    }

    fn put_host(&self, host: &HostRow, _durable: bool) -> Result<(), StoreError> {
        let txn = Txn::new().and_then([TxnOp::put(
            self.key("hosts", &host.name),
            encode(host)?,
            None,
        )]);
        self.commit(txn).map(|_| ())
    }

    fn get_host(&self, name: &str) -> Result<Option<HostRow>, StoreError> {
        self.get_kv(self.key("hosts", name))?
            .as_ref()
            .map(decode)
            .transpose()
    }

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.get_prefix(self.table("hosts"))?
            .iter()
            .map(decode)
            .collect()
    }
}
