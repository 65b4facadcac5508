//! [`Adaptive`]: finds how many calls a provider takes at once instead of guessing, and stops
//! sending into an outage.
//!
//! The wrapper keeps a limit on the calls in flight to one backend and moves it with what the
//! backend answers (AIMD, additive increase and multiplicative decrease, as TCP does):
//!
//! - It starts at the cap (the configured concurrency) and never goes above it.
//! - A rate limit (HTTP 429, [`BackendErrorKind::RateLimited`]) multiplies the limit by the
//!   [decrease factor](AdaptiveConfigBuilder::decrease_factor) (default 0.75). Only a call
//!   admitted under the current limit can cut it: every cut starts a new *epoch*, each call
//!   remembers the epoch it was admitted in, and a 429 from an earlier epoch (a call sent while
//!   the limit was higher) is counted but cuts nothing. A burst of 429s from one overload so
//!   cuts the limit once, not once per call. After a cut, no further cut for a short
//!   [cool-down](AdaptiveConfigBuilder::cooldown).
//! - A run of successes raises it by one: [`increase_after`](AdaptiveConfigBuilder::increase_after)
//!   successes (default 25) in a row, counting only calls that took the last free slot (with
//!   slots to spare a success says nothing about a higher limit). Below the limit the last cut
//!   came from, the limit is
//!   known to have worked, so it climbs back faster (one per
//!   [`recovery_increase_after`](AdaptiveConfigBuilder::recovery_increase_after) successes,
//!   default 2) and probes above it slowly. The time calls take plays no part.
//! - A `Retry-After` (on any retryable error) pauses admission of every call to this backend
//!   until it has passed, not only the retry of the call that got it.
//! - A circuit breaker: [`breaker_threshold`](AdaptiveConfigBuilder::breaker_threshold) server
//!   errors, connection failures or timeouts in a row (default 5) *open* it: no call is admitted
//!   for [`breaker_pause`](AdaptiveConfigBuilder::breaker_pause) (default 2 s). Then it is
//!   *half open*: one call (the probe) goes through. A probe that succeeds (or gets any answer
//!   that is not an outage) *closes* the breaker; one that fails opens it again for twice the
//!   pause, up to [`breaker_max_pause`](AdaptiveConfigBuilder::breaker_max_pause) (default 60 s).
//!
//! Calls that cannot be admitted wait in a first-in, first-out queue. Every error is returned
//! unchanged: whether and when a call is retried is still the retry layer's decision.
//!
//! # Where it goes
//!
//! The wrapper must see every attempt, so it goes *inside* the retry layer, with a rate limit
//! (if any) inside it and a response cache outside everything:
//! `Cached(Retry(Adaptive(RateLimit(backend))))`. Outside the retry layer it would see only
//! the last attempt of each request and miss most 429s.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::num::NonZeroUsize;
//! use std::time::Duration;
//! use rmboost::backend::adaptive::{Adaptive, AdaptiveConfig, BreakerState};
//! use rmboost::backend::retry::{Retry, RetryPolicy};
//! use rmboost::testing::ScriptedBackend;
//! use rmboost::{BackendError, CompletionRequest, LlmBackend, Message};
//!
//! let scripted = ScriptedBackend::new();
//! scripted.push_error(BackendError::rate_limited("slow down"));
//! scripted.push_text("hello");
//!
//! // `--concurrency 64` is the cap; the limit moves below it.
//! let config = AdaptiveConfig::builder(NonZeroUsize::new(64).unwrap())
//!     .decrease_factor(0.75)
//!     .cooldown(Duration::from_millis(100))
//!     .build()?;
//! let adaptive = Adaptive::with_config(scripted.clone(), config);
//! let stats = adaptive.stats(); // cheap to read at any time
//! let backend = Retry::with_policy(adaptive, RetryPolicy::default().initial_delay(Duration::from_millis(1)));
//!
//! let answer = backend.complete(CompletionRequest::new(vec![Message::user("hi")])).await?;
//! assert_eq!(answer.text, "hello");
//! let now = stats.snapshot();
//! assert_eq!((now.calls, now.rate_limited), (2, 1));
//! assert_eq!(now.limit, 48); // 64 x 0.75
//! assert_eq!(now.breaker, BreakerState::Closed);
//! # Ok(())
//! # }
//! ```
//!
//! # Why not `tokio::sync::Semaphore`
//!
//! A semaphore cannot take back permits that are out, so shrinking it below the calls in flight
//! needs a debt of permits to forget as they come back; it also has no notion of a pause or a
//! single probe, and its queue cannot be told to hold everyone until a deadline. The limiter
//! here is a counter and a FIFO queue of waiters under one `Mutex` (held for a few
//! instructions, never across an await), each waiter with its own `Notify`: a released slot
//! wakes the first waiter only, which passes the wake on when it is admitted, so a release
//! costs one wake-up and a cancelled waiter hands its turn to the next.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{Completion, CompletionRequest, LlmBackend};
use crate::error::{BackendError, BackendErrorKind};

// ---------------------------------------------------------------------------------------------
// Configuration.

/// The settings of an [`Adaptive`] wrapper; made by [`AdaptiveConfig::builder`] (validated)
/// or [`AdaptiveConfig::new`] (all defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    cap: usize,
    initial: usize,
    min: usize,
    adaptive: bool,
    decrease_factor: f64,
    increase_after: u32,
    recovery_increase_after: u32,
    cooldown: Duration,
    max_pause: Duration,
    breaker_threshold: Option<u32>,
    breaker_pause: Duration,
    breaker_max_pause: Duration,
}

