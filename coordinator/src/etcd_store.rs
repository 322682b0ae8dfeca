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
//! so a write is durable when the call returns. Inside a group
//! ([`Store::begin_group`]) writes wait in memory (reads see them) and
//! [`Store::end_group`] commits them together, as few transactions as
//! etcd's limits allow; the fleet's core sends none of the batch's effects
//! before that returned, as with redb's group fsync.
//!
//! [`Store`] is synchronous (the fleet's core thread calls it); the calls
//! block on the runtime the store is given, which also carries the gRPC
//! connections and the lease's keep-alives.

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
/// Calls that could not connect, tried again (20 ms apart) until the
/// client picks a member that lives.
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

/// A stored value: its key, bytes and `mod_revision` (0 for a value written
/// in the open group and not committed yet).
#[derive(Debug, Clone)]
struct Entry {
    key: Vec<u8>,
    value: Vec<u8>,
    mod_revision: i64,
}

impl From<&KeyValue> for Entry {
    fn from(kv: &KeyValue) -> Entry {
        Entry {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(e: &Entry) -> Result<T, StoreError> {
    serde_json::from_slice(&e.value).map_err(|err| {
        StoreError::Backend(format!(
            "etcd: key {}: {err}",
            String::from_utf8_lossy(&e.key)
        ))
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(backend)
}

/// Operations per transaction when a group is committed: etcd refuses more
/// than `--max-txn-ops` (128 by default) in one.
const GROUP_OPS: usize = 100;
/// Bytes per transaction when a group is committed, well under etcd's
/// 1.5 MiB request limit.
const GROUP_BYTES: usize = 1 << 20;

/// The etcd backend: reads from anywhere, writes only under its [`Fence`].
///
/// Group commit: between [`Store::begin_group`] and [`Store::end_group`]
/// writes go to `pending` (reads see them) and `end_group` sends them as
/// few fenced transactions as etcd's limits allow, so a batch of inputs
/// costs one consensus round instead of one per write. No compare-and-swap
/// is needed inside a group: the fence already makes this coordinator
/// etcd's only writer.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// `None` on a follower: it reads, and every write is refused.
    fence: Option<Fence>,
    rt: Arc<tokio::runtime::Runtime>,
    /// Told when a write found the fence gone, so the process demotes
    /// itself at once rather than at its next lease check.
    deposed: Arc<tokio::sync::Notify>,
    /// A group is open.
    grouped: std::sync::atomic::AtomicBool,
    /// Writes of the open group, by key: a value, or `None` for a delete.
    pending: std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// The leader's copy of every row (definitions, UUIDs, hosts), read once
    /// at election: the fence makes it etcd's only writer, so nothing
    /// changes these keys behind it, and reads cost no round trip. Each
    /// write still compares the `mod_revision` this copy holds. `None` on a
    /// follower, which reads etcd.
    rows: Option<std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, Entry>>>,
}

/// The tables a leader keeps a copy of.
const TABLES: [&str; 3] = ["definitions", "uuids", "hosts"];

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
            grouped: std::sync::atomic::AtomicBool::new(false),
            pending: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            rows: None,
        };
        store.check_schema()?;
        if store.fence.is_none() {
            return Ok(store);
        }
        let mut rows = std::collections::BTreeMap::new();
        for table in TABLES {
            for e in store.read_prefix(store.table(table))? {
                rows.insert(e.key.clone(), e);
            }
        }
        Ok(EtcdStore {
            rows: Some(std::sync::Mutex::new(rows)),
            ..store
        })
    }

    fn rows(
        &self,
    ) -> Option<std::sync::MutexGuard<'_, std::collections::BTreeMap<Vec<u8>, Entry>>> {
        self.rows
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether the leader's copy holds `key`'s table.
    fn copied(&self, key: &[u8]) -> bool {
        self.rows.is_some() && TABLES.iter().any(|t| key.starts_with(&self.table(t)))
    }

    fn key(&self, table: &str, name: &str) -> Vec<u8> {
        format!("{}/{table}/{name}", self.prefix).into_bytes()
    }

    fn table(&self, table: &str) -> Vec<u8> {
        format!("{}/{table}/", self.prefix).into_bytes()
    }

    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn grouped(&self) -> bool {
        self.grouped.load(std::sync::atomic::Ordering::Acquire)
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
        match self.read(&key)? {
            Some(e) if e.value == SCHEMA_VERSION.as_bytes() => Ok(()),
            Some(e) => Err(StoreError::Schema {
                found: String::from_utf8_lossy(&e.value).into_owned(),
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

    /// One key, as the open group left it or else as etcd has it.
    fn read(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        if let Some(written) = self.pending().get(key) {
            return Ok(written.as_ref().map(|value| Entry {
                key: key.to_vec(),
                value: value.clone(),
                mod_revision: 0,
            }));
        }
        if self.copied(key) {
            return Ok(self.rows().and_then(|rows| rows.get(key).cloned()));
        }
        let r = self.call(|mut kv| {
            let key = key.to_vec();
            async move { kv.get(key, None).await }
        })?;
        Ok(r.kvs().first().map(Entry::from))
    }

    /// Every key under `prefix`, by key, with the open group's writes.
    fn read_prefix(&self, prefix: Vec<u8>) -> Result<Vec<Entry>, StoreError> {
        let mut merged: std::collections::BTreeMap<Vec<u8>, Entry> = match self.rows() {
            Some(rows) if self.copied(&prefix) => rows
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            _ => {
                let r = self.call(|mut kv| {
                    let prefix = prefix.clone();
                    async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
                })?;
                r.kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), Entry::from(kv)))
                    .collect()
            }
        };
        for (key, written) in self.pending().range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            match written {
                Some(value) => {
                    merged.insert(
                        key.clone(),
                        Entry {
                            key: key.clone(),
                            value: value.clone(),
                            mod_revision: 0,
                        },
                    );
                }
                None => {
                    merged.remove(key);
                }
            }
        }
        Ok(merged.into_values().collect())
    }

    /// Commits `txn` under the fence: the revision it was committed at when
    /// its own comparisons held, `None` when one of them failed (a
    /// concurrent change: read again), [`StoreError::Fenced`] when the
    /// leadership is gone.
    fn commit(&self, txn: Txn) -> Result<Option<i64>, StoreError> {
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
        let revision = r.header().map_or(0, |h| h.revision());
        match r.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) => Ok(inner.succeeded().then_some(revision)),
            other => Err(StoreError::Backend(format!(
                "etcd: unexpected transaction answer {other:?}"
            ))),
        }
    }

    /// Writes `ops` (key → value, or `None` to delete) if every `seen`
    /// entry is unchanged: at once, or into the open group (committed at its
    /// end with the same comparisons). `Ok(false)` when something changed
    /// meanwhile.
    fn write(
        &self,
        seen: &[(Vec<u8>, Option<&Entry>)],
        ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<bool, StoreError> {
        if self.fence.is_none() {
            return Err(StoreError::NotLeader);
        }
        if self.grouped() {
            self.pending().extend(ops);
            return Ok(true);
        }
        let compares: Vec<Compare> = seen
            .iter()
            .map(|(key, entry)| unchanged(key.clone(), entry.map(|e| e.mod_revision)))
            .collect();
        let Some(revision) = self.commit(Txn::new().when(compares).and_then(puts(&ops)))? else {
            // Someone wrote behind the leader's copy (an operator with
            // etcdctl): read those keys again so the retry builds on them.
            self.refresh(seen.iter().map(|(k, _)| k.clone()))?;
            return Ok(false);
        };
        self.remember(ops, revision);
        Ok(true)
    }

    /// Reads `keys` from etcd into the leader's copy.
    fn refresh(&self, keys: impl Iterator<Item = Vec<u8>>) -> Result<(), StoreError> {
        if self.rows.is_none() {
            return Ok(());
        }
        for key in keys {
            let r = self.call(|mut kv| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })?;
            if let Some(mut rows) = self.rows() {
                match r.kvs().first() {
                    Some(kv) => rows.insert(key, Entry::from(kv)),
                    None => rows.remove(&key),
                };
            }
        }
        Ok(())
    }

    /// Updates the leader's copy with writes etcd committed at `revision`.
    fn remember(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>, revision: i64) {
        if let Some(mut rows) = self.rows() {
            for (key, value) in ops {
                match value {
                    Some(value) => {
                        rows.insert(
                            key.clone(),
                            Entry {
                                key,
                                value,
                                mod_revision: revision,
                            },
                        );
                    }
                    None => {
                        rows.remove(&key);
                    }
                }
            }
        }
    }
}

