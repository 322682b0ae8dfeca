//! The coordinator's durable state, behind the [`Store`] trait.
//!
//! The default backend is redb, embedded in `--data-dir`; the trait is small
//! so the replicated backend ([`crate::etcd_store`], `--store etcd`) replaces
//! it without touching callers. A write is
//! durable when the call returns (redb commits with `Durability::Immediate`),
//! so an operator who heard "ok" never loses a definition to a crash.
//!
//! Group commit: between [`Store::begin_group`] and [`Store::end_group`],
//! writes commit without waiting for the disk (visible to reads at once)
//! and `end_group` makes them all durable with one fsync. The fleet's core
//! thread opens a group around every batch of inputs it takes off its queue
//! and carries out none of the batch's effects (acknowledgements, agent
//! calls) until `end_group` returned, so "durable on acknowledgement" and
//! "recorded before sent" hold for the batch as they did for each write.
//!
//! Schema (one place, never renamed; a retired table is left in place):
//!
//! | table         | key        | value                    | written by      |
//! |---------------|------------|--------------------------|-----------------|
//! | `meta`        | `"schema"` | schema version (`"1"`)   | open            |
//! | `definitions` | VM name    | [`VmRow`] as JSON        | define/start/…  |
//! | `uuids`       | VM UUID    | VM name                  | define/undefine |
//! | `hosts`       | host name  | [`HostRow`] as JSON      | agent register  |

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const DEFINITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("definitions");
const UUIDS: TableDefinition<&str, &str> = TableDefinition::new("uuids");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
pub(crate) const SCHEMA_VERSION: &str = "1";

/// A stored VM: its definition and where the fleet wants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRow {
    /// Name (key).
    pub name: String,
    /// UUID, unique across the fleet.
    pub uuid: String,
    /// The persistent, host-independent definition XML.
    pub xml: String,
    /// Bumped on every define.
    pub generation: u64,
    /// Whether an operator wants it running.
    pub want_running: bool,
    /// The host it runs on, as far as the coordinator knows.
    pub placement: Option<String>,
    /// The destination of a live migration that may have moved it there:
    /// written before the migration starts and cleared once the VM is known
    /// to run on exactly one of the two hosts, so a coordinator that
    /// restarts mid-migration knows which other host may run it.
    #[serde(default)]
    pub migrating_to: Option<String>,
    /// Raised each time the coordinator restarts the VM elsewhere after
    /// fencing its host, before the start is sent: a copy reported with a
    /// lower number is stale and is killed.
    #[serde(default)]
    pub incarnation: u64,
    /// Whether the copy that runs now enforces HA (it was started from a
    /// definition with HA on, or its host reported so): only such a copy
    /// dies when its host's lease lapses, so only it may be restarted
    /// elsewhere. A definition edited while the VM runs changes this only
    /// at the next start.
    #[serde(default)]
    pub ha_running: bool,
}

