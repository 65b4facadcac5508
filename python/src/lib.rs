//! The native half of the `rmboost` Python package: the Rust engine behind a small surface that
//! `rmboost/__init__.py` turns into the Pythonic API.
//!
//! - Backends: [`OpenAI`], [`Anthropic`], [`Local`], and any Python object with a
//!   `complete(messages, **params)` method ([`PyBackend`]; plain or `async def`).
//! - [`Engine`]: a method and its settings ([`MethodConfig`]) and the backend's wrappers (retry,
//!   adaptive limit, rate limit, as `rmboost generate` puts them). `stream` starts a generation
//!   over an iterator of prompt lines; `run` starts `rmboost::run::run_to_file`.
//! - Waiting never holds the GIL, and checks for signals every tenth of a second, so Ctrl-C
//!   raises `KeyboardInterrupt` promptly.
//!
//! One tokio runtime per process, made on first use (never at import, so a program may fork
//! before it generates); a child forked after that makes its own.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use rmboost::backend::adaptive::AdaptiveConfig;
use rmboost::backend::anthropic::AnthropicBackend;
use rmboost::backend::cache::Cache;
use rmboost::backend::local::LocalBackend;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::RetryPolicy;
use rmboost::backend::Stack;
use rmboost::io::{FailureLedger, PromptReader};
use rmboost::run::{
    ensure_distinct_files, run_to_file, BadLinePolicy, CostBudget, ExistingOutput, Outcome, Prices,
    Progress, RunOptions, RunSummary, Shard, StopSignal,
};
use rmboost::{
    async_trait, error_chain, Aspect, Aspects, BackendError, BackendErrorKind, Completion,
    CompletionRequest, ExampleFormat, Generator, LlmBackend, Method, MethodConfig, OutputOrder,
    Usage,
};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

/// How often a wait wakes to check for signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// The process's runtime; a forked child (another pid) gets a new one, since the parent's
/// worker threads do not exist in it.
fn runtime() -> PyResult<Arc<Runtime>> {
    static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(rt.clone());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rmboost")
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the runtime: {e}")))?;
    let rt = Arc::new(rt);
    if let Some((_, old)) = slot.replace((pid, rt.clone())) {
        // The parent's runtime: its threads are gone here, and dropping it would wait for
        // them. Leak it.
        std::mem::forget(old);
    }
    Ok(rt)
}

/// `rmboost.Error(message, kind, example_id)`.
fn py_error(py: Python<'_>, e: &rmboost::Error) -> PyErr {
    error_of(py, &error_chain(e), e.kind_str(), e.example_id())
}

fn error_of(py: Python<'_>, message: &str, kind: &str, id: Option<&str>) -> PyErr {
    match error_value(py, message, kind, id) {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

fn error_value<'py>(
    py: Python<'py>,
    message: &str,
    kind: &str,
    id: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("rmboost")?
        .getattr("Error")?
        .call1((message, kind, id))
}

fn config_error(py: Python<'_>, message: impl Into<String>) -> PyErr {
    py_error(py, &rmboost::Error::config(message))
}

/// Seconds as a duration: positive and finite.
fn seconds(py: Python<'_>, what: &str, secs: f64) -> PyResult<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        return Err(config_error(
            py,
            format!("{what} must be a positive number of seconds, got {secs}"),
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| config_error(py, format!("{what}: {e}")))
}

/// What the HTTP backends share: the built backend, its model and endpoint, and the
/// constructor's keywords for pickling (no key: only the variable's name). [`OpenAI`] and
/// [`Anthropic`] extend it with their constructors.
#[pyclass(module = "rmboost", name = "_HttpBackend", subclass, frozen)]
struct HttpBackend {
    backend: Arc<dyn LlmBackend>,
    model: String,
    endpoint: String,
    settings: Py<PyDict>,
}

#[pymethods]
impl HttpBackend {
    /// Pickles as its constructor's keywords (`datasets` hashes the generator it is given).
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> (Bound<'py, PyTuple>, Bound<'py, PyDict>) {
        (PyTuple::empty(py), self.settings.bind(py).clone())
    }

    #[getter]
    fn model(&self) -> &str {
        &self.model
    }

    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let me = slf.get();
        Ok(format!(
            "rmboost.{}(model={:?}, endpoint={:?})",
            slf.get_type().name()?,
            me.model,
            me.endpoint
        ))
    }
}

