//! The durable state of a batch run beside its output: [`StateFile`] (`PAIRS.batches.json`)
//! and the results log (`PAIRS.batch-results.jsonl`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::Completion;
use crate::batch::{BatchApi, BatchState, BatchStatus, BatchTag};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::io::{AppendFile, SyncPolicy};

/// One batch of a run, as recorded in the [`StateFile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatchRecord {
    /// The local key the batch is tagged with.
    pub key: String,
    /// The provider's id, once known (`None`: an intent, written before the batch was
    /// created).
    pub provider_id: Option<String>,
    /// When the intent was written (seconds since the Unix epoch): the batch was created at
    /// or after it.
    pub intent_at: u64,
    /// The wave the batch belongs to (1-based, counted per run).
    pub wave: u64,
    /// Requests in the batch.
    pub requests: u64,
    /// The `custom_id`s of its requests, kept until its results are saved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_ids: Vec<String>,
    /// The last state seen.
    pub state: Option<BatchState>,
    /// Whether its results were downloaded and saved in the results log.
    #[serde(default)]
    pub downloaded: bool,
}

impl BatchRecord {
    /// Whether the batch may still be running at the provider (created or maybe created, and
    /// its results not saved).
    #[must_use]
    pub fn in_flight(&self) -> bool {
        !self.downloaded && !self.state.is_some_and(BatchState::is_ended)
    }
}

/// `PAIRS.batches.json`: the run identity and the batches of a batch run; see the
/// [module docs](super).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StateFile {
    /// The format version (1).
    pub version: u32,
    /// The run's identity, random, created once and kept: every batch is tagged with it.
    pub run: String,
    /// The batch API's name (`openai`, `anthropic`).
    pub api: String,
    /// The batches, oldest first.
    #[serde(default)]
    pub batches: Vec<BatchRecord>,
}

impl StateFile {
    /// `PAIRS.batches.json` beside `PAIRS.jsonl`.
    #[must_use]
    pub fn default_path(output: &Path) -> PathBuf {
        crate::io::sidecar(output, ".batches.json")
    }

    /// `PAIRS.batch-results.jsonl` beside `PAIRS.jsonl`: every result downloaded.
    #[must_use]
    pub fn results_path(output: &Path) -> PathBuf {
        crate::io::sidecar(output, ".batch-results.jsonl")
    }

    /// A new state with a random run identity.
    #[must_use]
    pub fn new(api: impl Into<String>) -> Self {
        let run: u128 = rand::random();
        StateFile {
            version: 1,
            run: format!("{run:032x}"),
            api: api.into(),
            batches: Vec::new(),
        }
    }

    /// Reads the state at `path`, `None` if there is no file.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if it cannot be read,
    /// [`ErrorKind::Parse`](crate::ErrorKind::Parse) if it is not a state file.
    pub fn read(path: &Path) -> Result<Option<StateFile>, Error> {
        let Some(bytes) = crate::io::append::if_exists(path, std::fs::read)? else {
            return Ok(None);
        };
        let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
            Error::parse(
                path,
                e.line() as u64,
                format!("not a batch state file ({e})"),
            )
        })?;
        if state.version != 1 {
            return Err(Error::parse(
                path,
                0,
                format!("batch state version {} is not known", state.version),
            ));
        }
        Ok(Some(state))
    }

    /// [`read`](Self::read), refusing a state of another API than `api`
    /// ([`ErrorKind::Config`](crate::ErrorKind::Config)).
    pub(crate) fn read_for(path: &Path, api: &str) -> Result<Option<StateFile>, Error> {
        let state = Self::read(path)?;
        if let Some(other) = state.as_ref().filter(|s| s.api != api) {
            return Err(Error::config(format!(
                "{} records batches of the {} API, not {api}: finish or cancel them with that \
                 backend, or remove the file",
                path.display(),
                other.api
            )));
        }
        Ok(state)
    }

    /// Writes the state to `path` atomically (a new file synced and renamed over it).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if it cannot be written.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let mut json = serde_json::to_vec(self).expect("a batch state serialises");
        json.push(b'\n');
        crate::io::append::write_replacing(path, &json)
    }

    /// The tag of the batch with local key `key`.
    #[must_use]
    pub fn tag(&self, key: &str) -> BatchTag {
        BatchTag {
            run: self.run.clone(),
            key: key.to_string(),
        }
    }
}

