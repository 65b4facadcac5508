//! Crash-safe JSONL files: `AppendFile` (locked, append-only, one whole line per write, torn
//! last line repaired on open), [`OutputFile`] (examples) and the [`SyncPolicy`] they follow,
//! and the helpers every file written beside an output uses (replacement files, removal,
//! same-file checks, side-file names).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind::{AlreadyExists, NotFound, WouldBlock};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::resume::line_id;
use crate::example::{ExampleFormat, PreferenceExample};
use crate::Error;

/// When an `AppendFile` asks the operating system to put its lines on disk (`fsync`).
///
/// Whatever the policy, every line is handed to the operating system with a single `write`
/// call as soon as it is written (there is no buffer in the process), so a crash or a kill of
/// the process loses at most the line being written, and that torn line is repaired on the
/// next open. The policy only decides how much a power loss or kernel crash can take:
///
/// | policy | on power loss, lost at most | cost |
/// |---|---|---|
/// | [`Always`](SyncPolicy::Always) | nothing written | one `fsync` per line |
/// | [`Periodic`](SyncPolicy::Periodic) (default: 256 lines or 2 s) | the last period or two | one `fsync` per period, on a background thread |
/// | [`OnClose`](SyncPolicy::OnClose) | the whole run | one `fsync` at close |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// `fsync` after every line.
    Always,
    /// `fsync` after `lines` lines or when `interval` has passed since the last sync
    /// (checked at each write), whichever comes first, and at close.
    ///
    /// The periodic syncs run on a thread of their own, so a write never waits for the disk
    /// (an `fsync` can take milliseconds, and a run's writer is the task that drives every
    /// example in flight). A sync that falls due while the previous one still runs is started
    /// by the first write after that one ends. A failed background sync is reported by the
    /// write that starts the next one, `AppendFile::sync` or `AppendFile::close`. The final
    /// sync at close is made before `close` returns.
    Periodic {
        /// Lines between syncs (0 means no line limit).
        lines: u64,
        /// Time between syncs.
        interval: Duration,
    },
    /// `fsync` only at close (and `AppendFile::sync`).
    OnClose,
}

impl Default for SyncPolicy {
    /// [`SyncPolicy::Periodic`] with 256 lines or 2 seconds.
    fn default() -> Self {
        SyncPolicy::Periodic {
            lines: 256,
            interval: Duration::from_secs(2),
        }
    }
}

/// An append-only JSONL file held under an exclusive lock.
///
/// - [`open`](Self::open) takes an exclusive advisory lock (`flock`/`LockFileEx`), so two runs
///   cannot write the same file at once: the second gets an error at open.
/// - On open, a last line without its newline (torn by a crash mid-write) is cut off and the
///   cut bytes are appended to `<file>.torn`; `torn_bytes` says how many.
/// - [`write_line`](Self::write_line) writes the line and its newline with one `write_all`
///   on a file opened in append mode; lines are never interleaved or half-visible to a later
///   open.
/// - The [`SyncPolicy`] decides when lines are `fsync`ed; [`close`](Self::close) syncs.
///
/// The lock is released when the value is dropped (or the process dies).
#[derive(Debug)]
#[cfg_attr(not(feature = "run"), allow(dead_code))]
pub(crate) struct AppendFile {
    file: File,
    path: PathBuf,
    /// Whether this open created the file (so only this run may remove it again).
    created: bool,
    policy: SyncPolicy,
    unsynced: u64,
    last_sync: Instant,
    /// Bytes of a torn last line that [`open`](Self::open) cut off (and saved to
    /// `<file>.torn`).
    pub(crate) torn_bytes: u64,
    lines: u64,
    /// The background `fsync` of a [`SyncPolicy::Periodic`] file, on a clone of the handle.
    syncing: Option<JoinHandle<std::io::Result<()>>>,
}

/// What `map_err` turns an I/O error about `path` into.
fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + Copy + '_ {
    move |e| Error::io(path, e)
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty());
    parent.unwrap_or(Path::new("."))
}