/// Applies the keywords both HTTP backends take to `$builder`, records them in `$settings`,
/// builds, and gives the [`HttpBackend`] to extend. (The builders are one generic type whose
/// provider parameter cannot be named outside the library, hence a macro, not a function.)
macro_rules! http_backend {
    (
        $py:ident, $builder:expr, $settings:ident,
        $model:ident, $base_url:ident, $api_key_env:ident, $timeout:ident, $headers:ident
    ) => {{
        $settings.set_item("model", &$model)?;
        $settings.set_item("base_url", &$base_url)?;
        $settings.set_item("api_key_env", &$api_key_env)?;
        $settings.set_item("timeout", $timeout)?;
        $settings.set_item("headers", &$headers)?;
        let mut b = $builder
            .model(&$model)
            .timeout(seconds($py, "timeout", $timeout)?);
        if let Some(url) = $base_url {
            b = b.base_url(url);
        }
        if let Some(var) = $api_key_env {
            b = b.api_key_env(var);
        }
        for (name, value) in $headers.unwrap_or_default() {
            b = b.header(name, value);
        }
        let backend = b.build().map_err(|e| py_error($py, &e))?;
        PyClassInitializer::from(HttpBackend {
            endpoint: backend.endpoint(),
            model: $model,
            backend: Arc::new(backend),
            settings: $settings.unbind(),
        })
    }};
}

/// An OpenAI-compatible server (see the stub's docstring).
#[pyclass(module = "rmboost", extends = HttpBackend, frozen)]
struct OpenAI;

#[pymethods]
impl OpenAI {
    #[new]
    #[pyo3(signature = (*, model, base_url=None, api_key_env=None, timeout=120.0, extra_body=None, headers=None))]
    fn new(
        py: Python<'_>,
        model: String,
        base_url: Option<String>,
        api_key_env: Option<String>,
        timeout: f64,
        extra_body: Option<Bound<'_, PyDict>>,
        headers: Option<BTreeMap<String, String>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let settings = PyDict::new(py);
        settings.set_item("extra_body", &extra_body)?;
        let mut b = OpenAiBackend::builder();
        if let Some(extra) = extra_body {
            let json = py.import("json")?;
            for (name, value) in extra.iter() {
                let name: String = name.extract()?;
                let text: String = json.call_method1("dumps", (value,))?.extract()?;
                let value = serde_json::from_str(&text)
                    .map_err(|e| config_error(py, format!("extra_body[{name:?}]: {e}")))?;
                b = b.extra_body(name, value);
            }
        }
        let base = http_backend!(
            py,
            b,
            settings,
            model,
            base_url,
            api_key_env,
            timeout,
            headers
        );
        Ok(base.add_subclass(OpenAI))
    }
}

/// Anthropic's Messages API.
#[pyclass(module = "rmboost", extends = HttpBackend, frozen)]
struct Anthropic;

#[pymethods]
impl Anthropic {
    #[new]
    #[pyo3(signature = (*, model, base_url=None, api_key_env=None, timeout=120.0, headers=None))]
    fn new(
        py: Python<'_>,
        model: String,
        base_url: Option<String>,
        api_key_env: Option<String>,
        timeout: f64,
        headers: Option<BTreeMap<String, String>>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let settings = PyDict::new(py);
        let b = AnthropicBackend::builder();
        let base = http_backend!(
            py,
            b,
            settings,
            model,
            base_url,
            api_key_env,
            timeout,
            headers
        );
        Ok(base.add_subclass(Anthropic))
    }
}

/// The in-process model.
#[pyclass(module = "rmboost", frozen)]
struct Local {
    backend: Arc<dyn LlmBackend>,
    model: String,
    path: String,
}

#[pymethods]
impl Local {
    #[new]
    #[pyo3(signature = (*, model_path=None, fetch=true))]
    fn new(py: Python<'_>, model_path: Option<PathBuf>, fetch: bool) -> PyResult<Self> {
        let mut b = LocalBackend::builder().fetch_default_model(fetch);
        if let Some(path) = model_path {
            b = b.model_path(path);
        }
        // Loading (and a first fetch) takes seconds: without the GIL.
        let backend = py.detach(|| b.build()).map_err(|e| py_error(py, &e))?;
        Ok(Local {
            model: backend.model().into_owned(),
            path: backend.model_path().display().to_string(),
            backend: Arc::new(backend),
        })
    }

    #[getter]
    fn model(&self) -> &str {
        &self.model
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Pickles as the model file it loaded (unpickling loads it again).
    fn __getnewargs_ex__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
        let settings = PyDict::new(py);
        settings.set_item("model_path", &self.path)?;
        settings.set_item("fetch", false)?;
        Ok((PyTuple::empty(py), settings))
    }