/// Looks for the batches of the intents of `state` (records without a provider id) among
/// those the provider lists, and records the id of each one found. An intent not found is
/// removed (its batch was never created). Returns the keys of the batches adopted and the
/// `custom_id`s of the intents removed.
///
/// A batch is matched by its tag where the provider keeps one; otherwise by creation time (not
/// before the intent) and request count, each listed batch adopted at most once and never
/// one that another record already names.
pub(crate) async fn adopt_intents(
    api: &dyn BatchApi,
    state: &mut StateFile,
) -> Result<(Vec<String>, Vec<String>), BackendError> {
    let Some(since) = state
        .batches
        .iter()
        .filter(|b| b.provider_id.is_none())
        .map(|b| b.intent_at)
        .min()
    else {
        return Ok(Default::default());
    };
    let probe = state.tag("");
    // A minute of slack for clocks that disagree.
    let listed = api.list(&probe, since.saturating_sub(60)).await?;
    let mut taken: HashSet<String> = state
        .batches
        .iter()
        .filter_map(|b| b.provider_id.clone())
        .collect();
    let (mut adopted, mut lost) = (Vec::new(), Vec::new());
    for record in state.batches.iter_mut().filter(|b| b.provider_id.is_none()) {
        let found = listed.iter().find(|s| {
            !taken.contains(&s.id)
                && match &s.tag {
                    Some(tag) => tag.run == state.run && tag.key == record.key,
                    None => {
                        s.created_at + 60 >= record.intent_at && s.counts.total == record.requests
                    }
                }
        });
        let Some(s) = found else {
            lost.append(&mut record.custom_ids);
            continue;
        };
        tracing::info!(key = %record.key, id = %s.id, "adopted a batch created before a crash");
        taken.insert(s.id.clone());
        record.provider_id = Some(s.id.clone());
        record.state = Some(s.state);
        adopted.push(record.key.clone());
    }
    state.batches.retain(|b| b.provider_id.is_some());
    Ok((adopted, lost))
}

/// Cancels the batches of the run writing `output` that may still be running (an intent is
/// first looked up by listing), and records their state. Returns each batch's id and what
/// the provider answered.
///
/// # Errors
///
/// The state file's I/O and parse errors; [`ErrorKind::Config`](crate::ErrorKind::Config) if
/// there is none, or it was written for another API; the provider's error if listing fails.
pub async fn cancel_batches(
    api: &dyn BatchApi,
    output: &Path,
) -> Result<Vec<(String, Result<BatchStatus, BackendError>)>, Error> {
    let path = StateFile::default_path(output);
    let mut state = StateFile::read_for(&path, &api.name())?.ok_or_else(|| {
        Error::config(format!(
            "{} does not exist: no batch run writes {}",
            path.display(),
            output.display()
        ))
    })?;
    adopt_intents(api, &mut state)
        .await
        .map_err(|e| Error::config(format!("cannot list the batches: {e}")))?;
    let mut out = Vec::new();
    for record in state.batches.iter_mut().filter(|b| b.in_flight()) {
        let Some(id) = record.provider_id.clone() else {
            continue;
        };
        let result = api.cancel(&id).await;
        if let Ok(s) = &result {
            record.state = Some(s.state);
        }
        out.push((id, result));
    }
    state.write(&path)?;
    Ok(out)
}