/// A host the fleet has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    /// Name (key).
    pub name: String,
    /// CPUs it reported.
    pub cpus: u32,
    /// Memory it reported, in MiB.
    pub memory_mib: u64,
    /// The scheduler must not place here.
    pub draining: bool,
    /// The fencing it last reported: a host that never said it has a working
    /// fence gets no automatic HA restart, also after a coordinator restart.
    #[serde(default)]
    pub fence: flotilla_shared::proto::FenceReport,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed.
    #[error("store: {0}")]
    Backend(String),
    /// The database was written by a newer Flotilla.
    #[error("store schema version {found} is not {expected}; refusing to touch it")]
    Schema {
        /// What the file says.
        found: String,
        /// What this build writes.
        expected: &'static str,
    },
    /// The name is taken by another UUID.
    #[error("domain '{name}' already exists with uuid {uuid}")]
    NameTaken {
        /// The name.
        name: String,
        /// The UUID holding it.
        uuid: String,
    },
    /// The UUID is taken by another name.
    #[error("domain '{name}' is already defined with uuid {uuid}")]
    UuidTaken {
        /// The name holding the UUID.
        name: String,
        /// The UUID.
        uuid: String,
    },
    /// No such VM.
    #[error("failed to get domain '{0}': no domain with matching name")]
    NotFound(String),
    /// This coordinator's leadership ended before the write (etcd refused
    /// the transaction on the election key): nothing was written.
    #[error("store: write refused: this coordinator is no longer the leader (its election key of epoch {epoch} is gone)")]
    Fenced {
        /// The epoch it led in.
        epoch: i64,
    },
    /// A follower does not write.
    #[error("store: this coordinator is a follower and does not write")]
    NotLeader,
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The row a define stores over `existing` (the row of that name, if any),
/// with `uuid_holder` the name that holds the new UUID, if any: names and
/// UUIDs stay unique, and a redefinition keeps where the VM runs. The same
/// XML again changes nothing (not even the generation), so a client that
/// retries a define whose answer it lost cannot apply it twice.
pub(crate) fn defined_row(
    existing: Option<VmRow>,
    uuid_holder: Option<&str>,
    def: NewDefinition,
) -> Result<VmRow, StoreError> {
    if let Some(e) = &existing {
        if e.uuid != def.uuid {
            return Err(StoreError::NameTaken {
                name: def.name,
                uuid: e.uuid.clone(),
            });
        }
    }
    if let Some(holder) = uuid_holder {
        if holder != def.name {
            return Err(StoreError::UuidTaken {
                name: holder.to_string(),
                uuid: def.uuid,
            });
        }
    }
    if let Some(e) = existing.as_ref().filter(|e| e.xml == def.xml) {
        return Ok(e.clone());
    }
    Ok(VmRow {
        generation: existing.as_ref().map_or(1, |e| e.generation + 1),
        want_running: existing.as_ref().is_some_and(|e| e.want_running),
        migrating_to: existing.as_ref().and_then(|e| e.migrating_to.clone()),
        incarnation: existing.as_ref().map_or(0, |e| e.incarnation),
        ha_running: existing.as_ref().is_some_and(|e| e.ha_running),
        placement: existing.and_then(|e| e.placement),
        name: def.name,
        uuid: def.uuid,
        xml: def.xml,
    })
}

/// What a define asks to store.
#[derive(Debug, Clone)]
pub struct NewDefinition {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Persistent XML.
    pub xml: String,
}