    fn __repr__(&self) -> String {
        format!(
            "rmboost.Local(model={:?}, path={:?})",
            self.model, self.path
        )
    }
}

/// A backend written in Python: an object with `complete(messages, **params) -> str`, plain
/// (called on a blocking thread, holding the GIL only while it runs Python) or `async def`
/// (scheduled on `event_loop`, a loop running in another thread).
struct PyBackend {
    /// Behind `Arc`s, so a call takes them to its thread without the GIL.
    object: Arc<Py<PyAny>>,
    event_loop: Option<Arc<Py<PyAny>>>,
    name: String,
}

impl PyBackend {
    /// `complete`'s arguments: the messages as dicts, and the request's sampling settings
    /// that are set.
    fn arguments<'py>(
        py: Python<'py>,
        request: &CompletionRequest,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyDict>)> {
        let messages = PyList::empty(py);
        for m in &request.messages {
            let d = PyDict::new(py);
            d.set_item("role", m.role.as_str())?;
            d.set_item("content", &m.content)?;
            messages.append(d)?;
        }
        let params = PyDict::new(py);
        if let Some(t) = request.temperature {
            params.set_item("temperature", t)?;
        }
        if let Some(p) = request.top_p {
            params.set_item("top_p", p)?;
        }
        if let Some(n) = request.max_tokens {
            params.set_item("max_tokens", n)?;
        }
        if let Some(s) = request.seed {
            params.set_item("seed", s)?;
        }
        if !request.stop.is_empty() {
            params.set_item("stop", request.stop.clone())?;
        }
        Ok((messages, params))
    }

    /// The backend error of a Python exception, by its type (`rmboost._classify`).
    fn error(py: Python<'_>, err: PyErr) -> BackendError {
        let classified = py
            .import("rmboost")
            .and_then(|m| m.getattr("_classify"))
            .and_then(|f| f.call1((err.value(py),)))
            .and_then(|t| t.extract::<(String, String, Option<f64>)>());
        let (kind, message, retry_after) = match classified {
            Ok(c) => c,
            Err(_) => ("fatal".to_string(), err.to_string(), None),
        };
        let mut e = match kind.as_str() {
            "rate_limited" => BackendError::new(BackendErrorKind::RateLimited, message),
            "timeout" => BackendError::new(BackendErrorKind::Timeout, message),
            "connection" => BackendError::new(BackendErrorKind::Connection, message),
            "retryable" => BackendError::retryable(message),
            "example" => BackendError::fails_example(message),
            _ => BackendError::stops_run(message),
        };
        if let Some(wait) = retry_after.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
            e = e.with_retry_after(wait);
        }
        e
    }

    /// The completion of what `complete` returned: the text, or a dict with `text` and the
    /// call's `prompt_tokens` and `completion_tokens` (counted in the summary and by a cost
    /// budget).
    fn completion(value: &Bound<'_, PyAny>) -> Result<Completion, BackendError> {
        if let Ok(text) = value.extract::<String>() {
            return Ok(Completion::new(text));
        }
        let bad = |what: String| {
            BackendError::stops_run(format!(
                "a Python backend's complete() must return a str or a dict with \"text\" (and \
                 optionally \"prompt_tokens\", \"completion_tokens\"): {what}"
            ))
        };
        let Ok(dict) = value.cast::<PyDict>() else {
            let name = value.get_type().name().map(|n| n.to_string());
            return Err(bad(format!("got {}", name.unwrap_or_default())));
        };
        let text: String = match dict.get_item("text") {
            Ok(Some(text)) => text
                .extract()
                .map_err(|_| bad("\"text\" is not a str".into()))?,
            _ => return Err(bad("no \"text\"".into())),
        };
        let count = |key: &str| -> Result<u64, BackendError> {
            match dict.get_item(key) {
                Ok(Some(n)) if !n.is_none() => n
                    .extract::<u64>()
                    .map_err(|_| bad(format!("{key:?} is not a count"))),
                _ => Ok(0),
            }
        };
        let usage = Usage::new(count("prompt_tokens")?, count("completion_tokens")?);
        Ok(Completion::new(text).with_usage(usage))
    }
}

/// Called by the event loop when an `async def complete` call ends: passes its result on.
#[pyclass(frozen)]
struct Done {
    tx: Mutex<Option<oneshot::Sender<Result<Completion, BackendError>>>>,
}

#[pymethods]
impl Done {
    fn __call__(&self, py: Python<'_>, future: Bound<'_, PyAny>) {
        let result = match future.call_method0("result") {
            Ok(value) => PyBackend::completion(&value),
            Err(e) => Err(PyBackend::error(py, e)),
        };
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(result);
        }
    }
}

