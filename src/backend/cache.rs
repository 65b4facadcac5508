//! A persistent response cache around any backend (feature `cache`): [`Cached`] and its
//! store, [`Cache`].
//!
//! Every successful completion is stored in an embedded ACID database (redb) under a key
//! derived from the request, so a rerun after a crash, or after a change that leaves the
//! requests as they were (the parser, the output format, the ledger), sends no request twice.
//! Errors are never stored: a failed call is made again next time.
//!
//! **Key.** SHA-256 of the JSON of `{"v": "rmboost/cache/v1", "backend": name, "model":
//! model, "request": request}`, where `name` and `model` are the wrapped backend's
//! [`LlmBackend::name`] and [`LlmBackend::model`] and `request` is the whole
//! [`CompletionRequest`] (messages, temperature, top-p, max tokens, seed, stop) serialised by
//! serde in field order. The version tag changes whenever this encoding does, so an old cache
//! is never misread: it is simply missed.
//!
//! **Value.** The [`Completion`] as JSON, as the backend returned it (its usage counts the
//! tokens of the original call).
//!
//! **Concurrency.** Lookups run in [`tokio::task::spawn_blocking`] and in parallel (redb reads
//! do not block each other). Writes go to one writer thread that commits whatever has queued
//! up in one durable transaction (group commit), so many concurrent callers cost one `fsync`
//! per batch; a call returns once its completion is committed. The database file is locked:
//! a second process opening it gets an error. Must be used inside a tokio runtime.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::Error> {
//! use rmboost::backend::cache::{Cache, Cached};
//! use rmboost::testing::ScriptedBackend;
//! use rmboost::{CompletionRequest, LlmBackend, Message};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let cache = Cache::open(dir.path().join("responses.redb"))?;
//! let model = ScriptedBackend::from_fn(|_| Ok(rmboost::Completion::new("hello")));
//! let backend = Cached::new(model.clone(), cache.clone());
//! let request = CompletionRequest::new(vec![Message::user("hi")]).with_seed(1);
//! backend.complete(request.clone()).await.unwrap();
//! backend.complete(request).await.unwrap();
//! assert_eq!(model.calls(), 1);
//! assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use futures::channel::oneshot;
use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition, TableError};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::backend::{Completion, CompletionRequest, LlmBackend};
use crate::error::BackendError;
use crate::Error;

const TABLE: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("completions_v1");
const VERSION: &str = "rmboost/cache/v1";
/// The most writes committed in one transaction.
const MAX_BATCH: usize = 512;
/// The memory redb may use to cache pages of the database. Its default (1 GiB) lets the
/// process grow with the database: about 2 KB per example, so hundreds of MB for a long run.
/// Lookups of recent keys stay in the operating system's page cache anyway.
const DB_CACHE_BYTES: usize = 16 << 20;

/// The cache key of a request sent to a backend with this name and model; see the
/// [module docs](self).
#[must_use]
pub fn cache_key(backend: &str, model: &str, request: &CompletionRequest) -> [u8; 32] {
    #[derive(Serialize)]
    struct Key<'a> {
        v: &'static str,
        backend: &'a str,
        model: &'a str,
        request: &'a CompletionRequest,
    }
    let json = serde_json::to_vec(&Key {
        v: VERSION,
        backend,
        model,
        request,
    })
    .expect("a request always serialises");
    Sha256::digest(&json).into()
}

/// Counters of a [`Cache`] since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing (the backend was called).
    pub misses: u64,
    /// Completions stored.
    pub stored: u64,
    /// Reads or writes that failed (logged; the call went on without the cache).
    pub errors: u64,
}

type Reply = oneshot::Sender<Result<(), String>>;

enum Command {
    Put {
        key: [u8; 32],
        value: Vec<u8>,
        reply: Reply,
    },
    Clear {
        reply: Reply,
    },
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    tx: Option<mpsc::Sender<Command>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    stored: AtomicU64,
    errors: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer commit what is queued and end; joining it
        // releases the database before the file can be opened again.
        self.tx = None;
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// An open response cache; cheap to clone (every clone shares the database and counters).
///
/// See the [module docs](self) for the key, the value and concurrency.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .finish()
    }
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("response cache: {e}")),
    }
}