/// The coordinator's durable state.
pub trait Store: Send + Sync {
    /// Stores or updates a definition; names and UUIDs stay unique. Durable on return.
    fn define(&self, def: NewDefinition) -> Result<VmRow, StoreError>;
    /// Removes a definition.
    fn undefine(&self, name: &str) -> Result<(), StoreError>;
    /// One VM.
    fn get(&self, name: &str) -> Result<Option<VmRow>, StoreError>;
    /// Every VM, by name.
    fn list(&self) -> Result<Vec<VmRow>, StoreError>;
    /// Changes one stored VM in one durable write (a backend with
    /// compare-and-swap does it here). Durable on return.
    fn update_row(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut VmRow),
    ) -> Result<VmRow, StoreError>;
    /// Records where a VM runs and whether it should. Durable on return.
    fn set_placement(
        &self,
        name: &str,
        placement: Option<String>,
        want_running: bool,
    ) -> Result<VmRow, StoreError> {
        self.update_row(name, &mut |row| {
            row.placement = placement.clone();
            row.want_running = want_running;
        })
    }
    /// Records (or clears) the destination of a migration that may move the
    /// VM. Durable on return.
    fn set_migrating_to(&self, name: &str, dest: Option<String>) -> Result<VmRow, StoreError> {
        self.update_row(name, &mut |row| row.migrating_to = dest.clone())
    }
    /// Records a host, durable on return when `durable` (operator state such as
    /// draining); host-reported facts need not be, as every registration
    /// reports them again, and waiting for the disk per host would serialize a
    /// fleet's reconnect behind one fsync each.
    fn put_host(&self, host: &HostRow, durable: bool) -> Result<(), StoreError>;
    /// One host.
    fn get_host(&self, name: &str) -> Result<Option<HostRow>, StoreError>;
    /// Every host, by name.
    fn hosts(&self) -> Result<Vec<HostRow>, StoreError>;
    /// From now until [`Store::end_group`], writes need not be durable when
    /// they return.
    fn begin_group(&self) {}
    /// Makes every write since [`Store::begin_group`] durable. Until it
    /// returns Ok, nothing that depends on those writes may leave the process.
    fn end_group(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The embedded redb backend.
pub struct RedbStore {
    db: Database,
    /// A group is open: writes commit with `Durability::None`.
    grouped: AtomicBool,
    /// A write of the open group is not durable yet.
    unsynced: AtomicBool,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let db = Database::create(dir.join("flotilla.redb")).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let found = meta
                .get("schema")
                .map_err(backend)?
                .map(|v| v.value().to_string());
            match found {
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(backend)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(found) => {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                    })
                }
            }
            txn.open_table(DEFINITIONS).map_err(backend)?;
            txn.open_table(UUIDS).map_err(backend)?;
            txn.open_table(HOSTS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(RedbStore {
            db,
            grouped: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
        })
    }

    /// A write transaction, durable on commit unless a group is open.
    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend)?;
        if self.grouped.load(Ordering::Acquire) {
            txn.set_durability(redb::Durability::None)
                .map_err(backend)?;
            self.unsynced.store(true, Ordering::Release);
        }
        Ok(txn)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(backend)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(backend)
}