impl Store for EtcdStore {
    fn define(&self, def: NewDefinition) -> Result<VmRow, StoreError> {
        let key = self.key("definitions", &def.name);
        let uuid_key = self.key("uuids", &def.uuid);
        for _ in 0..CAS_ATTEMPTS {
            let existing_entry = self.read(&key)?;
            let holder_entry = self.read(&uuid_key)?;
            let existing: Option<VmRow> = existing_entry.as_ref().map(decode).transpose()?;
            let holder = holder_entry
                .as_ref()
                .map(|e| String::from_utf8_lossy(&e.value).into_owned());
            let before = existing.clone();
            let row = defined_row(existing, holder.as_deref(), def.clone())?;
            if Some(&row) == before.as_ref() {
                return Ok(row);
            }
            let seen = [
                (key.clone(), existing_entry.as_ref()),
                (uuid_key.clone(), holder_entry.as_ref()),
            ];
            let ops = vec![
                (key.clone(), Some(encode(&row)?)),
                (uuid_key.clone(), Some(row.name.clone().into_bytes())),
            ];
            if self.write(&seen, ops)? {
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
            let Some(entry) = self.read(&key)? else {
                return Err(StoreError::NotFound(name.to_string()));
            };
            let row: VmRow = decode(&entry)?;
            let ops = vec![(key.clone(), None), (self.key("uuids", &row.uuid), None)];
            if self.write(&[(key.clone(), Some(&entry))], ops)? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!(
            "etcd: definition '{name}' kept changing under {CAS_ATTEMPTS} attempts to remove it"
        )))
    }