/// One line of the results log.
#[derive(Debug, Serialize, Deserialize)]
struct SavedLine {
    custom_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completion: Option<Completion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<SavedError>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedError {
    kind: String,
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
}

fn kind_from_str(s: &str) -> BackendErrorKind {
    BackendErrorKind::ALL
        .iter()
        .copied()
        .find(|k| k.as_str() == s)
        .unwrap_or(BackendErrorKind::Other)
}

/// A saved result: the custom_id and its completion or error.
pub(crate) type Saved = (String, Result<Completion, BackendError>);

/// Opens (creating) the results log at `path` (every result downloaded, appended as soon as it
/// is, locked while open), repairs a torn last line, and reads the results saved so far (a
/// later line for the same id wins; unreadable lines are skipped with a warning).
pub(crate) fn open_results(path: &Path) -> Result<(AppendFile, Vec<Saved>), Error> {
    let file = AppendFile::open(path, SyncPolicy::Always)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut saved = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line = serde_json::from_slice::<SavedLine>(line).ok();
        match line.map(|l| (l.custom_id, l.completion, l.error)) {
            Some((id, Some(c), _)) => saved.push((id, Ok(c))),
            Some((id, None, Some(e))) => {
                let mut err = BackendError::new(kind_from_str(&e.kind), e.message);
                if let Some(s) = e.status {
                    err = err.with_status(s);
                }
                saved.push((id, Err(err)));
            }
            _ => tracing::warn!(
                path = %path.display(),
                line = i + 1,
                "unreadable line in the batch results log: skipped"
            ),
        }
    }
    Ok((file, saved))
}

/// Appends one result to the results `log`.
pub(crate) fn append_result(
    log: &mut AppendFile,
    custom_id: &str,
    result: &Result<Completion, BackendError>,
) -> Result<(), Error> {
    let line = SavedLine {
        custom_id: custom_id.to_string(),
        completion: result.as_ref().ok().cloned(),
        error: result.as_ref().err().map(|e| SavedError {
            kind: e.kind().as_str().to_string(),
            message: e.message().to_string(),
            status: e.status(),
        }),
    };
    let json = serde_json::to_vec(&line).expect("a result serialises");
    log.write_line(&json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn state_round_trips_and_writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pairs.jsonl");
        let path = StateFile::default_path(&out);
        assert!(path.ends_with("pairs.batches.json"));
        assert!(StateFile::results_path(&out).ends_with("pairs.batch-results.jsonl"));
        assert_eq!(StateFile::read(&path).unwrap(), None);
        let mut s = StateFile::new("openai");
        assert_eq!(s.run.len(), 32);
        s.batches.push(BatchRecord {
            key: "k1".into(),
            provider_id: None,
            intent_at: 5,
            wave: 1,
            requests: 2,
            custom_ids: vec!["a".into(), "b".into()],
            state: None,
            downloaded: false,
        });
        s.write(&path).unwrap();
        let back = StateFile::read(&path).unwrap().unwrap();
        assert_eq!(back, s);
        assert!(back.batches[0].in_flight());
        std::fs::write(&path, b"{not json").unwrap();
        let err = StateFile::read(&path).unwrap_err();
        assert!(err.to_string().contains("batches.json"), "{err}");
    }

    #[test]
    fn results_log_keeps_completions_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let (mut log, saved) = open_results(&path).unwrap();
        assert!(saved.is_empty());
        append_result(&mut log, "a", &Ok(Completion::new("hi"))).unwrap();
        append_result(
            &mut log,
            "b",
            &Err(BackendError::new(BackendErrorKind::InvalidRequest, "bad").with_status(400)),
        )
        .unwrap();
        // A second open is refused while the first holds the lock.
        assert!(open_results(&path).is_err());
        log.close().unwrap();
        // A torn last line (a crash mid-write) is cut, the rest read.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"custom_id\":\"c\",\"compl").unwrap();
        drop(f);
        let (_log, saved) = open_results(&path).unwrap();
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[0].1.as_ref().unwrap().text, "hi");
        let e = saved[1].1.as_ref().unwrap_err();
        assert_eq!(
            (e.kind(), e.status()),
            (BackendErrorKind::InvalidRequest, Some(400))
        );
    }
}