/// Puts the directory entry of `path` (a create, a rename, a removal) on disk: `fsync` of the
/// parent directory. A no-op where directories cannot be opened (Windows).
pub(crate) fn sync_parent(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    File::open(parent_dir(path))
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent_dir(path)))?;
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A new file beside `path` with a random name (created with `O_EXCL`, so a symlink planted
/// at a guessable name is never followed), for writing a replacement of `path`.
pub(crate) fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Mode 0666 less the umask, as for any file the user creates (tempfile's default is 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let dir = parent_dir(path);
    builder.tempfile_in(dir).map_err(io_err(dir))
}

/// Syncs `tmp` and renames it over `path`, keeping the permissions `path` had, and syncs the
/// directory: a crash at any point leaves either the old file or the new one.
pub(crate) fn replace_with(tmp: tempfile::NamedTempFile, path: &Path) -> Result<File, Error> {
    if let Ok(m) = std::fs::metadata(path) {
        tmp.as_file()
            .set_permissions(m.permissions())
            .map_err(io_err(tmp.path()))?;
    }
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    let file = tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_parent(path)?;
    Ok(file)
}

/// Replaces `path` with `bytes` through a new file beside it ([`replace_with`]).
pub(crate) fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    replace_with(tmp, path).map(drop)
}

/// Removes `path` if it exists, and syncs the directory.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), Error> {
    if_exists(path, std::fs::remove_file)?.map_or(Ok(()), |()| sync_parent(path))
}