    fn get(&self, name: &str) -> Result<Option<VmRow>, StoreError> {
        self.read(&self.key("definitions", name))?
            .as_ref()
            .map(decode)
            .transpose()
    }

    fn list(&self) -> Result<Vec<VmRow>, StoreError> {
        // By key, so by name as redb lists them.
        self.read_prefix(self.table("definitions"))?
            .iter()
            .map(decode)
            .collect()
    }

    fn update_row(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut VmRow),
    ) -> Result<VmRow, StoreError> {
        let key = self.key("definitions", name);
        for _ in 0..CAS_ATTEMPTS {
            let Some(entry) = self.read(&key)? else {
                return Err(StoreError::NotFound(name.to_string()));
            };
            let mut row: VmRow = decode(&entry)?;
            change(&mut row);
            let ops = vec![(key.clone(), Some(encode(&row)?))];
            if self.write(&[(key.clone(), Some(&entry))], ops)? {
                return Ok(row);
            }
        }
        Err(StoreError::Backend(format!(
            "etcd: definition '{name}' kept changing under {CAS_ATTEMPTS} attempts to update it"
        )))
    }

    fn put_host(&self, host: &HostRow, _durable: bool) -> Result<(), StoreError> {
        let ops = vec![(self.key("hosts", &host.name), Some(encode(host)?))];
        self.write(&[], ops).map(|_| ())
    }

    fn get_host(&self, name: &str) -> Result<Option<HostRow>, StoreError> {
        self.read(&self.key("hosts", name))?
            .as_ref()
            .map(decode)
            .transpose()
    }

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.read_prefix(self.table("hosts"))?
            .iter()
            .map(decode)
            .collect()
    }

    fn begin_group(&self) {
        self.grouped
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn end_group(&self) -> Result<(), StoreError> {
        self.grouped
            .store(false, std::sync::atomic::Ordering::Release);
        let pending: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            std::mem::take(&mut *self.pending()).into_iter().collect();
        // In chunks within etcd's limits, each fenced and comparing every key
        // with the revision the leader's copy holds. Should one fail, the
        // caller stops the process (the core believes them all).
        let mut chunk = Vec::new();
        let mut bytes = 0;
        let mut rest = pending.into_iter().peekable();
        while let Some((key, value)) = rest.next() {
            bytes += key.len() + value.as_ref().map_or(0, Vec::len);
            chunk.push((key, value));
            if chunk.len() >= GROUP_OPS || bytes >= GROUP_BYTES || rest.peek().is_none() {
                let ops = std::mem::take(&mut chunk);
                bytes = 0;
                let compares: Vec<Compare> = {
                    let rows = self.rows();
                    ops.iter()
                        .map(|(key, _)| {
                            let seen = rows
                                .as_ref()
                                .and_then(|r| r.get(key))
                                .map(|e| e.mod_revision);
                            unchanged(key.clone(), seen)
                        })
                        .collect()
                };
                match self.commit(Txn::new().when(compares).and_then(puts(&ops)))? {
                    Some(revision) => self.remember(ops, revision),
                    None => {
                        return Err(StoreError::Backend(
                            "etcd: a group's rows changed behind the leader; refusing to overwrite them"
                                .into(),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

/// The comparison that a key is as last seen: its `mod_revision`, or absent.
fn unchanged(key: Vec<u8>, mod_revision: Option<i64>) -> Compare {
    match mod_revision {
        Some(r) => Compare::mod_revision(key, CompareOp::Equal, r),
        None => Compare::version(key, CompareOp::Equal, 0),
    }
}

/// Puts and deletes for `ops`.
fn puts(ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<TxnOp> {
    ops.iter()
        .map(|(key, value)| match value {
            Some(v) => TxnOp::put(key.clone(), v.clone(), None),
            None => TxnOp::delete(key.clone(), None),
        })
        .collect()
}
