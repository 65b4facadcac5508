//! The hidden folder an export is written into before it is moved into place, and the removal
//! of those that a killed export left behind.
//!
//! A staging folder is named `.rmboost-export-<random>` and the first thing written into it is
//! the marker file [`MARKER`], which its export holds under an exclusive advisory lock
//! (`flock`/`LockFileEx`, as the run holds its output files) until the folder is removed. The
//! lock goes with the process, so a folder whose marker can be locked was left by an export
//! that died: [`remove_stale`] removes those, and nothing else (not a folder of that name
//! without the marker, not a link, not a folder another export is writing).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::io::append::if_exists;
use crate::Error;

/// The start of a staging folder's name.
pub(super) const PREFIX: &str = ".rmboost-export-";

/// The marker file in a staging folder.
pub(super) const MARKER: &str = "rmboost-export.lock";

/// What the marker says, for a person who finds the folder.
const MARKER_TEXT: &str = "This folder is an unfinished `rmboost export`. The next export into \
the folder around it removes it when no export is writing it.\n";

/// A staging folder, removed when dropped (or by [`close`](Self::close)).
#[derive(Debug)]
pub(super) struct Staging {
    // Declared first so that it is closed first when dropped: an open file cannot be removed
    // on every platform.
    marker: File,
    dir: tempfile::TempDir,
}

impl Staging {
    /// Makes a staging folder in `parent`, holding its marker.
    ///
    /// The marker is written and locked under another name and then renamed (the lock stays
    /// with the open file), so that no other export ever sees this folder with a marker it
    /// can lock.
    pub(super) fn create(parent: &Path) -> Result<Staging, Error> {
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?;
        let pending = dir.path().join(format!("{MARKER}.partial"));
        let mut marker = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&pending)
            .map_err(|e| Error::io(&pending, e))?;
        // Just created under a name no other export locks: this does not wait.
        marker.lock().map_err(|e| Error::io(&pending, e))?;
        marker
            .write_all(MARKER_TEXT.as_bytes())
            .map_err(|e| Error::io(&pending, e))?;
        let path = dir.path().join(MARKER);
        std::fs::rename(&pending, &path).map_err(|e| Error::io(&path, e))?;
        Ok(Staging { marker, dir })
    }

    /// The folder.
    pub(super) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Removes the folder and everything in it.
    pub(super) fn close(self) -> Result<(), Error> {
        let path = self.dir.path().to_path_buf();
        remove_holding(self.marker, || {
            self.dir.close().map_err(|e| Error::io(path, e))
        })
    }
}

/// Runs `remove` (of the folder `marker` is in), then closes `marker`; where an open file
/// cannot be removed, closes it first. So the lock is kept until the folder is gone wherever
/// that can be.
fn remove_holding<T>(marker: File, remove: impl FnOnce() -> T) -> T {
    #[cfg(windows)]
    drop(marker);
    let out = remove();
    #[cfg(not(windows))]
    drop(marker);
    out
}

/// Removes the staging folders in `dir` that an export which died left behind: those named
/// [`PREFIX`]`*` holding a [`MARKER`] file that no process holds. Returns the folders removed.
///
/// # Errors
///
/// [`ErrorKind::Io`](crate::ErrorKind::Io) naming the path if `dir` cannot be listed, a
/// marker cannot be opened or locked, or a stale folder cannot be removed.
pub(super) fn remove_stale(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.len() > PREFIX.len() && n.starts_with(PREFIX));
        // A staging folder is a folder, never a link (`file_type` does not follow links).
        if !ours || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let marker_path = path.join(MARKER);
        if !std::fs::symlink_metadata(&marker_path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        // None: removed meanwhile (its export finished, or another export cleaned up).
        let Some(marker) = if_exists(&marker_path, File::open)? else {
            continue;
        };
        match marker.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue, // an export is writing it
            Err(TryLockError::Error(e)) => return Err(Error::io(&marker_path, e)),
        }
        remove_holding(marker, || if_exists(&path, std::fs::remove_dir_all))?;
        tracing::info!(
            folder = %path.display(),
            "removed the staging folder of an export that did not finish"
        );
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A staging folder as a killed export leaves it: the marker, not held, and some data.
    fn stale(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.join("data")).unwrap();
        std::fs::write(path.join(MARKER), MARKER_TEXT).unwrap();
        std::fs::write(path.join("data/train-0.parquet.partial"), b"PAR1").unwrap();
        path
    }

    #[test]
    fn a_staging_folder_holds_its_marker_until_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = Staging::create(tmp.path()).unwrap();
        let path = staging.path().to_path_buf();
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(PREFIX));
        assert_eq!(names(&path), [MARKER]);
        assert_eq!(
            std::fs::read_to_string(path.join(MARKER)).unwrap(),
            MARKER_TEXT
        );
        // Held: another open of the marker cannot lock it, and the folder is not stale.
        let other = File::open(path.join(MARKER)).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(other);
        assert!(remove_stale(tmp.path()).unwrap().is_empty());
        assert!(path.is_dir());
        staging.close().unwrap();
        assert!(!path.exists());

        // Dropped without close (an error path): removed as well.
        let staging = Staging::create(tmp.path()).unwrap();
        let path = staging.path().to_path_buf();
        drop(staging);
        assert!(!path.exists());
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn only_unheld_marked_staging_folders_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let a = stale(dir, ".rmboost-export-a1b2c3");
        let b = stale(dir, ".rmboost-export-zz");
        // Not ours: no marker, the bare prefix, another name, a file, the marker a folder.
        std::fs::create_dir(dir.join(".rmboost-export-foo")).unwrap();
        std::fs::write(dir.join(".rmboost-export-foo/keep"), "x").unwrap();
        stale(dir, ".rmboost-export-");
        stale(dir, "rmboost-export-x");
        std::fs::write(dir.join(".rmboost-export-file"), "x").unwrap();
        std::fs::create_dir_all(dir.join(".rmboost-export-dirmarker").join(MARKER)).unwrap();
        // A live export's folder.
        let live = Staging::create(dir).unwrap();
        let mut removed = remove_stale(dir).unwrap();
        removed.sort();
        assert_eq!(removed, [a, b]);
        let mut kept = vec![
            ".rmboost-export-".to_string(),
            ".rmboost-export-dirmarker".into(),
            ".rmboost-export-file".into(),
            ".rmboost-export-foo".into(),
            "rmboost-export-x".into(),
            live.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        ];
        kept.sort();
        assert_eq!(names(dir), kept);
        assert_eq!(names(&dir.join(".rmboost-export-foo")), ["keep"]);
        live.close().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_link_named_like_a_staging_folder_is_left_and_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = stale(tmp.path(), "elsewhere");
        let dir = tmp.path().join("hub");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&target, dir.join(".rmboost-export-link")).unwrap();
        assert!(remove_stale(&dir).unwrap().is_empty());
        assert!(target.join(MARKER).is_file());
        assert!(dir.join(".rmboost-export-link").exists());
    }
}