/// Cancels the scheduled coroutine when the call is dropped before it ended (the example was
/// given up), on a blocking thread: the runtime's workers never wait for the GIL.
struct CancelOnDrop(Option<Py<PyAny>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            let cancel = move || {
                Python::attach(|py| {
                    let _ = future.call_method0(py, "cancel");
                })
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(cancel)),
                Err(_) => cancel(),
            }
        }
    }
}

/// Runs `f` with the GIL on a blocking thread (Python code may take its time; the runtime's
/// workers go on with other calls).
async fn with_gil<T, F>(f: F) -> Result<T, BackendError>
where
    T: Send + 'static,
    F: FnOnce(Python<'_>) -> Result<T, BackendError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || Python::attach(f))
        .await
        .unwrap_or_else(|e| Err(BackendError::stops_run(format!("the call panicked: {e}"))))
}

#[async_trait]
impl LlmBackend for PyBackend {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let object = self.object.clone();
        match self.event_loop.clone() {
            Some(event_loop) => {
                let (tx, mut rx) = oneshot::channel();
                let future =
                    with_gil(move |py| {
                        let submit =
                            || -> PyResult<Py<PyAny>> {
                                let (messages, params) = Self::arguments(py, &request)?;
                                let done = Py::new(
                                    py,
                                    Done {
                                        tx: Mutex::new(Some(tx)),
                                    },
                                )?;
                                let future = py.import("rmboost")?.getattr("_call_async")?.call1(
                                    (object.bind(py), messages, params, event_loop.bind(py), done),
                                )?;
                                Ok(future.unbind())
                            };
                        submit().map_err(|e| Self::error(py, e))
                    })
                    .await?;
                let mut cancel = CancelOnDrop(Some(future));
                let result = (&mut rx).await.unwrap_or_else(|_| {
                    Err(BackendError::retryable(
                        "the event loop dropped the call (was it closed?)",
                    ))
                });
                // It ended: nothing to cancel (the future is released without the GIL).
                drop(cancel.0.take());
                result
            }
            None => {
                with_gil(move |py| {
                    let (messages, params) =
                        Self::arguments(py, &request).map_err(|e| Self::error(py, e))?;
                    match object
                        .bind(py)
                        .call_method("complete", (messages,), Some(&params))
                    {
                        Ok(value) => Self::completion(&value),
                        Err(e) => Err(Self::error(py, e)),
                    }
                })
                .await
            }
        }
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed("python")
    }

    fn model(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(&self.name)
    }
}

/// What the engine's backend is.
enum Backend {
    /// An HTTP backend: retried, adaptively limited, rate limited.
    Http(Arc<dyn LlmBackend>, String),
    /// The in-process model: none of the wrappers (it queues its own requests).
    Local(Arc<dyn LlmBackend>, String),
    /// A Python object: retried and limited like an HTTP backend.
    Python(Py<PyAny>, String),
}

/// A method, its settings and the backend; starts generations and runs.
#[pyclass(module = "rmboost", name = "_Engine", frozen)]
struct Engine {
    config: MethodConfig,
    format: ExampleFormat,
    backend: Backend,
    retries: u32,
    adaptive: bool,
    rpm: Option<NonZeroU32>,
    tpm: Option<NonZeroU32>,
}

fn parse_order(py: Python<'_>, order: &str) -> PyResult<OutputOrder> {
    match order {
        "completion" => Ok(OutputOrder::Completion),
        "input" => Ok(OutputOrder::Input),
        other => Err(config_error(
            py,
            format!("order must be \"completion\" or \"input\", not {other:?}"),
        )),
    }
}

