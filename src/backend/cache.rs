//! A persistent response cache around any backend (feature `cache`): [`Cached`] and its
//! store, [`Cache`].
//!
//! Every successful completion is stored in an embedded ACID database (redb) under a key
//! derived from the request, so a rerun after a crash, or after a change that leaves the
//! requests as they were (the parser, the output format, the ledger), sends no request twice.
//! Errors are never stored: a failed call is made again next time. Nor is an empty answer
//! (blank text): it is never usable, and a server that sent one by mistake would otherwise
//! send it again to every rerun, so that the example it belongs to could never be written.
//!
//! **Key.** SHA-256 of the JSON of `{"v": "rmboost/cache/v2", "identity": identity,
//! "request": request}`, where `identity` is the wrapped backend's [`LlmBackend::identity`]
//! (for the HTTP backends the endpoint, the model and the settings that change answers, such
//! as extra body fields like `response_format`; for the local backend the SHA-256 of the model
//! file and its sampling defaults; never a key) and `request` is the whole
//! [`CompletionRequest`] (messages, temperature, top-p, max tokens, seed, stop) serialised by
//! serde in field order. So two servers that answer under the same model name, or two model
//! files of the same name, do not share answers. The version tag changes whenever this
//! encoding does, so an old cache is never misread: it is simply missed (`v1` keys held the
//! backend's name and model only).
//!
//! **Value.** The [`Completion`] as JSON, as the backend returned it (its usage counts the
//! tokens of the original call).
//!
//! **Concurrency and durability.** Lookups read the database on the calling task, in
//! parallel (redb reads block neither each other nor the writer). Writes are queued, in a bounded
//! queue, to one writer thread that commits whatever has gathered (for up to 20 ms) in one
//! transaction. At least every 100 ms, and for a flush, a clear or the cache's close, a
//! commit is made durable (one `fsync` for everything since the last). A call does not wait
//! for any commit: it returns once its completion is queued (waiting only while the queue is
//! full), and lookups find queued completions too.
//!
//! So a crash can lose about the last 0.1 s of completions stored, which only costs calling
//! them again (every request is seeded, so the call asks the same thing); the output file and
//! resume are what keep finished examples. [`Cache::flush`] waits for the durable commit of
//! everything queued before it, and dropping the last clone of a [`Cache`] commits what is
//! queued, durably, before it returns. The database file is locked: a second process opening
//! it gets an error. Must be used inside a tokio runtime.
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
//!
//! Design notes and measurements: see ARCHITECTURE.md in the repository.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::channel::oneshot;
use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::backend::{lock, Completion, CompletionRequest, LlmBackend};
use crate::error::BackendError;
use crate::Error;

const TABLE: TableDefinition<'static, &[u8], &[u8]> = TableDefinition::new("completions_v1");
const VERSION: &str = "rmboost/cache/v2";
/// The most writes committed in one transaction (its dirty pages, a few per write, are held in
/// memory until the commit).
const MAX_BATCH: usize = 256;
/// The most writes queued for the writer thread; a `put` beyond that waits (about 2 KB each,
/// so a few MB at most).
const QUEUE: usize = 1024;
/// How long the writer lets writes gather before a commit, unless a full batch or a flush
/// is waiting. Fewer, larger transactions cost the writer about a third less CPU per write.
const LINGER: Duration = Duration::from_millis(20);
/// The longest a commit stays not durable. Commits in between skip the `fsync` (redb's
/// `Durability::None`): at thousands of writes a second, ten `fsync`s a second instead of one
/// per 20 ms batch, and the writer costs about 13% less CPU per write. A crash can lose what
/// they stored, which only costs calling again.
const DURABLE_EVERY: Duration = Duration::from_millis(100);
/// The memory redb may use to cache pages of the database. Its default (1 GiB) lets the
/// process grow with the database: about 2 KB per example, so hundreds of MB for a long run.
/// Lookups of recent keys stay in the operating system's page cache anyway.
const DB_CACHE_BYTES: usize = 8 << 20;