/// What `read` (`File::open`, `std::fs::read`) gives for `path`; `None` if it does not exist.
pub(crate) fn if_exists<'p, T>(
    path: &'p Path,
    read: impl FnOnce(&'p Path) -> std::io::Result<T>,
) -> Result<Option<T>, Error> {
    match read(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Appends to the side file `path` (`<file>.torn`, `<file>.garbage`) what `write` writes,
/// and syncs it.
fn append_aside(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), Error> {
    let mut side = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err(path))?;
    write(&mut side)
        .and_then(|()| side.sync_data())
        .map_err(io_err(path))?;
    sync_parent(path)
}

/// Refuses when two of the named paths are the same file: compared by identity (device and
/// inode), so `data.jsonl` and `./data.jsonl`, a symlink or a hard link are caught; a path
/// that does not exist yet is compared by its canonical directory and file name.
///
/// [`run_to_file`](crate::run::run_to_file) checks its input (when given with
/// [`RunOptions::input`](crate::run::RunOptions::input)), output, ledger and recipe; a
/// program that writes more files beside a run (a summary) checks them with this before the
/// run starts.
///
/// # Errors
///
/// [`ErrorKind::Config`](crate::ErrorKind::Config) naming both roles and the paths.
#[cfg_attr(not(feature = "run"), allow(unreachable_pub))]
pub fn ensure_distinct_files(files: &[(&str, &Path)]) -> Result<(), Error> {
    // A file's identity, else the canonical path it would have (`None`: cannot tell).
    let identify = |p: &Path| {
        same_file::Handle::from_path(p).map_err(|_| {
            let dir = std::fs::canonicalize(parent_dir(p)).ok()?;
            Some(dir.join(p.file_name()?))
        })
    };
    let ids: Vec<_> = files.iter().map(|(_, p)| identify(p)).collect();
    for (i, a) in ids.iter().enumerate() {
        if let Some(j) = (i + 1..ids.len()).find(|&j| *a != Err(None) && ids[j] == *a) {
            let ((ra, pa), (rb, pb)) = (files[i], files[j]);
            return Err(Error::config(format!(
                "the {ra} ({}) and the {rb} ({}) are the same file: give each its own path",
                pa.display(),
                pb.display()
            )));
        }
    }
    Ok(())
}

/// `PAIRS<suffix>` beside `PAIRS.jsonl` (`PAIRS.jsonl<suffix>` for a file without the
/// `.jsonl` extension).
pub(crate) fn sidecar(output: &Path, suffix: &str) -> PathBuf {
    match output.extension() {
        Some(ext) if ext == "jsonl" => with_suffix(&output.with_extension(""), suffix),
        _ => with_suffix(output, suffix),
    }
}

/// The path with `suffix` added to its file name (`out.jsonl` → `out.jsonl.torn`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

#[cfg_attr(not(feature = "run"), allow(dead_code))]
impl AppendFile {
    /// Opens (creating if needed) `path` for appending, locks it, and repairs a torn last line.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file cannot be opened, read, truncated or locked; a file locked by
    /// another run gives an error of kind [`std::io::ErrorKind::WouldBlock`] saying so.
    pub(crate) fn open(path: impl AsRef<Path>, policy: SyncPolicy) -> Result<Self, Error> {
        let path = path.as_ref();
        let mut options = OpenOptions::new();
        options.read(true).append(true);
        // Try to create first, to know whether this open made the file: only then may this
        // run remove it again (see `remove_if_created_and_empty`).
        let (mut file, created) = match options.clone().create_new(true).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == AlreadyExists => {
                (options.open(path).map_err(io_err(path))?, false)
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let busy = "locked: another run is writing this file";
        file.try_lock().map_err(|e| match e {
            TryLockError::WouldBlock => Error::io(path, std::io::Error::new(WouldBlock, busy)),
            TryLockError::Error(e) => Error::io(path, e),
        })?;
        if created {
            sync_parent(path)?;
        }
        let torn_bytes = repair_torn_tail(&mut file, path)?;
        Ok(AppendFile {
            file,
            path: path.to_path_buf(),
            created,
            policy,
            unsynced: 0,
            last_sync: Instant::now(),
            torn_bytes,
            lines: 0,
            syncing: None,
        })
    }

    /// The file's path.
    #[must_use]
    #[cfg_attr(not(feature = "batch"), allow(dead_code))]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Lines written through this handle.
    #[must_use]
    #[cfg_attr(not(feature = "batch"), allow(dead_code))]
    pub(crate) fn lines(&self) -> u64 {
        self.lines
    }

    /// Appends `line` and a newline with one write, then syncs if the policy says so.
    ///
    /// `line` must not contain a newline (JSON from `serde_json` never does).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the write or sync fails; [`ErrorKind::Config`](crate::ErrorKind::Config) if `line` holds a newline.
    pub(crate) fn write_line(&mut self, line: &[u8]) -> Result<(), Error> {
        if line.contains(&b'\n') {
            return Err(Error::config("a JSONL line must not contain a newline"));
        }
        self.write_raw(&[line, b"\n"].concat())
    }

    /// `buf` must be one whole line ending in `\n`.
    fn write_raw(&mut self, buf: &[u8]) -> Result<(), Error> {
        debug_assert!(buf.ends_with(b"\n"));
        self.file.write_all(buf).map_err(io_err(&self.path))?;
        self.lines += 1;
        self.unsynced += 1;
        match self.policy {
            SyncPolicy::Always => self.sync(),
            SyncPolicy::Periodic { lines, interval }
                if (lines > 0 && self.unsynced >= lines)
                    || self.last_sync.elapsed() >= interval =>
            {
                if self.syncing.as_ref().is_some_and(|h| !h.is_finished()) {
                    return Ok(()); // started by a write after it ends
                }
                self.join_sync()?;
                let file = self.file.try_clone().map_err(io_err(&self.path))?;
                let spawned = std::thread::Builder::new()
                    .name("rmboost-fsync".into())
                    .spawn(move || file.sync_data());
                self.syncing = Some(spawned.map_err(io_err(&self.path))?);
                self.unsynced = 0;
                self.last_sync = Instant::now();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Waits for the background sync, if any; its error.
    fn join_sync(&mut self) -> Result<(), Error> {
        match self.syncing.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => Err(Error::io(&self.path, e)),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            _ => Ok(()),
        }
    }

    /// Puts everything written so far on disk (`fsync` of the data).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the sync fails.
    pub(crate) fn sync(&mut self) -> Result<(), Error> {
        // A background sync covers what was written before it started.
        self.join_sync()?;
        if self.unsynced > 0 {
            self.file.sync_data().map_err(io_err(&self.path))?;
        }
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Empties the file (keeping the lock).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if truncating fails.
    pub(crate) fn truncate(&mut self) -> Result<(), Error> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_all())
            .map_err(io_err(&self.path))
    }

    /// Syncs the file, then removes it if this open created it, it is still empty, and `path`
    /// still names it; the lock is held until the file is gone, so no other run can have opened it for
    /// writing in between. Returns whether it was removed. Leaves no empty file behind a run
    /// that wrote nothing, and never removes a file another run created or holds.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file cannot be inspected or removed.
    pub(crate) fn remove_if_created_and_empty(mut self) -> Result<bool, Error> {
        self.sync()?;
        let len = self.file.metadata().map_err(io_err(&self.path))?.len();
        // Whether `path` still names the file this handle holds (not replaced or removed).
        let ours = self.file.try_clone().and_then(same_file::Handle::from_file);
        let still_at_path = ours
            .is_ok_and(|ours| same_file::Handle::from_path(&self.path).is_ok_and(|h| h == ours));
        if !self.created || len > 0 || !still_at_path {
            return Ok(false);
        }
        std::fs::remove_file(&self.path).map_err(io_err(&self.path))?;
        sync_parent(&self.path)?;
        Ok(true)
    }

    /// Syncs and closes the file, releasing the lock.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the final sync fails.
    pub(crate) fn close(mut self) -> Result<(), Error> {
        self.sync()
    }
}

impl Drop for AppendFile {
    /// Waits for a background sync: its clone of the handle holds the lock too.
    fn drop(&mut self) {
        let _ = self.join_sync();
    }
}

/// Cuts a last line without its newline off `file`, saving it to `<path>.torn`; returns its
/// length.
fn repair_torn_tail(file: &mut File, path: &Path) -> Result<u64, Error> {
    let io = io_err(path);
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    // Scan backwards in blocks for the last newline.
    const BLOCK: u64 = 64 * 1024;
    let mut block = vec![0u8; BLOCK.min(len) as usize];
    let (mut end, mut keep) = (len, 0); // `keep`: the length up to the last newline
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(block))
            .map_err(io)?;
        if let Some(i) = memchr::memrchr(b'\n', block) {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if keep == len {
        return Ok(0);
    }
    let torn_len = len - keep;
    let torn_path = with_suffix(path, ".torn");
    // Save the torn bytes before cutting them, so nothing is ever lost; copied through a
    // small buffer, whatever their length.
    file.seek(SeekFrom::Start(keep)).map_err(io)?;
    append_aside(&torn_path, |side| {
        std::io::copy(&mut (&mut *file).take(torn_len), side)?;
        side.write_all(b"\n")
    })?;
    file.set_len(keep)
        .and_then(|()| file.sync_data())
        .map_err(io)?;
    tracing::warn!(
        path = %path.display(),
        torn_bytes = torn_len,
        saved_to = %torn_path.display(),
        "cut a torn last line left by an interrupted run"
    );
    Ok(torn_len)
}

/// A crash-safe JSONL output file of examples: an `AppendFile` plus the format.
///
/// ```
/// # fn main() -> Result<(), rmboost::Error> {
/// use rmboost::io::{OutputFile, SyncPolicy};
/// use rmboost::ExampleFormat;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("pairs.jsonl");
/// let out = OutputFile::open(&path, ExampleFormat::Conversational, SyncPolicy::default())?;
/// // A second writer of the same file is refused while the first holds it.
/// assert!(OutputFile::open(&path, ExampleFormat::Conversational, SyncPolicy::default()).is_err());
/// out.close()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct OutputFile {
    pub(crate) file: AppendFile,
    format: ExampleFormat,
}

impl OutputFile {
    /// Opens `path` for appending examples in `format`; see `AppendFile::open`.
    ///
    /// # Errors
    ///
    /// As `AppendFile::open`.
    pub fn open(
        path: impl AsRef<Path>,
        format: ExampleFormat,
        policy: SyncPolicy,
    ) -> Result<Self, Error> {
        Ok(OutputFile {
            file: AppendFile::open(path, policy)?,
            format,
        })
    }

    /// Appends one example as one line with one write.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the write or a due sync fails.
    pub fn write(&mut self, example: &PreferenceExample) -> Result<(), Error> {
        let mut line = example.to_json_line(self.format);
        line.push('\n');
        self.file.write_raw(line.as_bytes())
    }

    /// Bytes of a torn last line (a crash mid-write) cut off when the file was opened, and
    /// appended to `<file>.torn`.
    #[must_use]
    pub fn torn_bytes(&self) -> u64 {
        self.file.torn_bytes
    }

    /// See `AppendFile::sync`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the sync fails.
    pub fn sync(&mut self) -> Result<(), Error> {
        self.file.sync()
    }

    /// Syncs and closes the file, releasing the lock.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the final sync fails.
    pub fn close(self) -> Result<(), Error> {
        self.file.close()
    }

    /// Moves the lines without a readable `id` (garbage a power loss can leave in the
    /// middle of a file) to `<file>.garbage`, so downstream loaders never meet them; returns
    /// how many. The replacement is written beside the file, synced, locked and renamed over
    /// it, so a crash at any point leaves either the old file or the new one, and the lock is
    /// never released on the path.
    #[cfg_attr(not(feature = "run"), allow(dead_code))]
    pub(crate) fn set_aside_unreadable(&mut self) -> Result<u64, Error> {
        let path = self.file.path.clone();
        let io = io_err(&path);
        let reader = File::open(&path).map_err(io)?;
        let mut tmp = temp_beside(&path)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, tmp.as_file_mut());
        let mut bad: Vec<u8> = Vec::new();
        let mut set_aside = 0u64;
        // Every line ends with `\n`: a torn last line was cut at open.
        for line in BufReader::with_capacity(1 << 16, reader).split(b'\n') {
            let mut line = line.map_err(io)?;
            let kept = line.iter().all(u8::is_ascii_whitespace) || line_id(&line).is_some();
            line.push(b'\n');
            if kept {
                out.write_all(&line).map_err(io)?;
            } else {
                set_aside += 1;
                bad.extend_from_slice(&line);
            }
        }
        out.flush().map_err(io)?;
        drop(out);
        if set_aside == 0 {
            return Ok(0);
        }
        let aside = with_suffix(&path, ".garbage");
        append_aside(&aside, |side| side.write_all(&bad))?;
        tmp.as_file().try_lock().map_err(|e| {
            io(std::io::Error::other(format!(
                "cannot lock the rewritten file: {e}"
            )))
        })?;
        let mut file = replace_with(tmp, &path)?;
        file.seek(SeekFrom::End(0)).map_err(io)?;
        self.file.join_sync()?;
        // The old handle (and its lock) goes only now, after the new file holds the path.
        self.file.file = file;
        tracing::warn!(
            path = %path.display(),
            lines = set_aside,
            saved_to = %aside.display(),
            "moved unreadable lines out of the file"
        );
        Ok(set_aside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_syncs_run_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.jsonl");
        let policy = SyncPolicy::Periodic {
            lines: 3,
            interval: Duration::from_secs(3600),
        };
        let mut f = AppendFile::open(&path, policy).unwrap();
        f.write_line(b"{\"id\":\"a\"}").unwrap();
        f.write_line(b"{\"id\":\"b\"}").unwrap();
        assert!(f.syncing.is_none(), "no sync due yet");
        for i in 0..1000 {
            f.write_line(format!("{{\"id\":\"{i}\"}}").as_bytes())
                .unwrap();
        }
        assert!(
            f.syncing.is_some(),
            "the period passed: the sync thread runs"
        );
        f.sync().unwrap();
        f.close().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1002);
        // The lock is released at close: the file opens again, and dropping a handle with a
        // sync thread (without close) does not hang.
        let mut f = AppendFile::open(&path, policy).unwrap();
        for _ in 0..10 {
            f.write_line(b"{}").unwrap();
        }
        drop(f);
        assert!(AppendFile::open(&path, policy).is_ok());
    }

    #[test]
    fn repairs_torn_tail_and_keeps_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.jsonl");
        std::fs::write(
            &path,
            b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\",\"pro",
        )
        .unwrap();
        let mut f = AppendFile::open(&path, SyncPolicy::Always).unwrap();
        assert_eq!(f.torn_bytes, 14);
        f.write_line(b"{\"id\":\"c\"}").unwrap();
        f.close().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\"}\n"
        );
        assert_eq!(
            std::fs::read_to_string(with_suffix(&path, ".torn")).unwrap(),
            "{\"id\":\"c\",\"pro\n"
        );
        // A clean file needs no repair.
        let f = AppendFile::open(&path, SyncPolicy::OnClose).unwrap();
        assert_eq!(f.torn_bytes, 0);
    }

    #[test]
    fn repairs_file_without_any_newline_and_long_tails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.jsonl");
        std::fs::write(&path, vec![b'x'; 200_000]).unwrap();
        let f = AppendFile::open(&path, SyncPolicy::default()).unwrap();
        assert_eq!(f.torn_bytes, 200_000);
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);

        let mut content = b"{\"id\":\"a\"}\n".to_vec();
        content.extend(vec![b'y'; 150_000]);
        std::fs::write(&path, &content).unwrap();
        let f = AppendFile::open(&path, SyncPolicy::default()).unwrap();
        assert_eq!(f.torn_bytes, 150_000);
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"id\":\"a\"}\n");
    }

    #[test]
    fn second_open_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.jsonl");
        let f = AppendFile::open(&path, SyncPolicy::default()).unwrap();
        let err = AppendFile::open(&path, SyncPolicy::default()).unwrap_err();
        assert!(crate::error_chain(&err).contains("another run"), "{err}");
        assert_eq!(
            err.io_error().map(std::io::Error::kind),
            Some(std::io::ErrorKind::WouldBlock),
            "{err:?}"
        );
        f.close().unwrap();
        AppendFile::open(&path, SyncPolicy::default()).unwrap();
    }

    #[test]
    fn rejects_embedded_newline() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = AppendFile::open(dir.path().join("o"), SyncPolicy::default()).unwrap();
        assert!(f.write_line(b"a\nb").is_err());
    }
}