/// The aspects of `aspects=`: a preset, a JSON file, or (name, definition) pairs.
fn aspects_of(py: Python<'_>, aspects: &Bound<'_, PyAny>) -> PyResult<Aspects> {
    if let Ok(spec) = aspects.extract::<String>() {
        return Aspects::from_spec(&spec).map_err(|e| match e.kind() {
            rmboost::ErrorKind::Config => config_error(py, format!("aspects: {}", error_chain(&e))),
            _ => py_error(py, &e),
        });
    }
    let pairs: Vec<(String, String)> = aspects.extract()?;
    let list = pairs
        .into_iter()
        .map(|(name, definition)| Aspect::new(name, definition))
        .collect();
    Aspects::custom("custom", list).map_err(|e| py_error(py, &e))
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (backend, *, method, aspects, aspect_sampling, labels, p_better, seed,
        concurrency, order, format, temperature, max_tokens, max_reasks, samples, retries,
        adaptive, requests_per_minute, tokens_per_minute))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backend: Bound<'_, PyAny>,
        method: &str,
        aspects: Bound<'_, PyAny>,
        aspect_sampling: Option<&str>,
        labels: &str,
        p_better: f64,
        seed: u64,
        concurrency: usize,
        order: &str,
        format: &str,
        temperature: f32,
        max_tokens: Option<u32>,
        max_reasks: u32,
        samples: usize,
        retries: u32,
        adaptive: bool,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u32>,
    ) -> PyResult<Self> {
        let method: Method = method.parse().map_err(|e| py_error(py, &e))?;
        let mut config = MethodConfig::new(method);
        let mut set = aspects_of(py, &aspects)?;
        if let Some(mode) = aspect_sampling {
            set = set
                .with_sampling_mode(mode)
                .map_err(|e| config_error(py, format!("aspect_sampling: {}", error_chain(&e))))?;
        }
        config.aspects = set;
        config.graded = match labels {
            "bernoulli" => false,
            "graded" => true,
            other => {
                return Err(config_error(
                    py,
                    format!("labels must be \"bernoulli\" or \"graded\", not {other:?}"),
                ))
            }
        };
        config.p_better = p_better;
        config.seed = seed;
        config.concurrency = NonZeroUsize::new(concurrency)
            .ok_or_else(|| config_error(py, "concurrency must be at least 1"))?;
        config.order = parse_order(py, order)?;
        config.temperature = temperature;
        config.max_tokens = max_tokens;
        config.max_reasks = max_reasks;
        config.samples = samples;
        let format = ExampleFormat::from_name(format).ok_or_else(|| {
            config_error(
                py,
                format!("format must be \"conversational\" or \"standard\", not {format:?}"),
            )
        })?;
        let rpm = requests_per_minute
            .map(|n| {
                NonZeroU32::new(n)
                    .ok_or_else(|| config_error(py, "requests_per_minute must be at least 1"))
            })
            .transpose()?;
        let tpm = tokens_per_minute
            .map(|n| {
                NonZeroU32::new(n)
                    .ok_or_else(|| config_error(py, "tokens_per_minute must be at least 1"))
            })
            .transpose()?;
        let backend = if let Ok(b) = backend.cast::<HttpBackend>() {
            Backend::Http(b.get().backend.clone(), HttpBackend::__repr__(b)?)
        } else if let Ok(b) = backend.cast::<Local>() {
            let b = b.get();
            Backend::Local(b.backend.clone(), b.__repr__())
        } else {
            let name = backend.get_type().qualname()?.to_string();
            Backend::Python(backend.unbind(), name)
        };
        let engine = Engine {
            config,
            format,
            backend,
            retries,
            adaptive,
            rpm,
            tpm,
        };
        // Check every setting now (a bad probability, too few samples), not at the first row.
        engine.generator(py, None, None)?;
        Ok(engine)
    }

    fn describe(&self) -> String {
        let backend = match &self.backend {
            Backend::Http(_, d) | Backend::Local(_, d) => d.clone(),
            Backend::Python(_, name) => format!("<{name}>"),
        };
        format!(
            "{backend}, method={:?}, seed={}, concurrency={}",
            self.config.method.as_str(),
            self.config.seed,
            self.config.concurrency
        )
    }

    /// Starts a generation over `lines` (an iterator of JSON prompt lines).
    fn stream(
        &self,
        py: Python<'_>,
        lines: Bound<'_, PyAny>,
        event_loop: Option<Py<PyAny>>,
    ) -> PyResult<Stream> {
        let generator = self.generator(py, event_loop, None)?;
        let rt = runtime()?;
        let raised = Arc::new(Mutex::new(None));
        let lines = PyLines::new(lines.unbind(), raised.clone());
        let reader = PromptReader::new(BufReader::new(lines), "prompts");
        let prompts = reader.into_stream();
        let capacity = self.config.concurrency.get().max(16);
        let (tx, rx) = mpsc::channel(capacity);
        let format = self.format;
        let task = rt.spawn(async move {
            let mut results = generator.generate_boxed(prompts);
            while let Some(result) = results.next().await {
                let item = result.map(|example| example.to_json_line(format));
                if tx.send(item).await.is_err() {
                    return; // the Python side closed the stream
                }
            }
        });
        Ok(Stream {
            rx: Mutex::new(rx),
            task: task.abort_handle(),
            raised,
        })
    }

    /// Starts `run_to_file`.
    #[pyo3(signature = (input, output, *, overwrite, limit, shard, ledger, cache_dir, on_bad_line,
        price_input, price_output, max_cost, event_loop))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        input: PathBuf,
        output: PathBuf,
        overwrite: bool,
        limit: Option<u64>,
        shard: Option<&str>,
        ledger: Option<PathBuf>,
        cache_dir: Option<PathBuf>,
        on_bad_line: &str,
        price_input: Option<f64>,
        price_output: Option<f64>,
        max_cost: Option<f64>,
        event_loop: Option<Py<PyAny>>,
    ) -> PyResult<Run> {
        let budget = match (price_input, price_output, max_cost) {
            (_, _, None) => None,
            (None, None, Some(_)) => {
                return Err(config_error(
                    py,
                    "max_cost needs price_input and/or price_output (per million tokens)",
                ))
            }
            (i, o, Some(max)) => {
                let prices = Prices::new(i.unwrap_or(0.0), o.unwrap_or(0.0))
                    .map_err(|e| py_error(py, &e))?;
                Some(CostBudget::new(prices, max).map_err(|e| py_error(py, &e))?)
            }
        };
        let ledger = ledger.unwrap_or_else(|| FailureLedger::default_path(&output));
        ensure_distinct_files(&[
            ("input", input.as_path()),
            ("output", output.as_path()),
            ("failure ledger", ledger.as_path()),
        ])
        .map_err(|e| py_error(py, &e))?;
        let bad_lines = match on_bad_line {
            "skip" => BadLinePolicy::Skip,
            "stop" => BadLinePolicy::Stop,
            other => {
                return Err(config_error(
                    py,
                    format!("on_bad_line must be \"skip\" or \"stop\", not {other:?}"),
                ))
            }
        };
        let shard = shard
            .map(|s| s.parse::<Shard>())
            .transpose()
            .map_err(|e| config_error(py, format!("shard: {}", error_chain(&e))))?;
        if limit == Some(0) {
            return Err(config_error(py, "limit must be at least 1"));
        }
        let cache = match cache_dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| py_error(py, &rmboost::Error::io(dir.clone(), e)))?;
                Some(Cache::open(dir.join("responses.redb")).map_err(|e| py_error(py, &e))?)
            }
        };
        let (generator, meter) = {
            let stacked = self.stacked(py, event_loop, cache.clone())?;
            let meter = stacked.meter().clone();
            (
                self.config.build(stacked).map_err(|e| py_error(py, &e))?,
                meter,
            )
        };
        let prompts = rmboost::read_prompts(&input)
            .map_err(|e| py_error(py, &e))?
            .into_stream();
        let stop = StopSignal::new();
        let progress = Progress::new();
        let mut options = RunOptions::new()
            .format(self.format)
            .existing(if overwrite {
                ExistingOutput::Overwrite
            } else {
                ExistingOutput::Resume
            })
            .bad_lines(bad_lines)
            .ledger(ledger)
            .input(input)
            .recipe(self.config.recipe())
            .stop_signal(stop.clone())
            .progress(progress.clone())
            .meter(meter)
            .stop_when_unreachable(Some(rmboost::run::unreachable_after(
                self.config.concurrency.get(),
            )));
        if let Some(shard) = shard {
            options = options.shard(shard);
        }
        if let Some(limit) = limit {
            options = options.limit(limit);
        }
        if let Some(budget) = budget {
            options = options.max_cost(budget);
        }
        let expected = rmboost::run::expected_examples(&output, &options);
        let rt = runtime()?;
        let task = rt.spawn(async move {
            let result = run_to_file(
                move |prompts| generator.generate_boxed(prompts),
                prompts,
                &output,
                options,
            )
            .await;
            if let Some(cache) = cache {
                // A call returns once its answer is queued: commit the last ones.
                let _ = cache.flush().await;
            }
            result
        });
        Ok(Run {
            task: Mutex::new(Some(task)),
            result: Mutex::new(None),
            stop,
            progress,
            expected,
        })
    }
}