/// The cache key of a request sent to a backend with this
/// [identity](LlmBackend::identity); see the [module docs](self).
#[must_use]
pub fn cache_key(identity: &str, request: &CompletionRequest) -> [u8; 32] {
    #[derive(Serialize)]
    struct Key<'a> {
        v: &'static str,
        identity: &'a str,
        request: &'a CompletionRequest,
    }
    // Serialised straight into the hash, without building the JSON first.
    let mut hash = Sha256::new();
    serde_json::to_writer(
        &mut hash,
        &Key {
            v: VERSION,
            identity,
            request,
        },
    )
    .expect("a request always serialises");
    hash.finalize().into()
}

/// Counters of a [`Cache`] since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Tokens (prompt and completion) of the answers given from the cache, as their original
    /// calls counted them: what the hits did not pay for again.
    pub hit_tokens: u64,
    /// Lookups that found nothing (the backend was called).
    pub misses: u64,
    /// Completions committed to the database (a completion still queued for the writer is
    /// not counted yet: [`Cache::flush`] first for an exact figure).
    pub stored: u64,
    /// Reads or writes that failed (logged; the call went on without the cache).
    pub errors: u64,
}

enum Command {
    /// A completion's JSON under its key.
    Put([u8; 32], Arc<Vec<u8>>),
    /// A durable commit of everything queued before, after clearing the table if `clear`.
    Sync {
        clear: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What the clones of a [`Cache`] and its writer thread share.
struct Shared {
    db: Database,
    stats: Mutex<CacheStats>,
    /// Completions queued but not yet committed, so a lookup finds them meanwhile. Holds at
    /// most the queue plus the batch being committed.
    pending: Mutex<HashMap<[u8; 32], Arc<Vec<u8>>>>,
}

struct Inner {
    shared: Arc<Shared>,
    path: PathBuf,
    tx: mpsc::Sender<Command>,
    /// Dropped after `tx` (fields are dropped in order): the closed channel lets the writer
    /// commit what is queued and end.
    _writer: Writer,
}

/// The writer thread, joined when dropped, which releases the database before the file can
/// be opened again.
struct Writer(Option<JoinHandle<()>>);

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
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
    Error::io(path, std::io::Error::other(format!("response cache: {e}")))
}

/// The stored bytes under `key`, if any.
fn read(db: &Database, key: &[u8; 32]) -> Result<Option<Vec<u8>>, redb::Error> {
    let table = db.begin_read()?.open_table(TABLE)?;
    Ok(table.get(&key[..])?.map(|v| v.value().to_vec()))
}

impl Cache {
    /// Opens the cache at `path`, creating it if needed.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file cannot be created or opened, is not a cache, or is open in
    /// another process (kind [`std::io::ErrorKind::WouldBlock`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let db = redb::Builder::new()
            .set_cache_size(DB_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "response cache is open in another process",
                    ),
                ),
                e => db_err(path, e),
            })?;
        // Make sure the table exists, so readers never see it missing.
        commit(&db, &[], true).map_err(|e| db_err(path, e))?;
        let shared = Arc::new(Shared {
            db,
            stats: Mutex::default(),
            pending: Mutex::default(),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("rmboost-cache-writer".into())
            .spawn(move || writer_loop(&writer_shared, rx))
            .map_err(|e| Error::io(path, e))?;
        Ok(Cache {
            inner: Arc::new(Inner {
                shared,
                path: path.to_path_buf(),
                tx,
                _writer: Writer(Some(writer)),
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
        *lock(&self.inner.shared.stats)
    }

    /// Queues a durable commit (after clearing the table if `clear`) and waits until it, so
    /// everything queued before it too, is done.
    async fn sync(&self, clear: bool) -> Result<(), Error> {
        let (reply, done) = oneshot::channel();
        // Should the writer be gone, the reply is dropped with the command.
        let _ = self.inner.tx.send(Command::Sync { clear, reply }).await;
        done.await
            .unwrap_or_else(|_| Err("cache writer stopped".to_string()))
            .map_err(|e| db_err(self.path(), e))
    }

    /// Removes every stored completion (and commits what was queued before).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the database cannot be written.
    pub async fn clear(&self) -> Result<(), Error> {
        self.sync(true).await
    }

    /// Waits until every completion [`put`](Self::put) before this call is committed.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the commit failed (the completions are then not stored; they were
    /// also counted in [`CacheStats::errors`]).
    pub async fn flush(&self) -> Result<(), Error> {
        self.sync(false).await
    }

    /// How many completions are committed (not counting those still queued: see
    /// [`flush`](Self::flush)). A read of the table's header, on the calling task.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the database cannot be read.
    pub async fn entries(&self) -> Result<u64, Error> {
        let db = &self.inner.shared.db;
        let count =
            || -> Result<u64, redb::Error> { Ok(db.begin_read()?.open_table(TABLE)?.len()?) };
        count().map_err(|e| db_err(self.path(), e))
    }

    /// Looks `key` up; `None` on a miss or a read error (counted in
    /// [`CacheStats::errors`]). Finds completions still queued for the writer too.
    pub async fn get(&self, key: [u8; 32]) -> Option<Completion> {
        let s = &*self.inner.shared;
        let queued = lock(&s.pending).get(&key).cloned();
        let parse = |b: &[u8]| {
            let parsed = serde_json::from_slice::<Completion>(b);
            parsed.map_err(|e| ("unreadable entry", e.to_string()))
        };
        let found = match queued {
            Some(v) => parse(&v).map(Some),
            None => read(&s.db, &key)
                .map_err(|e| ("read failed", e.to_string()))
                .and_then(|b| b.as_deref().map(parse).transpose()),
        };
        let hit = found.unwrap_or_else(|(what, e)| {
            lock(&s.stats).errors += 1;
            tracing::warn!(error = %e, "response cache: {what}; calling the backend");
            None
        });
        let mut stats = lock(&s.stats);
        match &hit {
            Some(c) => {
                stats.hits += 1;
                stats.hit_tokens += c.usage.total();
            }
            None => stats.misses += 1,
        }
        hit
    }

    /// Queues `completion` to be stored under `key`; returns once it is queued, not once it
    /// is committed (see [`flush`](Self::flush)). Waits only while the writer's queue is
    /// full. A failure is logged and counted in [`CacheStats::errors`], never returned: the
    /// cache is an optimisation.
    pub async fn put(&self, key: [u8; 32], completion: &Completion) {
        // Sized for the text and the rest of the JSON, so it is not grown as it is written.
        let mut value = Vec::with_capacity(completion.text.len() + completion.model.len() + 256);
        serde_json::to_writer(&mut value, completion).expect("a completion always serialises");
        // An `Arc<Vec>` rather than `Arc<[u8]>`, which would copy the bytes once more.
        let value = Arc::new(value);
        // Wait for room first, so a caller dropped meanwhile leaves nothing pending.
        match self.inner.tx.reserve().await {
            Ok(permit) => {
                lock(&self.inner.shared.pending).insert(key, value.clone());
                permit.send(Command::Put(key, value));
            }
            Err(_) => {
                lock(&self.inner.shared.stats).errors += 1;
                tracing::warn!(
                    error = "cache writer stopped",
                    "response cache: write failed"
                );
            }
        }
    }
}

fn writer_loop(shared: &Shared, mut rx: mpsc::Receiver<Command>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // When the last durable commit was, and whether commits since are not durable yet.
    let (mut last_durable, mut undurable) = (Instant::now(), false);
    let drain = |rx: &mut mpsc::Receiver<Command>, batch: &mut Vec<Command>| {
        while batch.len() < MAX_BATCH {
            let Ok(c) = rx.try_recv() else { break };
            batch.push(c);
        }
    };
    let is_put = |c: &Command| matches!(c, Command::Put(..));
    loop {
        // While a commit is not durable, wait no longer than until it must be.
        let next = if undurable {
            recv_until(&mut rx, last_durable + DURABLE_EVERY)
        } else {
            rx.blocking_recv()
        };
        match next {
            Some(c) => {
                batch.push(c);
                drain(&mut rx, &mut batch);
                // Nobody waits for a write: let more gather, so one transaction takes more
                // of them. A flush or clear is served at once.
                if batch.len() < MAX_BATCH && batch.iter().all(is_put) {
                    std::thread::sleep(LINGER);
                    drain(&mut rx, &mut batch);
                }
            }
            // The cache is closed and every commit is durable.
            None if !undurable => return,
            // The period is over (or the cache is closing): a durable commit of nothing.
            None => {}
        }
        let puts = batch.iter().filter(|c| is_put(c)).count();
        // Durable at least once per period, and for a flush or a clear (whose callers wait).
        let durable =
            batch.is_empty() || puts < batch.len() || last_durable.elapsed() >= DURABLE_EVERY;
        let result = commit(&shared.db, &batch, durable).map_err(|e| e.to_string());
        if durable {
            last_durable = Instant::now();
        }
        undurable = !durable && (undurable || result.is_ok());
        match &result {
            Ok(()) => lock(&shared.stats).stored += puts as u64,
            Err(e) => {
                lock(&shared.stats).errors += puts as u64;
                tracing::warn!(error = %e, completions = puts, "response cache: write failed");
            }
        }
        // Committed (or failed): lookups go to the database again. A newer value queued for
        // the same key since stays.
        let mut pending = lock(&shared.pending);
        for cmd in batch.drain(..) {
            match cmd {
                Command::Put(key, value) => {
                    if pending.get(&key).is_some_and(|v| Arc::ptr_eq(v, &value)) {
                        pending.remove(&key);
                    }
                }
                Command::Sync { reply, .. } => {
                    let _ = reply.send(result.clone());
                }
            }
        }
    }
}

/// The next command, waiting until `deadline` at most; `None` then, or once the cache is
/// closed. The writer only waits this way while a commit is not yet durable (for up to
/// [`DURABLE_EVERY`]), so polling at a few milliseconds costs nothing that matters.
fn recv_until(rx: &mut mpsc::Receiver<Command>, deadline: Instant) -> Option<Command> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.try_recv() {
            Err(mpsc::error::TryRecvError::Empty) if !left.is_zero() => {
                std::thread::sleep(left.min(Duration::from_millis(5)));
            }
            next => return next.ok(),
        }
    }
}

/// Commits `batch` in one transaction (`durable`: with an `fsync`).
fn commit(db: &Database, batch: &[Command], durable: bool) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    if !durable {
        txn.set_durability(redb::Durability::None)?;
    }
    let mut table = txn.open_table(TABLE)?;
    for cmd in batch {
        match cmd {
            Command::Put(key, value) => drop(table.insert(&key[..], &value[..])?),
            Command::Sync { clear: true, .. } => table.retain(|_, _| false)?,
            Command::Sync { .. } => {}
        }
    }
    drop(table);
    Ok(txn.commit()?)
}

/// A backend whose successful completions are served from, and stored in, a [`Cache`].
///
/// Its [`name`](LlmBackend::name), [`model`](LlmBackend::model) and
/// [`identity`](LlmBackend::identity) are the wrapped backend's, so wrapping does not change
/// cache keys of wrappers further out. Put it *outside* a retry
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
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Cached<B> {
    /// Answers from the cache, or calls the wrapped backend and stores a success that is not
    /// blank.
    ///
    /// # Errors
    ///
    /// The wrapped backend's error (never cached); cache failures are not errors.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after the backend answered may still store the answer.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let key = cache_key(&self.inner.identity(), &request);
        if let Some(hit) = self.cache.get(key).await {
            return Ok(hit);
        }
        let completion = self.inner.complete(request).await?;
        if !completion.text.trim().is_empty() {
            self.cache.put(key, &completion).await;
        }
        Ok(completion)
    }

    crate::backend::forward_names!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Message;
    use std::borrow::Cow;

    #[test]
    fn key_depends_on_everything() {
        let r = CompletionRequest::new(vec![Message::user("hi")]).with_seed(1);
        let k = cache_key("openai/m", &r);
        assert_eq!(k, cache_key("openai/m", &r.clone()));
        assert_ne!(k, cache_key("local/m", &r));
        assert_ne!(k, cache_key("openai/m2", &r));
        assert_ne!(k, cache_key("openai/m", &r.clone().with_seed(2)));
        let mut t = r.clone();
        t.temperature = Some(0.5);
        assert_ne!(k, cache_key("openai/m", &t));
        let mut p = r.clone();
        p.top_p = Some(0.5);
        assert_ne!(k, cache_key("openai/m", &p));
        let mut s = r.clone();
        s.stop.push("x".into());
        assert_ne!(k, cache_key("openai/m", &s));
        let mut msg = r.clone();
        msg.messages.push(Message::assistant("x"));
        assert_ne!(k, cache_key("openai/m", &msg));
        let mut m = r;
        m.max_tokens = Some(5);
        assert_ne!(k, cache_key("openai/m", &m));
    }

    /// The key is hashed while serialising; the bytes hashed must stay those of the JSON
    /// built first (as before), or existing caches would miss.
    #[test]
    fn key_is_sha256_of_the_json_encoding() {
        let mut r = CompletionRequest::new(vec![
            Message::system("Be brief. \"Quoted\" and unicode: é ✓"),
            Message::user("hi\nthere"),
        ])
        .with_seed(42);
        r.temperature = Some(0.7);
        r.top_p = Some(0.9);
        r.max_tokens = Some(256);
        r.stop.push("</response>".into());
        // What the key was before: the JSON built first, then hashed.
        let ordered = format!(
            "{{\"v\":\"{VERSION}\",\"identity\":\"openai http://h/v1\",\"request\":{}}}",
            serde_json::to_string(&r).unwrap()
        );
        let expected: [u8; 32] = Sha256::digest(ordered.as_bytes()).into();
        assert_eq!(cache_key("openai http://h/v1", &r), expected);
        // And a golden value, so a change of the request's serialisation is noticed.
        let simple = CompletionRequest::new(vec![Message::user("hi")]).with_seed(1);
        let hex: String = cache_key("openai/m", &simple)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, GOLDEN_SIMPLE);
    }

    /// The key uses the backend's identity, which wrappers forward.
    #[tokio::test]
    async fn cached_keys_by_identity() {
        #[derive(Debug)]
        struct Ident(&'static str);
        #[async_trait]
        impl LlmBackend for Ident {
            async fn complete(&self, _: CompletionRequest) -> Result<Completion, BackendError> {
                Ok(Completion::new(self.0))
            }
            fn identity(&self) -> Cow<'_, str> {
                Cow::Borrowed(self.0)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("c.redb")).unwrap();
        let r = CompletionRequest::new(vec![Message::user("hi")]);
        let a = Cached::new(Ident("a"), cache.clone());
        assert_eq!(a.identity(), "a");
        assert_eq!(Cached::new(&a, cache.clone()).identity(), "a");
        assert_eq!(a.complete(r.clone()).await.unwrap().text, "a");
        let b = Cached::new(Ident("b"), cache.clone());
        assert_eq!(b.complete(r.clone()).await.unwrap().text, "b");
        assert_eq!(a.complete(r).await.unwrap().text, "a");
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 2));
    }

    fn key(i: u64) -> [u8; 32] {
        Sha256::digest(i.to_le_bytes()).into()
    }

    #[tokio::test]
    async fn keys_stored_before_opening_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let n = 2_000;
        {
            let cache = Cache::open(&path).unwrap();
            for i in 0..n {
                cache.put(key(i), &Completion::new(format!("t{i}"))).await;
            }
        }
        let cache = Cache::open(&path).unwrap();
        for i in 0..n {
            assert_eq!(cache.get(key(i)).await.unwrap().text, format!("t{i}"));
        }
        assert!(cache.get(key(n)).await.is_none());
    }

    #[tokio::test]
    async fn dropping_releases_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let cache = Cache::open(&path).unwrap();
            for i in 0..20_000 {
                cache.put(key(i), &Completion::new("x")).await;
            }
        }
        for _ in 0..3 {
            let cache = Cache::open(&path).unwrap();
            drop(cache);
        }
        let cache = Cache::open(&path).unwrap();
        assert_eq!(cache.entries().await.unwrap(), 20_000);
    }

    const GOLDEN_SIMPLE: &str = "cfe134d3de6e1864e04c23bcd5b881446d963d7772f8dcc80d2985f2e14223dd";
}
