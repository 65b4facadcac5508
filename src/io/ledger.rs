//! The failure ledger: [`FailureLedger`] and its [`FailureRecord`]s.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::append::{
    if_exists, remove_if_exists, sidecar, write_replacing, AppendFile, SyncPolicy,
};
use super::resume::IdSet;
use crate::{error_chain, Error};

/// One failed example in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The example's id.
    pub id: String,
    /// The kind of failure ([`Error::kind_str`]).
    pub kind: String,
    /// The error's message and its causes, joined by `": "`.
    pub message: String,
    /// When it failed, RFC 3339 in UTC.
    pub time: String,
    /// How many runs this id has failed in (1 for a fresh record).
    #[serde(default = "one")]
    pub runs: u32,
}

fn one() -> u32 {
    1
}

impl FailureRecord {
    /// A record of `error` for `id`, stamped now.
    #[must_use]
    pub fn new(id: impl Into<String>, error: &Error) -> Self {
        FailureRecord {
            id: id.into(),
            kind: error.kind_str().to_string(),
            message: error_chain(error),
            time: rfc3339_utc(SystemTime::now()),
            runs: 1,
        }
    }
}

/// Formats a time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
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
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The failure ledger: examples that failed after every retry, one JSON line each, beside the
/// output (`PAIRS.failures.jsonl`).
///
/// A record is `{"id", "kind", "message", "time", "runs"}`: `kind` is [`Error::kind_str`],
/// `message` the error's text with its chain of causes (errors never carry keys), `time` an
/// RFC 3339 UTC timestamp and `runs` how many runs this id has failed in.
///
/// **Life cycle.** During a run failures are appended (crash-safe, like the output). Ids in
/// the ledger are not in the output, so the next run retries them. At the end of a run that
/// was not stopped by a crash, the run rewrites the ledger (to a temporary
/// file, then an atomic rename) keeping only ids that are still not in the output, one record
/// each (the latest, with `runs` summed): the ledger then lists exactly the ids that still
/// need work. After a crash the ledger may still name ids that have since succeeded; the next
/// run's compaction removes them. A reader who cannot wait should take "ledger ids minus
/// output ids".
#[derive(Debug)]
pub struct FailureLedger {
    file: AppendFile,
}

impl FailureLedger {
    /// The default ledger path beside `output`: `PAIRS.jsonl` → `PAIRS.failures.jsonl`
    /// (any other name gets `.failures.jsonl` appended).
    #[must_use]
    pub fn default_path(output: &Path) -> PathBuf {
        sidecar(output, ".failures.jsonl")
    }

    /// Opens (creating if needed) the ledger for appending; see [`OutputFile::open`](super::OutputFile::open).
    ///
    /// # Errors
    ///
    /// As [`OutputFile::open`](super::OutputFile::open).
    pub fn open(path: impl AsRef<Path>, policy: SyncPolicy) -> Result<Self, Error> {
        Ok(FailureLedger {
            file: AppendFile::open(path, policy)?,
        })
    }

    /// Records that the example `id` failed with `error`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the write fails.
    pub fn record(&mut self, id: &str, error: &Error) -> Result<(), Error> {
        let line = serde_json::to_vec(&FailureRecord::new(id, error))
            .expect("a failure record always serialises");
        self.file.write_line(&line)
    }

    /// Syncs and closes the ledger.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the sync fails.
    pub fn close(self) -> Result<(), Error> {
        self.file.close()
    }

    /// Reads every record of the ledger at `path` (none if it does not exist); lines that are
    /// not records are skipped.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file exists but cannot be read.
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<FailureRecord>, Error> {
        let path = path.as_ref();
        let Some(file) = if_exists(path, std::fs::File::open)? else {
            return Ok(Vec::new());
        };
        (BufReader::new(file).split(b'\n'))
            .filter_map(|line| line.map(|l| serde_json::from_slice(&l).ok()).transpose())
            .collect::<Result<_, _>>()
            .map_err(|e| Error::io(path, e))
    }

    /// Rewrites the ledger at `path` keeping one record (the latest, `runs` summed) for each
    /// id in `pending`; returns how many remain. A ledger left empty is removed. The ledger
    /// must not be open for appending (close it first); `run::run_to_file` compacts
    /// it while it still holds the output's lock, so no other run can append meanwhile.
    ///
    /// The ledger is read into memory, which is fine for a list of failures.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if reading, writing or renaming fails; the old ledger is then left as it
    /// was.
    #[cfg_attr(not(feature = "run"), allow(dead_code))]
    pub(crate) fn compact(path: impl AsRef<Path>, pending: &IdSet) -> Result<u64, Error> {
        let path = path.as_ref();
        let (mut kept, mut at) = (Vec::<FailureRecord>::new(), HashMap::new());
        for mut r in Self::read(path)?
            .into_iter()
            .filter(|r| pending.contains(&r.id))
        {
            // The latest record of an id, in the place of its first, with the runs summed.
            let i = *at.entry(r.id.clone()).or_insert(kept.len());
            if i < kept.len() {
                r.runs = r.runs.saturating_add(kept[i].runs);
                kept[i] = r;
            } else {
                kept.push(r);
            }
        }
        if kept.is_empty() {
            remove_if_exists(path)?;
            return Ok(0);
        }
        let mut buf = Vec::new();
        for r in &kept {
            serde_json::to_writer(&mut buf, r).expect("a failure record always serialises");
            buf.push(b'\n');
        }
        write_replacing(path, &buf)?;
        Ok(kept.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendError;

    fn err(id: &str) -> Error {
        Error::backend(
            id,
            "first",
            BackendError::server("overloaded").with_status(503),
        )
    }

    #[test]
    fn default_path() {
        assert_eq!(
            FailureLedger::default_path(Path::new("/d/pairs.jsonl")),
            PathBuf::from("/d/pairs.failures.jsonl")
        );
        assert_eq!(
            FailureLedger::default_path(Path::new("out")),
            PathBuf::from("out.failures.jsonl")
        );
    }

    #[test]
    fn record_shape() {
        let r = FailureRecord::new("a", &err("a"));
        assert_eq!(r.kind, "server");
        assert_eq!(
            r.message,
            "example a: first call failed: server (HTTP 503): overloaded"
        );
        assert!(r.time.ends_with('Z') && r.time.len() == 24, "{}", r.time);
    }

    #[test]
    fn time_format() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(951_782_400_123);
        assert_eq!(rfc3339_utc(t), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn compact_keeps_pending_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.failures.jsonl");
        let mut l = FailureLedger::open(&path, SyncPolicy::default()).unwrap();
        for id in ["a", "b", "a", "c"] {
            l.record(id, &err(id)).unwrap();
        }
        l.close().unwrap();
        let mut pending = IdSet::new();
        pending.insert("a");
        pending.insert("c");
        assert_eq!(FailureLedger::compact(&path, &pending).unwrap(), 2);
        let rs = FailureLedger::read(&path).unwrap();
        assert_eq!(rs.len(), 2);
        assert_eq!((rs[0].id.as_str(), rs[0].runs), ("a", 2));
        assert_eq!((rs[1].id.as_str(), rs[1].runs), ("c", 1));
        assert_eq!(FailureLedger::compact(&path, &IdSet::new()).unwrap(), 0);
        assert!(!path.exists());
    }
}