impl Engine {
    /// The backend in its wrappers, as `rmboost generate` puts them.
    fn stacked(
        &self,
        py: Python<'_>,
        event_loop: Option<Py<PyAny>>,
        cache: Option<Cache>,
    ) -> PyResult<rmboost::backend::Stacked> {
        let mut stack = Stack::new();
        if let Some(cache) = cache {
            stack = stack.cache(cache);
        }
        let online = |mut stack: Stack| -> PyResult<Stack> {
            if let Some(rpm) = self.rpm {
                stack = stack.requests_per_minute(rpm);
            }
            if let Some(tpm) = self.tpm {
                stack = stack.tokens_per_minute(tpm);
            }
            let attempts = NonZeroU32::new(self.retries.saturating_add(1)).expect("at least 1");
            let limit = AdaptiveConfig::builder(self.config.concurrency)
                .adaptive(self.adaptive)
                .build()
                .map_err(|e| py_error(py, &e))?;
            Ok(stack
                .retry(RetryPolicy::default().max_attempts(attempts))
                .adaptive(limit))
        };
        Ok(match &self.backend {
            Backend::Http(b, _) => online(stack)?.build(b.clone()),
            Backend::Local(b, _) => stack.build(b.clone()),
            Backend::Python(object, name) => online(stack)?.build(PyBackend {
                object: Arc::new(object.clone_ref(py)),
                event_loop: event_loop.map(Arc::new),
                name: name.clone(),
            }),
        })
    }