impl Store for RedbStore {
    fn define(&self, def: NewDefinition) -> Result<VmRow, StoreError> {
        let txn = self.begin_write()?;
        let row = {
            let mut defs = txn.open_table(DEFINITIONS).map_err(backend)?;
            let mut uuids = txn.open_table(UUIDS).map_err(backend)?;
            let existing: Option<VmRow> = match defs.get(def.name.as_str()).map_err(backend)? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            };
            let holder = uuids.get(def.uuid.as_str()).map_err(backend)?;
            let row = defined_row(existing, holder.as_ref().map(|h| h.value()), def)?;
            drop(holder);
            defs.insert(row.name.as_str(), encode(&row)?.as_slice())
                .map_err(backend)?;
            uuids
                .insert(row.uuid.as_str(), row.name.as_str())
                .map_err(backend)?;
            row
        };
        txn.commit().map_err(backend)?;
        Ok(row)
    }

    fn undefine(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut defs = txn.open_table(DEFINITIONS).map_err(backend)?;
            let row: VmRow = match defs.remove(name).map_err(backend)? {
                Some(v) => decode(v.value())?,
                None => return Err(StoreError::NotFound(name.to_string())),
            };
            let mut uuids = txn.open_table(UUIDS).map_err(backend)?;
            uuids.remove(row.uuid.as_str()).map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    fn get(&self, name: &str) -> Result<Option<VmRow>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let defs = txn.open_table(DEFINITIONS).map_err(backend)?;
        match defs.get(name).map_err(backend)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn list(&self) -> Result<Vec<VmRow>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let defs = txn.open_table(DEFINITIONS).map_err(backend)?;
        let mut out = Vec::new();
        for item in defs.iter().map_err(backend)? {
            let (_, v) = item.map_err(backend)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn update_row(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut VmRow),
    ) -> Result<VmRow, StoreError> {
        let txn = self.begin_write()?;
        let row = {
            let mut defs = txn.open_table(DEFINITIONS).map_err(backend)?;
            let mut row: VmRow = match defs.get(name).map_err(backend)? {
                Some(v) => decode(v.value())?,
                None => return Err(StoreError::NotFound(name.to_string())),
            };
            change(&mut row);
            defs.insert(name, encode(&row)?.as_slice())
                .map_err(backend)?;
            row
        };
        txn.commit().map_err(backend)?;
        Ok(row)
    }

    fn put_host(&self, host: &HostRow, durable: bool) -> Result<(), StoreError> {
        let mut txn = self.begin_write()?;
        if !durable {
            // Persisted with the next durable commit, or reported again.
            txn.set_durability(redb::Durability::None)
                .map_err(backend)?;
        }
        {
            let mut hosts = txn.open_table(HOSTS).map_err(backend)?;
            hosts
                .insert(host.name.as_str(), encode(host)?.as_slice())
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    fn get_host(&self, name: &str) -> Result<Option<HostRow>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let hosts = txn.open_table(HOSTS).map_err(backend)?;
        let row = hosts.get(name).map_err(backend)?;
        row.map(|v| decode(v.value())).transpose()
    }

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let hosts = txn.open_table(HOSTS).map_err(backend)?;
        let mut out = Vec::new();
        for item in hosts.iter().map_err(backend)? {
            let (_, v) = item.map_err(backend)?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn begin_group(&self) {
        self.grouped.store(true, Ordering::Release);
    }

    fn end_group(&self) -> Result<(), StoreError> {
        self.grouped.store(false, Ordering::Release);
        if !self.unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // An empty durable commit persists every non-durable one before it.
        let txn = self.db.begin_write().map_err(backend)?;
        txn.commit().map_err(backend)
    }
}

/// An in-memory store with the same rules as [`RedbStore`], for the
/// deterministic simulation and unit tests. "Durable" means: it outlives the
/// [`crate::fleet_core::FleetCore`] that wrote it, as a database outlives a
/// crashed coordinator. `fail_writes` makes every write fail, as a full or
/// broken disk would.
#[derive(Default)]
pub struct MemStore {
    state: std::sync::Mutex<MemTables>,
    /// While true, every write fails with a backend error.
    pub fail_writes: std::sync::atomic::AtomicBool,
}

#[derive(Default, Clone)]
struct MemTables {
    definitions: std::collections::BTreeMap<String, VmRow>,
    uuids: std::collections::BTreeMap<String, String>,
    hosts: std::collections::BTreeMap<String, HostRow>,
}

impl MemStore {
    fn tables(&self) -> Result<std::sync::MutexGuard<'_, MemTables>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Backend("poisoned".into()))
    }

    fn writable(&self) -> Result<std::sync::MutexGuard<'_, MemTables>, StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Backend("write failed (injected)".into()));
        }
        self.tables()
    }
}

impl Store for MemStore {
    fn define(&self, def: NewDefinition) -> Result<VmRow, StoreError> {
        let mut t = self.writable()?;
        let existing = t.definitions.get(&def.name).cloned();
        let row = defined_row(existing, t.uuids.get(&def.uuid).map(String::as_str), def)?;
        t.uuids.insert(row.uuid.clone(), row.name.clone());
        t.definitions.insert(row.name.clone(), row.clone());
        Ok(row)
    }