impl AdaptiveConfig {
    /// The defaults with this cap: the limit starts at the cap and adapts, and the breaker is
    /// on. See [`AdaptiveConfigBuilder`] for each default.
    #[must_use]
    pub fn new(cap: NonZeroUsize) -> Self {
        AdaptiveConfig {
            cap: cap.get(),
            initial: cap.get(),
            min: 1,
            adaptive: true,
            decrease_factor: 0.75,
            increase_after: 25,
            recovery_increase_after: 2,
            cooldown: Duration::from_millis(20),
            max_pause: Duration::from_secs(60),
            breaker_threshold: Some(5),
            breaker_pause: Duration::from_secs(2),
            breaker_max_pause: Duration::from_secs(60),
        }
    }

    /// A builder starting from the defaults with this cap: the most calls in flight there
    /// will ever be (use the run's concurrency).
    pub fn builder(cap: NonZeroUsize) -> AdaptiveConfigBuilder {
        AdaptiveConfigBuilder {
            config: AdaptiveConfig::new(cap),
            initial: None,
        }
    }

    /// The most calls in flight.
    #[must_use]
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether the limit adapts (false: it stays at the cap).
    #[must_use]
    pub fn is_adaptive(&self) -> bool {
        self.adaptive
    }
}

/// Builds an [`AdaptiveConfig`]; [`build`](Self::build) checks the values.
#[derive(Debug, Clone)]
#[must_use]
pub struct AdaptiveConfigBuilder {
    config: AdaptiveConfig,
    initial: Option<usize>,
}

impl AdaptiveConfigBuilder {
    /// The limit at the start. Default: the cap.
    pub fn initial_limit(mut self, initial: NonZeroUsize) -> Self {
        self.initial = Some(initial.get());
        self
    }

    /// The lowest the limit goes. Default 1.
    pub fn min_limit(mut self, min: NonZeroUsize) -> Self {
        self.config.min = min.get();
        self
    }

    /// Whether the limit adapts. Default true. With false the limit stays at the initial
    /// limit (the cap by default), while `Retry-After` pauses, the circuit breaker and the
    /// statistics work as usual: a fixed concurrency that still stops for an outage.
    pub fn adaptive(mut self, adaptive: bool) -> Self {
        self.config.adaptive = adaptive;
        self
    }

    /// What a rate limit multiplies the limit by (rounded down, at least one less). Default
    /// 0.75; must be in `(0, 1)`.
    pub fn decrease_factor(mut self, factor: f64) -> Self {
        self.config.decrease_factor = factor;
        self
    }

    /// How many successes in a row raise the limit by one. Default 25.
    pub fn increase_after(mut self, successes: NonZeroU32) -> Self {
        self.config.increase_after = successes.get();
        self
    }

    /// How many successes in a row raise the limit by one while it is below the limit the
    /// last cut came from (minus one): that limit is known to have worked, so the limit
    /// climbs back to it quickly and then probes above it at the
    /// [`increase_after`](Self::increase_after) pace. Default 2; set it equal to
    /// `increase_after` for plain AIMD. Must not exceed `increase_after`.
    pub fn recovery_increase_after(mut self, successes: NonZeroU32) -> Self {
        self.config.recovery_increase_after = successes.get();
        self
    }

    /// After a cut, how long until a rate limit may cut again. Default 20 ms. The epoch guard
    /// (only calls admitted after the cut can cut again) is what keeps a burst of 429s to one
    /// cut; the cool-down only spaces cuts out a little more, for servers whose count lags.
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.config.cooldown = cooldown;
        self
    }

    /// The longest a `Retry-After` pauses admission; longer ones are cut to this. Default
    /// 60 s.
    pub fn max_pause(mut self, max_pause: Duration) -> Self {
        self.config.max_pause = max_pause;
        self
    }

    /// How many server errors, connection failures or timeouts in a row open the circuit
    /// breaker; `None` turns the breaker off. Default 5.
    pub fn breaker_threshold(mut self, failures: Option<NonZeroU32>) -> Self {
        self.config.breaker_threshold = failures.map(NonZeroU32::get);
        self
    }

    /// How long the breaker stays open the first time, before it lets a probe through.
    /// Default 2 s; must not be zero.
    pub fn breaker_pause(mut self, pause: Duration) -> Self {
        self.config.breaker_pause = pause;
        self
    }

    /// The longest the breaker stays open: each failed probe doubles the pause up to this.
    /// Default 60 s; must be at least the [`breaker_pause`](Self::breaker_pause).
    pub fn breaker_max_pause(mut self, pause: Duration) -> Self {
        self.config.breaker_max_pause = pause;
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// An [`AdaptiveConfigError`] naming the setting when the decrease factor is not in
    /// `(0, 1)`, the minimum or initial limit is above the cap, the initial limit is below the
    /// minimum, `recovery_increase_after` exceeds `increase_after`, the breaker pause is zero
    /// or above its maximum, or a pause is longer than a day.
    pub fn build(self) -> Result<AdaptiveConfig, AdaptiveConfigError> {
        let mut c = self.config;
        c.initial = self.initial.unwrap_or(c.cap);
        let err = |m: String| Err(AdaptiveConfigError { message: m });
        if !(c.decrease_factor > 0.0 && c.decrease_factor < 1.0) {
            return err(format!(
                "decrease_factor must be in (0, 1), got {}",
                c.decrease_factor
            ));
        }
        if c.min > c.cap {
            return err(format!("min_limit {} is above the cap {}", c.min, c.cap));
        }
        if c.initial > c.cap || c.initial < c.min {
            return err(format!(
                "initial_limit {} is outside [min_limit {}, cap {}]",
                c.initial, c.min, c.cap
            ));
        }
        if c.recovery_increase_after > c.increase_after {
            return err(format!(
                "recovery_increase_after {} exceeds increase_after {}",
                c.recovery_increase_after, c.increase_after
            ));
        }
        if c.breaker_pause.is_zero() {
            return err("breaker_pause must not be zero".into());
        }
        if c.breaker_pause > c.breaker_max_pause {
            return err(format!(
                "breaker_pause {:?} is above breaker_max_pause {:?}",
                c.breaker_pause, c.breaker_max_pause
            ));
        }
        const DAY: Duration = Duration::from_secs(86_400);
        if c.max_pause > DAY || c.breaker_max_pause > DAY || c.cooldown > DAY {
            return err("cooldown, max_pause and breaker_max_pause must be at most a day".into());
        }
        Ok(c)
    }
}