    fn generator(
        &self,
        py: Python<'_>,
        event_loop: Option<Py<PyAny>>,
        cache: Option<Cache>,
    ) -> PyResult<Arc<dyn Generator>> {
        let stacked = self.stacked(py, event_loop, cache)?;
        self.config.build(stacked).map_err(|e| py_error(py, &e))
    }
}

/// A generation in progress: rows as JSON lines, failed examples as `rmboost.Error` values.
#[pyclass(module = "rmboost", name = "_Stream", frozen)]
struct Stream {
    rx: Mutex<mpsc::Receiver<Result<String, rmboost::Error>>>,
    task: tokio::task::AbortHandle,
    /// An exception of the prompts' iterator: raised as it is (the engine saw an I/O error).
    raised: Arc<Mutex<Option<PyErr>>>,
}

#[pymethods]
impl Stream {
    /// The next row (a JSON line), a failed example (an `rmboost.Error` value, not raised),
    /// or `None` at the end. Raises `rmboost.Error` for a fatal error or a bad prompt, and
    /// `KeyboardInterrupt` on Ctrl-C.
    fn next(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            // The lock is taken without the GIL: a second reader waits here, not holding
            // the GIL this reader needs to return.
            let got = py.detach(|| {
                let rt = runtime()?;
                let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
                Ok::<_, PyErr>(
                    rt.block_on(async { tokio::time::timeout(SIGNAL_POLL, rx.recv()).await }),
                )
            })?;
            match got {
                Err(_elapsed) => py.check_signals()?,
                Ok(None) => return Ok(None),
                Ok(Some(Ok(line))) => return Ok(Some(line.into_pyobject(py)?.into_any().unbind())),
                Ok(Some(Err(e))) if e.is_fatal() || e.example_id().is_none() => {
                    let raised = self.raised.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return Err(match raised {
                        Some(original) if e.kind() == rmboost::ErrorKind::Io => original,
                        _ => py_error(py, &e),
                    });
                }
                Ok(Some(Err(e))) => {
                    let value = error_value(py, &error_chain(&e), e.kind_str(), e.example_id())?;
                    return Ok(Some(value.unbind()));
                }
            }
        }
    }

    /// Stops the generation: calls in flight are dropped.
    fn close(&self) {
        self.task.abort();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A run in progress.
#[pyclass(module = "rmboost", name = "_Run", frozen)]
struct Run {
    task: Mutex<Option<tokio::task::JoinHandle<rmboost::Result<RunSummary>>>>,
    result: Mutex<Option<rmboost::Result<RunSummary>>>,
    stop: StopSignal,
    progress: Progress,
    expected: Option<u64>,
}

#[pymethods]
impl Run {
    /// Waits up to `timeout` seconds; true once the run has ended. Raises
    /// `KeyboardInterrupt` on Ctrl-C (the run goes on until `stop`).
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let wait = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(SIGNAL_POLL);
        let deadline = std::time::Instant::now() + wait;
        loop {
            let step = deadline
                .saturating_duration_since(std::time::Instant::now())
                .min(SIGNAL_POLL);
            // The lock is taken without the GIL (see `_Stream.next`).
            let ended = py.detach(|| {
                let rt = runtime()?;
                let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
                let Some(handle) = task.as_mut() else {
                    return Ok::<_, PyErr>(true);
                };
                let Ok(joined) = rt.block_on(async { tokio::time::timeout(step, handle).await })
                else {
                    return Ok(false);
                };
                let result = joined.unwrap_or_else(|e| {
                    Err(rmboost::Error::config(format!("the run panicked: {e}")))
                });
                *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                *task = None;
                Ok(true)
            })?;
            if ended {
                return Ok(true);
            }
            py.check_signals()?;
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Examples finished so far (written, failed or skipped as done).
    fn progress(&self) -> u64 {
        let s = self.progress.snapshot();
        s.generation.examples + s.generation.failed() + s.skipped_done
    }

    fn expected(&self) -> Option<u64> {
        self.expected
    }

    /// Stops taking prompts; the calls in flight finish and are written.
    fn stop(&self) {
        self.stop.stop();
    }

    /// The summary of the ended run, or its error raised.
    fn summary(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let result = self.result.lock().unwrap_or_else(|e| e.into_inner());
        match result.as_ref() {
            None => Err(PyRuntimeError::new_err("the run has not ended")),
            Some(Err(e)) => Err(py_error(py, e)),
            Some(Ok(s)) => summary_dict(py, s),
        }
    }
}

fn summary_dict(py: Python<'_>, s: &RunSummary) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    let outcome = serde_json::to_value(s.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    d.set_item("outcome", outcome)?;
    d.set_item("message", s.message.clone())?;
    d.set_item("examples", s.generation.examples)?;
    d.set_item("better", s.generation.better)?;
    d.set_item("worse", s.generation.examples - s.generation.better)?;
    d.set_item("failed", s.generation.failed())?;
    let failures = PyDict::new(py);
    for (kind, n) in &s.generation.failures {
        failures.set_item(*kind, *n)?;
    }
    d.set_item("failures", failures)?;
    d.set_item("reasks", s.generation.reasks)?;
    d.set_item("skipped_done", s.skipped_done)?;
    d.set_item("bad_lines", s.bad_lines)?;
    d.set_item("duplicates", s.duplicates)?;
    d.set_item("other_shard", s.other_shard)?;
    d.set_item("ledger_pending", s.ledger_pending)?;
    d.set_item("calls", s.calls)?;
    d.set_item("prompt_tokens", s.usage.prompt_tokens)?;
    d.set_item("completion_tokens", s.usage.completion_tokens)?;
    d.set_item("cost", s.cost)?;
    d.set_item("elapsed_secs", s.elapsed.as_secs_f64())?;
    d.set_item("examples_per_sec", s.examples_per_sec())?;
    d.set_item("interrupted", s.outcome == Outcome::Interrupted)?;
    Ok(d.unbind())
}

/// Reads prompts from a Python iterator of JSON lines, one line per item, holding the GIL
/// only while it takes an item.
struct PyLines {
    iter: Py<PyAny>,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
    /// The exception the iterator raised, for the stream to raise as it is.
    raised: Arc<Mutex<Option<PyErr>>>,
}

impl PyLines {
    fn new(iter: Py<PyAny>, raised: Arc<Mutex<Option<PyErr>>>) -> Self {
        PyLines {
            iter,
            buf: Vec::new(),
            pos: 0,
            done: false,
            raised,
        }
    }
}

impl Read for PyLines {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() && !self.done {
            let next = Python::attach(|py| -> PyResult<Option<String>> {
                let iter = self.iter.bind(py);
                match iter.call_method0("__next__") {
                    Ok(line) => Ok(Some(line.extract()?)),
                    Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => Ok(None),
                    Err(e) => Err(e),
                }
            });
            match next {
                Ok(Some(line)) => {
                    self.buf = line.into_bytes();
                    self.buf.push(b'\n');
                    self.pos = 0;
                }
                Ok(None) => self.done = true,
                Err(e) => {
                    self.done = true;
                    let message = e.to_string();
                    *self.raised.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return Err(std::io::Error::other(message));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `rmboost report --json` of a dataset (and its ledger).
#[pyfunction]
#[pyo3(signature = (path, ledger=None))]
fn _report(py: Python<'_>, path: PathBuf, ledger: Option<PathBuf>) -> PyResult<String> {
    let report = py
        .detach(|| match &ledger {
            Some(l) => rmboost::report::Report::from_jsonl_with_ledger(&path, l),
            None => rmboost::report::Report::from_jsonl(&path),
        })
        .map_err(|e| py_error(py, &e))?;
    serde_json::to_string(&report).map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymodule]
fn _rmboost(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OpenAI>()?;
    m.add_class::<Anthropic>()?;
    m.add_class::<Local>()?;
    m.add_class::<Engine>()?;
    m.add_class::<Stream>()?;
    m.add_class::<Run>()?;
    m.add_function(wrap_pyfunction!(_report, m)?)?;
    Ok(())
}