    fn undefine(&self, name: &str) -> Result<(), StoreError> {
        let mut t = self.writable()?;
        let row = t
            .definitions
            .remove(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        t.uuids.remove(&row.uuid);
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Option<VmRow>, StoreError> {
        Ok(self.tables()?.definitions.get(name).cloned())
    }

    fn list(&self) -> Result<Vec<VmRow>, StoreError> {
        Ok(self.tables()?.definitions.values().cloned().collect())
    }

    fn update_row(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut VmRow),
    ) -> Result<VmRow, StoreError> {
        let mut t = self.writable()?;
        let row = t
            .definitions
            .get_mut(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        change(row);
        Ok(row.clone())
    }

    fn put_host(&self, host: &HostRow, _durable: bool) -> Result<(), StoreError> {
        self.writable()?
            .hosts
            .insert(host.name.clone(), host.clone());
        Ok(())
    }

    fn get_host(&self, name: &str) -> Result<Option<HostRow>, StoreError> {
        Ok(self.tables()?.hosts.get(name).cloned())
    }

    fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        Ok(self.tables()?.hosts.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, uuid: &str) -> NewDefinition {
        NewDefinition {
            name: name.into(),
            uuid: uuid.into(),
            xml: format!("<domain><name>{name}</name></domain>"),
        }
    }

    #[test]
    fn define_is_unique_by_name_and_uuid_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = RedbStore::open(dir.path()).expect("open");
            assert_eq!(s.define(def("web01", "u1")).expect("define").generation, 1);
            assert_eq!(
                s.define(def("web01", "u1")).expect("same again").generation,
                1,
                "the same XML again is a no-op: a retried define is not applied twice"
            );
            let mut changed = def("web01", "u1");
            changed.xml.push_str("<!-- edited -->");
            assert_eq!(s.define(changed).expect("redefine").generation, 2);
            let e = s.define(def("web01", "u2")).expect_err("name taken");
            assert_eq!(e.to_string(), "domain 'web01' already exists with uuid u1");
            let e = s.define(def("web02", "u1")).expect_err("uuid taken");
            assert_eq!(
                e.to_string(),
                "domain 'web01' is already defined with uuid u1"
            );
            s.set_placement("web01", Some("host-a".into()), true)
                .expect("place");
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        let row = s.get("web01").expect("get").expect("present");
        assert_eq!(row.generation, 2);
        assert_eq!(row.placement.as_deref(), Some("host-a"));
        assert_eq!(
            s.list().expect("list").len(),
            1,
            "rejected defines stored nothing"
        );
        s.undefine("web01").expect("undefine");
        assert!(
            s.define(def("web02", "u1")).is_ok(),
            "uuid freed by undefine"
        );
        assert_eq!(
            s.undefine("nope").expect_err("missing").to_string(),
            "failed to get domain 'nope': no domain with matching name"
        );
    }

    #[test]
    fn host_rows_read_back_with_or_without_fsync_and_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let row = |draining| HostRow {
            name: "host-a".into(),
            cpus: 4,
            memory_mib: 4096,
            draining,
            fence: Default::default(),
        };
        {
            let s = RedbStore::open(dir.path()).expect("open");
            assert_eq!(s.get_host("host-a").expect("get"), None);
            s.put_host(&row(false), false).expect("facts");
            assert_eq!(s.get_host("host-a").expect("get"), Some(row(false)));
            s.put_host(&row(true), true).expect("drain");
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get_host("host-a").expect("get"), Some(row(true)));
        assert_eq!(s.hosts().expect("hosts"), vec![row(true)]);
    }

    #[test]
    fn a_group_is_visible_at_once_and_durable_after_end_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = RedbStore::open(dir.path()).expect("open");
            s.begin_group();
            s.define(def("web01", "6f3c1a52-2f4e-4a59-9d3e-5a0c2b9d1e11"))
                .expect("define");
            s.set_placement("web01", Some("host-a".into()), true)
                .expect("place");
            // Read back inside the group, before any fsync.
            let row = s.get("web01").expect("get").expect("defined");
            assert_eq!(row.placement.as_deref(), Some("host-a"));
            assert!(
                s.unsynced.load(Ordering::Acquire),
                "the group owes an fsync"
            );
            s.end_group().expect("durable");
            assert!(!s.unsynced.load(Ordering::Acquire));
            // Outside a group, writes are durable on return again.
            s.set_placement("web01", None, false).expect("stop");
            assert!(!s.unsynced.load(Ordering::Acquire));
            s.begin_group();
            s.set_placement("web01", Some("host-b".into()), true)
                .expect("place");
            s.end_group().expect("durable");
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        let row = s.get("web01").expect("get").expect("survived");
        assert_eq!(row.placement.as_deref(), Some("host-b"));
        assert!(row.want_running);
    }
}