/// An invalid [`AdaptiveConfigBuilder`] setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveConfigError {
    message: String,
}

impl fmt::Display for AdaptiveConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid adaptive concurrency setting: {}", self.message)
    }
}

impl std::error::Error for AdaptiveConfigError {}

// ---------------------------------------------------------------------------------------------
// The AIMD arithmetic.

/// The limit and the rules that move it; no clock of its own, no locking (unit tested).
#[derive(Debug, Clone)]
struct Aimd {
    limit: usize,
    cap: usize,
    min: usize,
    adaptive: bool,
    factor: f64,
    increase_after: u32,
    recovery_increase_after: u32,
    cooldown: Duration,
    /// Bumped by every cut; a call admitted in an earlier epoch cannot cut.
    epoch: u64,
    /// Successes since the last change of the limit.
    successes: u32,
    /// The limit the last cut came from, minus one: below it the limit climbs quickly.
    recovery_target: usize,
    /// No cut before this instant (the cool-down).
    no_cut_before: Option<Instant>,
}

/// A change of the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    from: usize,
    to: usize,
}

impl Aimd {
    fn new(c: &AdaptiveConfig) -> Self {
        Aimd {
            limit: c.initial,
            cap: c.cap,
            min: c.min,
            adaptive: c.adaptive,
            factor: c.decrease_factor,
            increase_after: c.increase_after,
            recovery_increase_after: c.recovery_increase_after,
            cooldown: c.cooldown,
            epoch: 0,
            successes: 0,
            recovery_target: 0,
            no_cut_before: None,
        }
    }

    /// `limit * factor`, rounded down, at least one less than `limit`, at least `min`.
    fn decreased(limit: usize, factor: f64, min: usize) -> usize {
        // Limits are far below 2^52: the product is exact enough.
        let cut = (limit as f64 * factor).floor() as usize;
        cut.min(limit.saturating_sub(1)).max(min)
    }

    /// A call succeeded (whatever epoch it was admitted in: a success is a success).
    /// `saturated` says whether the limit was reached when it was admitted: a success with
    /// slots to spare says nothing about a higher limit, and counting it would let the limit
    /// run up while callers are few (in retry back-off, say) and then let them all in at once.
    fn on_success(&mut self, saturated: bool) -> Option<Change> {
        if !self.adaptive || !saturated || self.limit >= self.cap {
            return None;
        }
        self.successes += 1;
        let needed = if self.limit < self.recovery_target {
            self.recovery_increase_after
        } else {
            self.increase_after
        };
        if self.successes < needed {
            return None;
        }
        self.successes = 0;
        let from = self.limit;
        self.limit += 1;
        Some(Change {
            from,
            to: self.limit,
        })
    }