impl Cache {
    /// Opens the cache at `path`, creating it if needed.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file cannot be created or opened, is not a cache, or is open in
    /// another process (kind [`std::io::ErrorKind::WouldBlock`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let db = redb::Builder::new()
            .set_cache_size(DB_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "response cache is open in another process",
                    ),
                },
                e => db_err(path, e),
            })?;
        // Make sure the table exists, so readers never see it missing.
        let txn = db.begin_write().map_err(|e| db_err(path, e))?;
        txn.open_table(TABLE).map_err(|e| db_err(path, e))?;
        txn.commit().map_err(|e| db_err(path, e))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("rmboost-cache-writer".into())
            .spawn(move || writer_loop(&writer_db, &rx))
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(Cache {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                tx: Some(tx),
                writer: Mutex::new(Some(writer)),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                stored: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The counters since the cache was opened.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        let i = &*self.inner;
        CacheStats {
            hits: i.hits.load(Ordering::Relaxed),
            misses: i.misses.load(Ordering::Relaxed),
            stored: i.stored.load(Ordering::Relaxed),
            errors: i.errors.load(Ordering::Relaxed),
        }
    }

    async fn send(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), String> {
        let (reply, done) = oneshot::channel();
        let tx = self.inner.tx.as_ref().ok_or("cache closed")?;
        tx.send(make(reply)).map_err(|_| "cache writer stopped")?;
        done.await.map_err(|_| "cache writer stopped".to_string())?
    }

    /// Removes every stored completion.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the database cannot be written.
    pub async fn clear(&self) -> Result<(), Error> {
        self.send(|reply| Command::Clear { reply })
            .await
            .map_err(|e| db_err(&self.inner.path, e))
    }

    /// How many completions are stored.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the database cannot be read.
    pub async fn entries(&self) -> Result<u64, Error> {
        let db = self.inner.db.clone();
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            match txn.open_table(TABLE) {
                Ok(t) => t.len().map_err(|e| e.to_string()),
                Err(TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|e| db_err(&path, e))?
        .map_err(|e| db_err(&path, e))
    }

    /// Looks `key` up; `None` on a miss or a read error (counted in
    /// [`CacheStats::errors`]).
    pub async fn get(&self, key: [u8; 32]) -> Option<Completion> {
        let db = self.inner.db.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, String> {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let table = match txn.open_table(TABLE) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let value = table.get(&key[..]).map_err(|e| e.to_string())?;
            Ok(value.map(|v| v.value().to_vec()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let bytes = match found {
            Ok(Some(b)) => b,
            Ok(None) => {
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(e) => {
                self.inner.errors.fetch_add(1, Ordering::Relaxed);
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "response cache: read failed; calling the backend");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(c) => {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                Some(c)
            }
            Err(e) => {
                self.inner.errors.fetch_add(1, Ordering::Relaxed);
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "response cache: unreadable entry; calling the backend");
                None
            }
        }
    }

    /// Stores `completion` under `key` and waits until it is committed. A failure is logged
    /// and counted in [`CacheStats::errors`], never returned: the cache is an optimisation.
    pub async fn put(&self, key: [u8; 32], completion: &Completion) {
        let value = serde_json::to_vec(completion).expect("a completion always serialises");
        match self.send(|reply| Command::Put { key, value, reply }).await {
            Ok(()) => {
                self.inner.stored.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.inner.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "response cache: write failed");
            }
        }
    }
}

fn writer_loop(db: &Database, rx: &mpsc::Receiver<Command>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let result = commit_batch(db, &batch);
        for cmd in batch {
            let reply = match cmd {
                Command::Put { reply, .. } | Command::Clear { reply } => reply,
            };
            let _ = reply.send(result.clone());
        }
    }
}

fn commit_batch(db: &Database, batch: &[Command]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
        for cmd in batch {
            match cmd {
                Command::Put { key, value, .. } => {
                    table
                        .insert(&key[..], &value[..])
                        .map_err(|e| e.to_string())?;
                }
                Command::Clear { .. } => {
                    table.retain(|_, _| false).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// A backend whose successful completions are served from, and stored in, a [`Cache`].
///
/// Its [`name`](LlmBackend::name) and [`model`](LlmBackend::model) are the wrapped backend's,
/// so wrapping does not change cache keys of wrappers further out. Put it *outside* a retry
/// wrapper (`Cached<Retry<B>>`), so a hit skips the retries too.
#[derive(Debug, Clone)]
pub struct Cached<B> {
    inner: B,
    cache: Cache,
}

impl<B: LlmBackend> Cached<B> {
    /// Wraps `inner` with `cache`.
    pub fn new(inner: B, cache: Cache) -> Self {
        Cached { inner, cache }
    }

    /// The cache.
    #[must_use]
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The wrapped backend.
    #[must_use]
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Cached<B> {
    /// Answers from the cache, or calls the wrapped backend and stores a success.
    ///
    /// # Errors
    ///
    /// The wrapped backend's error (never cached); cache failures are not errors.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the backend answered may still store the answer.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let key = cache_key(&self.inner.name(), &self.inner.model(), &request);
        if let Some(hit) = self.cache.get(key).await {
            return Ok(hit);
        }
        let completion = self.inner.complete(request).await?;
        self.cache.put(key, &completion).await;
        Ok(completion)
    }

    fn name(&self) -> Cow<'_, str> {
        self.inner.name()
    }

    fn model(&self) -> Cow<'_, str> {
        self.inner.model()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Message;

    #[test]
    fn key_depends_on_everything() {
        let r = CompletionRequest::new(vec![Message::user("hi")]).with_seed(1);
        let k = cache_key("openai", "m", &r);
        assert_eq!(k, cache_key("openai", "m", &r.clone()));
        assert_ne!(k, cache_key("local", "m", &r));
        assert_ne!(k, cache_key("openai", "m2", &r));
        assert_ne!(k, cache_key("openai", "m", &r.clone().with_seed(2)));
        let mut t = r.clone();
        t.temperature = Some(0.5);
        assert_ne!(k, cache_key("openai", "m", &t));
        let mut s = r.clone();
        s.stop.push("x".into());
        assert_ne!(k, cache_key("openai", "m", &s));
        let mut m = r;
        m.max_tokens = Some(5);
        assert_ne!(k, cache_key("openai", "m", &m));
    }
}