    /// A call admitted in `epoch` was rate limited at `now`.
    fn on_rate_limited(&mut self, epoch: u64, now: Instant) -> Option<Change> {
        if !self.adaptive || epoch != self.epoch {
            return None;
        }
        self.successes = 0;
        if self.no_cut_before.is_some_and(|t| now < t) || self.limit <= self.min {
            return None;
        }
        let from = self.limit;
        self.limit = Self::decreased(from, self.factor, self.min);
        self.recovery_target = from - 1;
        self.epoch += 1;
        self.no_cut_before = now.checked_add(self.cooldown);
        Some(Change {
            from,
            to: self.limit,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The circuit breaker.

/// The state of an [`Adaptive`] wrapper's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls are admitted (subject to the limit).
    Closed,
    /// After a run of outage errors: no call is admitted until the pause has passed.
    Open,
    /// The pause has passed: one call (the probe) is let through to see whether the backend is
    /// back.
    HalfOpen,
}

impl BreakerState {
    /// A lowercase name (`"closed"`, `"open"`, `"half-open"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerPhase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug, Clone)]
struct Breaker {
    threshold: Option<u32>,
    pause: Duration,
    max_pause: Duration,
    /// The pause the next opening uses.
    next_pause: Duration,
    /// Outage errors in a row while closed.
    failures: u32,
    phase: BreakerPhase,
}

/// What a finished call says about the backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// It answered (a success, or an error that is not an outage).
    Up,
    /// A server error, a connection failure or a timeout.
    Down,
}

impl Breaker {
    fn new(c: &AdaptiveConfig) -> Self {
        Breaker {
            threshold: c.breaker_threshold,
            pause: c.breaker_pause,
            max_pause: c.breaker_max_pause,
            next_pause: c.breaker_pause,
            failures: 0,
            phase: BreakerPhase::Closed,
        }
    }

    fn state(&self) -> BreakerState {
        match self.phase {
            BreakerPhase::Closed => BreakerState::Closed,
            BreakerPhase::Open { .. } => BreakerState::Open,
            BreakerPhase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Records a finished call; `probe` says whether it was the half-open probe. Returns the
    /// event of a state change.
    fn on_result(&mut self, health: Health, probe: bool, now: Instant) -> Option<Event> {
        let threshold = self.threshold?;
        match (self.phase, health) {
            (BreakerPhase::Closed, Health::Up) => {
                self.failures = 0;
                None
            }
            (BreakerPhase::Closed, Health::Down) => {
                self.failures += 1;
                if self.failures < threshold {
                    return None;
                }
                let pause = self.open(now);
                Some(Event::BreakerOpened {
                    failures: self.failures,
                    pause,
                })
            }
            (BreakerPhase::HalfOpen { .. }, Health::Up) if probe => {
                self.phase = BreakerPhase::Closed;
                self.failures = 0;
                self.next_pause = self.pause;
                Some(Event::BreakerClosed)
            }
            (BreakerPhase::HalfOpen { .. }, Health::Down) if probe => {
                let pause = self.open(now);
                Some(Event::BreakerReopened { pause })
            }
            // Calls admitted before the breaker opened: only the probe decides.
            _ => None,
        }
    }

    /// Opens the breaker for the next pause and doubles the one after.
    fn open(&mut self, now: Instant) -> Duration {
        let pause = self.next_pause;
        self.phase = BreakerPhase::Open {
            until: later(now, pause),
        };
        self.next_pause = pause.saturating_mul(2).min(self.max_pause);
        pause
    }

    /// The probe was cancelled before it had a result: let another one through.
    fn probe_cancelled(&mut self) {
        if let BreakerPhase::HalfOpen { probing: true } = self.phase {
            self.phase = BreakerPhase::HalfOpen { probing: false };
        }
    }
}

/// `now + d`, or a day from now if that overflows.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400))
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Counters and gauges of an [`Adaptive`] wrapper, shared through an `Arc` and cheap to read
/// at any time (relaxed atomics; [`snapshot`](Self::snapshot) reads them all).
#[derive(Debug)]
pub struct AdaptiveStats {
    cap: usize,
    limit: AtomicUsize,
    min_limit: AtomicUsize,
    max_limit: AtomicUsize,
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    calls: AtomicU64,
    rate_limited: AtomicU64,
    decreases: AtomicU64,
    increases: AtomicU64,
    pauses: AtomicU64,
    breaker: AtomicU8,
    breaker_opened: AtomicU64,
}

/// All of an [`AdaptiveStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdaptiveSnapshot {
    /// The most calls in flight the limit may allow (the configured concurrency).
    pub cap: usize,
    /// The current limit on calls in flight.
    pub limit: usize,
    /// The lowest the limit has been.
    pub min_limit: usize,
    /// The highest the limit has risen to (before any rise: the current limit). With the start
    /// at the cap and the descent from it left out, `min_limit..=max_limit` is the range the
    /// limit settled in.
    pub max_limit: usize,
    /// Calls running in the inner backend now.
    pub in_flight: usize,
    /// Calls waiting to be admitted now.
    pub waiting: usize,
    /// Calls that finished with a result (successes and errors; cancelled ones not counted).
    pub calls: u64,
    /// Of those, calls that were rate limited ([`BackendErrorKind::RateLimited`]).
    pub rate_limited: u64,
    /// Times the limit was cut.
    pub decreases: u64,
    /// Times the limit was raised.
    pub increases: u64,
    /// `Retry-After` pauses of admission started (or extended).
    pub pauses: u64,
    /// The circuit breaker's state.
    pub breaker: BreakerState,
    /// Times the circuit breaker opened (a failed probe reopening it included).
    pub breaker_opened: u64,
}

impl AdaptiveSnapshot {
    /// `rate_limited / calls`: the share of calls answered 429 (0 before any call).
    #[must_use]
    pub fn rate_limited_share(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.rate_limited as f64 / self.calls as f64
        }
    }
}

impl AdaptiveStats {
    fn new(config: &AdaptiveConfig) -> Self {
        AdaptiveStats {
            cap: config.cap,
            limit: AtomicUsize::new(config.initial),
            min_limit: AtomicUsize::new(config.initial),
            max_limit: AtomicUsize::new(config.initial),
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            decreases: AtomicU64::new(0),
            increases: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            breaker: AtomicU8::new(BreakerState::Closed.to_u8()),
            breaker_opened: AtomicU64::new(0),
        }
    }

    /// The most calls in flight the limit may allow.
    #[must_use]
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The current limit on calls in flight.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// The lowest the limit has been.
    #[must_use]
    pub fn min_limit(&self) -> usize {
        self.min_limit.load(Ordering::Relaxed)
    }

    /// The highest the limit has risen to (see [`AdaptiveSnapshot::max_limit`]).
    #[must_use]
    pub fn max_limit(&self) -> usize {
        self.max_limit.load(Ordering::Relaxed)
    }

    /// Calls running in the inner backend now.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls waiting to be admitted now.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Calls that finished with a result.
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls that were rate limited.
    #[must_use]
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Times the limit was cut.
    #[must_use]
    pub fn decreases(&self) -> u64 {
        self.decreases.load(Ordering::Relaxed)
    }

    /// Times the limit was raised.
    #[must_use]
    pub fn increases(&self) -> u64 {
        self.increases.load(Ordering::Relaxed)
    }

    /// `Retry-After` pauses started or extended.
    #[must_use]
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// The circuit breaker's state.
    #[must_use]
    pub fn breaker(&self) -> BreakerState {
        BreakerState::from_u8(self.breaker.load(Ordering::Relaxed))
    }

    /// Times the circuit breaker opened.
    #[must_use]
    pub fn breaker_opened(&self) -> u64 {
        self.breaker_opened.load(Ordering::Relaxed)
    }

    /// Every figure at once.
    #[must_use]
    pub fn snapshot(&self) -> AdaptiveSnapshot {
        AdaptiveSnapshot {
            cap: self.cap,
            limit: self.limit(),
            min_limit: self.min_limit(),
            max_limit: self.max_limit(),
            in_flight: self.in_flight(),
            waiting: self.waiting(),
            calls: self.calls(),
            rate_limited: self.rate_limited(),
            decreases: self.decreases(),
            increases: self.increases(),
            pauses: self.pauses(),
            breaker: self.breaker(),
            breaker_opened: self.breaker_opened(),
        }
    }

    /// Records a new limit (called under the state lock, so the extremes are consistent).
    fn set_limit(&self, change: Change) {
        self.limit.store(change.to, Ordering::Relaxed);
        if change.to < change.from {
            self.decreases.fetch_add(1, Ordering::Relaxed);
            self.min_limit.fetch_min(change.to, Ordering::Relaxed);
            if self.increases.load(Ordering::Relaxed) == 0 {
                // Still descending: the maximum follows the limit down.
                self.max_limit.store(change.to, Ordering::Relaxed);
            }
        } else {
            if self.increases.fetch_add(1, Ordering::Relaxed) == 0 {
                self.max_limit.store(change.to, Ordering::Relaxed);
            }
            self.max_limit.fetch_max(change.to, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The limiter.

/// Something worth a tracing event; made under the lock, logged after it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Limit(Change, usize),
    Paused(Duration),
    BreakerOpened { failures: u32, pause: Duration },
    BreakerReopened { pause: Duration },
    BreakerHalfOpen,
    BreakerClosed,
}

impl Event {
    fn emit(self, backend: &str) {
        match self {
            Event::Limit(Change { from, to }, in_flight) if to < from => {
                tracing::info!(
                    backend,
                    from,
                    to,
                    in_flight,
                    "rate limited: concurrency limit lowered"
                );
            }
            Event::Limit(Change { from, to }, in_flight) => {
                tracing::debug!(backend, from, to, in_flight, "concurrency limit raised");
            }
            Event::Paused(pause) => tracing::info!(
                backend,
                pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "Retry-After: admission paused"
            ),
            Event::BreakerOpened { failures, pause } => tracing::warn!(
                backend,
                failures,
                pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "circuit breaker opened: admission paused after failures in a row"
            ),
            Event::BreakerReopened { pause } => tracing::warn!(
                backend,
                pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "circuit breaker probe failed: reopened"
            ),
            Event::BreakerHalfOpen => {
                tracing::info!(backend, "circuit breaker half open: sending a probe");
            }
            Event::BreakerClosed => {
                tracing::info!(backend, "circuit breaker closed: the probe succeeded");
            }
        }
    }
}

struct Waiter {
    id: u64,
    notify: Arc<Notify>,
}

struct State {
    aimd: Aimd,
    breaker: Breaker,
    in_flight: usize,
    /// No admission before this instant (a `Retry-After`).
    paused_until: Option<Instant>,
    queue: VecDeque<Waiter>,
    next_id: u64,
}

/// Why a call cannot be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Not before this instant.
    Until(Instant),
    /// Not until a call finishes.
    Full,
}

/// What an admitted call carries: the epoch it was admitted in, whether it took the last
/// slot the limit allowed, and whether it is the probe.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    epoch: u64,
    saturated: bool,
    probe: bool,
}

impl State {
    /// Why a call could not be admitted at `now`, without changing anything.
    fn blocked(&self, now: Instant) -> Option<Block> {
        if let Some(t) = self.paused_until.filter(|&t| now < t) {
            return Some(Block::Until(t));
        }
        match self.breaker.phase {
            BreakerPhase::Open { until } if now < until => return Some(Block::Until(until)),
            BreakerPhase::HalfOpen { probing: true } => return Some(Block::Full),
            _ => {}
        }
        (self.in_flight >= self.aimd.limit).then_some(Block::Full)
    }

    /// Admits a call at `now` if it may go.
    fn try_admit(
        &mut self,
        now: Instant,
        stats: &AdaptiveStats,
        events: &mut Vec<Event>,
    ) -> Result<Ticket, Block> {
        if let Some(block) = self.blocked(now) {
            return Err(block);
        }
        let mut probe = false;
        match self.breaker.phase {
            BreakerPhase::Open { .. } | BreakerPhase::HalfOpen { probing: false } => {
                if matches!(self.breaker.phase, BreakerPhase::Open { .. }) {
                    events.push(Event::BreakerHalfOpen);
                }
                self.breaker.phase = BreakerPhase::HalfOpen { probing: true };
                stats
                    .breaker
                    .store(BreakerState::HalfOpen.to_u8(), Ordering::Relaxed);
                probe = true;
            }
            _ => {}
        }
        self.in_flight += 1;
        stats.in_flight.store(self.in_flight, Ordering::Relaxed);
        Ok(Ticket {
            epoch: self.aimd.epoch,
            saturated: self.in_flight >= self.aimd.limit,
            probe,
        })
    }

    /// Wakes the first waiter, if any, to look again.
    fn wake_first(&self) {
        if let Some(w) = self.queue.front() {
            w.notify.notify_one();
        }
    }
}

struct Limiter {
    state: Mutex<State>,
    stats: Arc<AdaptiveStats>,
    max_pause: Duration,
}

impl Limiter {
    fn new(config: &AdaptiveConfig) -> Self {
        Limiter {
            state: Mutex::new(State {
                aimd: Aimd::new(config),
                breaker: Breaker::new(config),
                in_flight: 0,
                paused_until: None,
                queue: VecDeque::new(),
                next_id: 0,
            }),
            stats: Arc::new(AdaptiveStats::new(config)),
            max_pause: config.max_pause,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the state anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for admission, in arrival order.
    ///
    /// Cancel safe: dropping the future while it waits takes it out of the queue (and hands a
    /// wake-up it may have had to the next waiter); once admitted, the [`Permit`] frees the
    /// slot when dropped.
    async fn acquire(&self, events: &mut Vec<Event>) -> Permit<'_> {
        let (id, notify) = {
            let mut st = self.lock();
            if st.queue.is_empty() {
                if let Ok(ticket) = st.try_admit(Instant::now(), &self.stats, events) {
                    return Permit::new(self, ticket);
                }
            }
            let id = st.next_id;
            st.next_id += 1;
            let notify = Arc::new(Notify::new());
            st.queue.push_back(Waiter {
                id,
                notify: Arc::clone(&notify),
            });
            self.stats.waiting.store(st.queue.len(), Ordering::Relaxed);
            (id, notify)
        };
        let mut place = Place {
            limiter: self,
            id,
            queued: true,
        };
        loop {
            let deadline = {
                let mut st = self.lock();
                if st.queue.front().map(|w| w.id) != Some(id) {
                    None
                } else {
                    let now = Instant::now();
                    match st.try_admit(now, &self.stats, events) {
                        Ok(ticket) => {
                            st.queue.pop_front();
                            place.queued = false;
                            self.stats.waiting.store(st.queue.len(), Ordering::Relaxed);
                            // Pass the turn on unless the next one would only wait for a
                            // release (which wakes it).
                            if st.blocked(now) != Some(Block::Full) {
                                st.wake_first();
                            }
                            return Permit::new(self, ticket);
                        }
                        Err(Block::Until(t)) => Some(t),
                        Err(Block::Full) => None,
                    }
                }
            };
            let notified = pin!(notify.notified());
            match deadline {
                Some(t) => {
                    let sleep = pin!(tokio::time::sleep_until(t));
                    futures::future::select(notified, sleep).await;
                }
                None => notified.await,
            }
        }
    }

    /// Records the result of an admitted call and frees its slot.
    fn finish(
        &self,
        ticket: Ticket,
        result: Option<&Result<Completion, BackendError>>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        let now = Instant::now();
        let mut st = self.lock();
        st.in_flight -= 1;
        self.stats.in_flight.store(st.in_flight, Ordering::Relaxed);
        match result {
            None => {
                // Cancelled: no verdict on the backend.
                if ticket.probe {
                    st.breaker.probe_cancelled();
                }
            }
            Some(result) => {
                self.stats.calls.fetch_add(1, Ordering::Relaxed);
                let (change, health) = match result {
                    Ok(_) => (st.aimd.on_success(ticket.saturated), Health::Up),
                    Err(e) => {
                        if e.is_retryable() {
                            if let Some(after) = e.retry_after() {
                                let pause = after.min(self.max_pause);
                                let until = later(now, pause);
                                if !pause.is_zero() && st.paused_until.is_none_or(|t| t < until) {
                                    st.paused_until = Some(until);
                                    self.stats.pauses.fetch_add(1, Ordering::Relaxed);
                                    events.push(Event::Paused(pause));
                                }
                            }
                        }
                        match e.kind() {
                            BackendErrorKind::RateLimited => {
                                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                                (st.aimd.on_rate_limited(ticket.epoch, now), Health::Up)
                            }
                            BackendErrorKind::Server
                            | BackendErrorKind::Connection
                            | BackendErrorKind::Timeout => (None, Health::Down),
                            _ => (None, Health::Up),
                        }
                    }
                };
                if let Some(change) = change {
                    self.stats.set_limit(change);
                    events.push(Event::Limit(change, st.in_flight));
                }
                if let Some(event) = st.breaker.on_result(health, ticket.probe, now) {
                    if matches!(
                        event,
                        Event::BreakerOpened { .. } | Event::BreakerReopened { .. }
                    ) {
                        self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
                    }
                    events.push(event);
                }
            }
        }
        self.stats
            .breaker
            .store(st.breaker.state().to_u8(), Ordering::Relaxed);
        st.wake_first();
        events
    }
}

/// A waiter's place in the queue; leaving it (by drop) hands the turn on.
struct Place<'a> {
    limiter: &'a Limiter,
    id: u64,
    queued: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        let mut st = self.limiter.lock();
        if let Some(at) = st.queue.iter().position(|w| w.id == self.id) {
            st.queue.remove(at);
            self.limiter
                .stats
                .waiting
                .store(st.queue.len(), Ordering::Relaxed);
            if at == 0 {
                // It may have been woken for a turn it will not take.
                st.wake_first();
            }
        }
    }
}

/// An admitted call's slot; frees it when finished or dropped.
struct Permit<'a> {
    limiter: &'a Limiter,
    ticket: Ticket,
    done: bool,
}

impl<'a> Permit<'a> {
    fn new(limiter: &'a Limiter, ticket: Ticket) -> Self {
        Permit {
            limiter,
            ticket,
            done: false,
        }
    }

    fn finish(mut self, result: &Result<Completion, BackendError>) -> Vec<Event> {
        self.done = true;
        self.limiter.finish(self.ticket, Some(result))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(self.ticket, None);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The wrapper.

/// Wraps a backend with an adaptive limit on its calls in flight, `Retry-After` pauses and a
/// circuit breaker. See the [module docs](self) for the rules and where to put it (inside
/// the retry layer).
///
/// `name()` and `model()` are the inner backend's. Limit changes are `tracing` events (`info`
/// for a cut, `debug` for a rise), as are pauses and breaker changes (`warn` when it opens),
/// each with the field `backend` (the inner backend's name).
pub struct Adaptive<B> {
    inner: B,
    config: AdaptiveConfig,
    limiter: Limiter,
}

impl<B> Adaptive<B> {
    /// Wraps `inner` with the default settings and this cap (see [`AdaptiveConfig::new`]).
    pub fn new(inner: B, cap: NonZeroUsize) -> Self {
        Self::with_config(inner, AdaptiveConfig::new(cap))
    }

    /// Wraps `inner` with these settings.
    pub fn with_config(inner: B, config: AdaptiveConfig) -> Self {
        Adaptive {
            inner,
            limiter: Limiter::new(&config),
            config,
        }
    }

    /// The shared statistics; they keep changing after this call.
    #[must_use]
    pub fn stats(&self) -> Arc<AdaptiveStats> {
        Arc::clone(&self.limiter.stats)
    }

    /// The settings in use.
    #[must_use]
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// The wrapped backend.
    #[must_use]
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Unwraps the backend.
    #[must_use]
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: fmt::Debug> fmt::Debug for Adaptive<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adaptive")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("stats", &self.limiter.stats.snapshot())
            .finish()
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Adaptive<B> {
    /// Waits for admission (first come, first served), then calls the inner backend and
    /// learns from its answer.
    ///
    /// # Errors
    ///
    /// Whatever the inner backend returns, unchanged; the wrapper adds none.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits gives up its place in the queue (the next caller
    /// moves up); dropping it during the call frees the slot and teaches the limit nothing (a
    /// cancelled probe lets another probe through).
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let mut events = Vec::new();
        let permit = self.limiter.acquire(&mut events).await;
        for event in events.drain(..) {
            event.emit(&self.inner.name());
        }
        let result = self.inner.complete(request).await;
        for event in permit.finish(&result) {
            event.emit(&self.inner.name());
        }
        result
    }

    fn name(&self) -> Cow<'_, str> {
        self.inner.name()
    }

    fn model(&self) -> Cow<'_, str> {
        self.inner.model()
    }

    fn identity(&self) -> Cow<'_, str> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    fn aimd(cap: usize) -> Aimd {
        Aimd::new(&AdaptiveConfig::new(nz(cap)))
    }

    #[test]
    fn decrease_rounds_down_and_always_moves() {
        assert_eq!(Aimd::decreased(256, 0.75, 1), 192);
        assert_eq!(Aimd::decreased(33, 0.75, 1), 24);
        assert_eq!(Aimd::decreased(9, 0.75, 1), 6);
        // 2 x 0.75 = 1.5 -> 1; 1 x 0.75 -> the minimum.
        assert_eq!(Aimd::decreased(2, 0.75, 1), 1);
        assert_eq!(Aimd::decreased(1, 0.75, 1), 1);
        // A factor close to 1 still cuts by one.
        assert_eq!(Aimd::decreased(10, 0.99, 1), 9);
        assert_eq!(Aimd::decreased(10, 0.75, 8), 8);
        // From 256 to 32 takes 8 cuts.
        let (mut l, mut n) = (256, 0);
        while l > 32 {
            l = Aimd::decreased(l, 0.75, 1);
            n += 1;
        }
        assert_eq!((l, n), (24, 8));
    }

    #[test]
    fn one_cut_per_epoch_and_cooldown() {
        let mut a = aimd(256);
        let t0 = Instant::now();
        let e0 = a.epoch;
        assert_eq!(
            a.on_rate_limited(e0, t0),
            Some(Change { from: 256, to: 192 })
        );
        // The rest of the burst was admitted in epoch e0: no further cut.
        for _ in 0..100 {
            assert_eq!(a.on_rate_limited(e0, t0), None);
        }
        assert_eq!(a.limit, 192);
        // A call of the new epoch inside the cool-down does not cut either...
        let e1 = a.epoch;
        assert_ne!(e0, e1);
        assert_eq!(a.on_rate_limited(e1, t0 + Duration::from_millis(10)), None);
        // ...after it, it does.
        assert_eq!(
            a.on_rate_limited(e1, t0 + Duration::from_millis(20)),
            Some(Change { from: 192, to: 144 })
        );
    }

    #[test]
    fn increase_after_a_run_fast_below_the_last_cut() {
        let mut a = aimd(64);
        a.limit = 40;
        // Plain additive increase: one per 25 successes.
        for _ in 0..24 {
            assert_eq!(a.on_success(true), None);
        }
        assert_eq!(a.on_success(true), Some(Change { from: 40, to: 41 }));
        // Successes of calls admitted with slots to spare do not count.
        for _ in 0..100 {
            assert_eq!(a.on_success(false), None);
        }
        // A cut at 41 sets the recovery target to 40.
        let now = Instant::now();
        assert_eq!(
            a.on_rate_limited(a.epoch, now),
            Some(Change { from: 41, to: 30 })
        );
        // From 30 to 40: one per 2 successes.
        for _ in 0..20 {
            a.on_success(true);
        }
        assert_eq!(a.limit, 40);
        // Above it: back to 25.
        for _ in 0..24 {
            assert_eq!(a.on_success(true), None);
        }
        assert_eq!(a.on_success(true), Some(Change { from: 40, to: 41 }));
    }

    #[test]
    fn never_above_the_cap_nor_below_the_minimum() {
        let mut a = aimd(4);
        for _ in 0..1000 {
            assert_eq!(a.on_success(true), None);
        }
        assert_eq!(a.limit, 4);
        let mut now = Instant::now();
        for _ in 0..10 {
            now += Duration::from_secs(1);
            a.on_rate_limited(a.epoch, now);
        }
        assert_eq!(a.limit, 1);
    }

    #[test]
    fn fixed_limit_does_not_move() {
        let config = AdaptiveConfig::builder(nz(16))
            .adaptive(false)
            .build()
            .unwrap();
        let mut a = Aimd::new(&config);
        assert_eq!(a.on_rate_limited(a.epoch, Instant::now()), None);
        assert_eq!(a.on_success(true), None);
        assert_eq!(a.limit, 16);
    }

    #[test]
    fn breaker_opens_probes_and_backs_off() {
        let config = AdaptiveConfig::builder(nz(8))
            .breaker_threshold(NonZeroU32::new(3))
            .breaker_pause(Duration::from_secs(1))
            .breaker_max_pause(Duration::from_secs(3))
            .build()
            .unwrap();
        let mut b = Breaker::new(&config);
        let t = Instant::now();
        assert_eq!(b.on_result(Health::Down, false, t), None);
        assert_eq!(b.on_result(Health::Up, false, t), None);
        assert_eq!(b.on_result(Health::Down, false, t), None);
        assert_eq!(b.on_result(Health::Down, false, t), None);
        assert_eq!(
            b.on_result(Health::Down, false, t),
            Some(Event::BreakerOpened {
                failures: 3,
                pause: Duration::from_secs(1)
            })
        );
        assert_eq!(b.state(), BreakerState::Open);
        // Late results of calls admitted before do nothing.
        assert_eq!(b.on_result(Health::Up, false, t), None);
        assert_eq!(b.state(), BreakerState::Open);
        b.phase = BreakerPhase::HalfOpen { probing: true };
        assert_eq!(
            b.on_result(Health::Down, true, t),
            Some(Event::BreakerReopened {
                pause: Duration::from_secs(2)
            })
        );
        b.phase = BreakerPhase::HalfOpen { probing: true };
        // Doubling stops at the maximum.
        assert_eq!(
            b.on_result(Health::Down, true, t),
            Some(Event::BreakerReopened {
                pause: Duration::from_secs(3)
            })
        );
        b.phase = BreakerPhase::HalfOpen { probing: true };
        b.probe_cancelled();
        assert_eq!(b.phase, BreakerPhase::HalfOpen { probing: false });
        b.phase = BreakerPhase::HalfOpen { probing: true };
        assert_eq!(b.on_result(Health::Up, true, t), Some(Event::BreakerClosed));
        assert_eq!(b.next_pause, Duration::from_secs(1));
    }

    #[test]
    fn config_is_checked() {
        let b = || AdaptiveConfig::builder(nz(10));
        assert!(b().build().is_ok());
        assert!(b().decrease_factor(1.0).build().is_err());
        assert!(b().decrease_factor(0.0).build().is_err());
        assert!(b().decrease_factor(f64::NAN).build().is_err());
        assert!(b().min_limit(nz(11)).build().is_err());
        assert!(b().initial_limit(nz(11)).build().is_err());
        assert!(b().min_limit(nz(5)).initial_limit(nz(4)).build().is_err());
        assert!(b().breaker_pause(Duration::ZERO).build().is_err());
        assert!(b().breaker_pause(Duration::from_secs(100)).build().is_err());
        assert!(b()
            .increase_after(NonZeroU32::new(2).unwrap())
            .recovery_increase_after(NonZeroU32::new(3).unwrap())
            .build()
            .is_err());
        let e = b().decrease_factor(2.0).build().unwrap_err();
        assert!(e.to_string().contains("decrease_factor"), "{e}");
        assert_eq!(b().initial_limit(nz(4)).build().unwrap().initial, 4);
    }
}
