//! [`Adaptive`]: finds how many calls a provider takes at once instead of guessing, stops
//! sending into an outage, and tells congestion from noise.
//!
//! The wrapper keeps a limit on the calls in flight to one backend and moves it with what the
//! backend answers (AIMD, additive increase and multiplicative decrease, as TCP does). It never
//! goes above the cap (the configured concurrency). It starts at 16 (or the cap, if lower) in
//! *slow start*: each success that took the last free slot raises it by one, doubling it every
//! round of calls, until the first congestion; a server that takes fewer calls than the cap is
//! so found without sending the whole cap into it at once.
//!
//! # Which answers move the limit, and why
//!
//! Only answers that ask to slow down move it down: a rate limit (HTTP 429,
//! [`BackendErrorKind::RateLimited`]) or any retryable error that carries a `Retry-After`.
//! Server errors, timeouts, dropped connections and unusable answers say nothing about how
//! many calls the server takes; they feed the circuit breaker (below) and the retry layer,
//! never the limit. Latency plays no part either: a server that queues keeps its throughput,
//! and a full pipeline is what a batch job wants.
//!
//! A slow-down answer is *congestion* only when many calls get one: a steady share of random
//! 429s (which real providers send a call or two in a hundred) does not lower the limit, while
//! a limit above a server's real cap, where nearly every extra call is refused, is found
//! within a few calls. So:
//!
//! - The window is the last calls *sent*, as many as the limit (at least 16, at most 64),
//!   and only those sent since the limit last changed (an *epoch*): the answers to calls sent
//!   under a higher limit cut nothing, so a burst of 429s from one overload cuts once. Calls
//!   still in flight count as not refused: after many calls went out at once, the fast errors
//!   come back before the slow successes and must not read as a wall of them.
//! - The window is congested when at least a quarter of its calls were told to slow down, and
//!   at least 5 of them were (2 within the first window after an increase, whose undoing
//!   costs little).
//! - Congestion within the first window after an increase takes that step back and remembers
//!   the level below as the one that works; the next step above it waits twice as long each
//!   time a step or a cut fails (up to 8 times
//!   [`increase_after`](AdaptiveConfigBuilder::increase_after)), and back to once when a step
//!   holds.
//! - Any other congestion multiplies the limit by the
//!   [decrease factor](AdaptiveConfigBuilder::decrease_factor) (default 0.85), at most once
//!   per [cool-down](AdaptiveConfigBuilder::cooldown).
//! - A run of successes raises the limit by one:
//!   [`increase_after`](AdaptiveConfigBuilder::increase_after) successes (default 25),
//!   counting only calls that took the last free slot (with slots to spare a success says
//!   nothing about a higher limit); slow-down answers that are not congestion do not reset the
//!   count. Below the limit the last cut came from, the limit is known to have worked, so it
//!   climbs back faster (one per
//!   [`recovery_increase_after`](AdaptiveConfigBuilder::recovery_increase_after) successes,
//!   default 2).
//!
//! # `Retry-After`
//!
//! The call that got a `Retry-After` waits at least that long before it is sent again (the
//! retry layer's rule). Every call waits only when the `Retry-After` came with congestion:
//! then admission of every call to this backend pauses until it has passed (at most
//! [`max_pause`](AdaptiveConfigBuilder::max_pause)). A provider at its per-minute limit
//! answers every call with a 429, so the pause comes within a few calls; a random 429 with
//! `Retry-After: 1` delays its own call by a second and nobody else. This holds with a fixed
//! limit too ([`adaptive(false)`](AdaptiveConfigBuilder::adaptive)).
//!
//! # The circuit breaker
//!
//! [`breaker_threshold`](AdaptiveConfigBuilder::breaker_threshold) server errors, connection
//! failures or timeouts in a row (default 5), when they are also at least three quarters of
//! the last results (a window of four times the threshold), *open* it: no call is admitted
//! for [`breaker_pause`](AdaptiveConfigBuilder::breaker_pause) (default 2 s). A server that is
//! down fails everything and opens it as soon as the streak is long enough; a few calls that
//! hung on one bad connection and time out together, among calls that succeed, do not. Then
//! it is *half open*: one call (the probe) goes through. A probe that succeeds (or gets any
//! answer that is not an outage) *closes* the breaker; one that fails opens it again for twice
//! the pause, up to [`breaker_max_pause`](AdaptiveConfigBuilder::breaker_max_pause) (default
//! 60 s).
//!
//! Calls that cannot be admitted wait in a first-in, first-out queue; a waiting call may be
//! dropped at any time, and its turn passes to the next. Every error is returned unchanged:
//! whether and when a call is retried is still the retry layer's decision.
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
//! // One 429 in two calls is not congestion: the limit stays where slow start begins.
//! assert_eq!((now.limit, now.congestion), (16, 0));
//! assert_eq!(now.breaker, BreakerState::Closed);
//! # Ok(())
//! # }
//! ```
//!
//! Design notes and measurements (why these rules, why not a semaphore): see ARCHITECTURE.md
//! in the repository.

use std::collections::VecDeque;
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{lock, Completion, CompletionRequest, LlmBackend};
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
    /// The same settings without the circuit breaker: for a wrapper that routes around an
    /// unhealthy backend itself (calls waiting behind an open breaker could not move).
    pub(crate) fn without_breaker(mut self) -> Self {
        self.breaker_threshold = None;
        self
    }

    /// The defaults with this cap: the limit starts at the cap or 16, whichever is lower, and
    /// adapts, and the breaker is on. See [`AdaptiveConfigBuilder`] for each default.
    #[must_use]
    pub fn new(cap: NonZeroUsize) -> Self {
        AdaptiveConfig {
            cap: cap.get(),
            initial: cap.get().min(SLOW_START_FROM),
            min: 1,
            adaptive: true,
            decrease_factor: 0.85,
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
}

/// Builds an [`AdaptiveConfig`]; [`build`](Self::build) checks the values.
#[derive(Debug, Clone)]
#[must_use]
pub struct AdaptiveConfigBuilder {
    config: AdaptiveConfig,
    initial: Option<usize>,
}

impl AdaptiveConfigBuilder {
    setters! {
        /// The limit at the start. Default: the cap or 16, whichever is lower (the cap with
        /// [`adaptive(false)`](Self::adaptive)). Below the cap the limit starts in *slow start*:
        /// each success that took the last free slot raises it by one, which doubles it every
        /// round of calls, until the first congestion (as TCP starts). Starting at the cap instead
        /// sends that many calls at once into a server that may take far fewer, and every one it
        /// refuses is a 429 on the run's count.
        initial_limit(initial: NonZeroUsize) => initial = Some(initial.get());
        /// The lowest the limit goes. Default 1.
        min_limit(min: NonZeroUsize) => config.min = min.get();
        /// Whether the limit adapts. Default true. With false the limit stays at the initial
        /// limit (the cap by default), while the `Retry-After` pauses of congestion, the circuit
        /// breaker and the statistics work as usual: a fixed concurrency that still stops for an
        /// outage and for a server that tells every call to wait.
        adaptive(adaptive: bool) => config.adaptive = adaptive;
        /// What congestion multiplies the limit by (rounded down, at least one less), unless it
        /// came right after an increase (which is then only taken back). Default 0.85; must be
        /// in `(0, 1)`. The cut can be gentle because noise does not cause one: congestion is a
        /// server that refused many of the calls sent.
        decrease_factor(factor: f64) => config.decrease_factor = factor;
        /// How many successes raise the limit by one (at or above the level known to work; a
        /// failed step above it doubles this for the next, up to 8 times). Default 25.
        increase_after(successes: NonZeroU32) => config.increase_after = successes.get();
        /// How many successes raise the limit by one while it is below the last level that met
        /// congestion (the limit a cut came from, or a step taken back): the levels below it are
        /// known to have worked, so the limit climbs back quickly and then probes above them at
        /// the [`increase_after`](Self::increase_after) pace. Default 2; set it equal to
        /// `increase_after` for plain AIMD. Must not exceed `increase_after`.
        recovery_increase_after(n: NonZeroU32) => config.recovery_increase_after = n.get();
        /// After a cut, how long until congestion may cut again. Default 20 ms. The epoch guard
        /// (only calls admitted after the cut can cut again) is what keeps a burst of 429s to one
        /// cut; the cool-down only spaces cuts out a little more, for servers whose count lags.
        cooldown(cooldown: Duration) => config.cooldown = cooldown;
        /// The longest a `Retry-After` that came with congestion pauses admission of every call;
        /// longer ones are cut to this. Default 60 s.
        max_pause(max_pause: Duration) => config.max_pause = max_pause;
        /// How many server errors, connection failures or timeouts in a row open the circuit
        /// breaker, when they are also at least three quarters of the last results (a window of
        /// four times this, at most 64); `None` turns the breaker off. Default 5.
        breaker_threshold(n: Option<NonZeroU32>) => config.breaker_threshold = n.map(NonZeroU32::get);
        /// How long the breaker stays open the first time, before it lets a probe through.
        /// Default 2 s; must not be zero.
        breaker_pause(pause: Duration) => config.breaker_pause = pause;
        /// The longest the breaker stays open: each failed probe doubles the pause up to this.
        /// Default 60 s; must be at least the [`breaker_pause`](Self::breaker_pause).
        breaker_max_pause(pause: Duration) => config.breaker_max_pause = pause;
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A [`Config`](crate::ErrorKind::Config) error naming the setting when the decrease factor is not in
    /// `(0, 1)`, the minimum or initial limit is above the cap, the initial limit is below the
    /// minimum, `recovery_increase_after` exceeds `increase_after`, the breaker pause is zero
    /// or above its maximum, or a pause is longer than a day.
    pub fn build(self) -> crate::Result<AdaptiveConfig> {
        let mut c = self.config;
        c.initial = self.initial.unwrap_or(if c.adaptive {
            c.cap.min(SLOW_START_FROM).max(c.min)
        } else {
            c.cap
        });
        let (f, day) = (c.decrease_factor, Duration::from_secs(86_400));
        let (cap, min, initial) = (c.cap, c.min, c.initial);
        let (recovery, increase) = (c.recovery_increase_after, c.increase_after);
        let (pause, max) = (c.breaker_pause, c.breaker_max_pause);
        let problems = [
            (
                !(f > 0.0 && f < 1.0),
                format!("decrease_factor must be in (0, 1), got {f}"),
            ),
            (min > cap, format!("min_limit {min} is above the cap {cap}")),
            (
                initial > cap || initial < min,
                format!("initial_limit {initial} is outside [min_limit {min}, cap {cap}]"),
            ),
            (
                recovery > increase,
                format!("recovery_increase_after {recovery} exceeds increase_after {increase}"),
            ),
            (pause.is_zero(), "breaker_pause must not be zero".into()),
            (
                pause > max,
                format!("breaker_pause {pause:?} is above breaker_max_pause {max:?}"),
            ),
            (
                c.max_pause > day || max > day || c.cooldown > day,
                "cooldown, max_pause and breaker_max_pause must be at most a day".into(),
            ),
        ];
        match problems.into_iter().find(|(bad, _)| *bad) {
            Some((_, m)) => Err(crate::Error::config(format!(
                "invalid adaptive concurrency setting: {m}"
            ))),
            None => Ok(c),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The AIMD arithmetic.

/// Of the calls of one window, the share answered "slow down" at or above which that is
/// congestion rather than noise: one in four (numerator, denominator).
const CONGESTED_SHARE: (u64, u64) = (1, 4);
/// Slow-down answers one window needs before it can be congestion, in an epoch that began
/// with a cut (or at the start): five, so that a random 5% of 429s almost never adds up.
const CUT_EVIDENCE: u64 = 5;
/// The same in an epoch that began with an increase: two, because undoing one step costs
/// little and a probe above the real limit should cost few 429s.
const UNDO_EVIDENCE: u64 = 2;
/// The window is the calls admitted last: as many as the limit (one round of the pipeline),
/// at least this many...
const MIN_WINDOW: u64 = 16;
/// ...and at most this many.
const MAX_WINDOW: u64 = 64;

/// Marks on the most recent admissions, newest in bit 0: which of them got a given answer.
///
/// Calls still in flight count as unmarked. So the share is of the calls *sent*, not of the
/// answers received: after many calls went out at once (the start, the end of a pause) the
/// fast errors come back before the slow successes, and a share of the answers would read a
/// random 5% of fast errors as a wall of them.
#[derive(Debug, Clone, Copy, Default)]
struct Recent {
    /// Admissions so far.
    admitted: u64,
    bits: u64,
}

impl Recent {
    /// A call is admitted; returns its number.
    fn admit(&mut self) -> u64 {
        self.bits <<= 1;
        self.admitted += 1;
        self.admitted - 1
    }

    /// Marks the call with this number, if it is among the last 64.
    fn mark(&mut self, seq: u64) {
        let ago = self.admitted.saturating_sub(seq + 1);
        if ago < 64 {
            self.bits |= 1 << ago;
        }
    }

    /// How many of the last `n` calls (at most 64, and only those numbered `since` or later)
    /// are marked, if they are at least the share `num / den` of those calls.
    fn share(&self, since: u64, n: u64, (num, den): (u64, u64)) -> Option<u64> {
        let n = n.min(self.admitted - since);
        let mask = if n >= 64 { u64::MAX } else { (1 << n) - 1 };
        let marked = u64::from((self.bits & mask).count_ones());
        (marked * den >= n * num).then_some(marked)
    }
}
/// Where the limit starts when it adapts, if the cap is higher (see
/// [`AdaptiveConfigBuilder::initial_limit`]).
const SLOW_START_FROM: usize = 16;
/// The most a run of failed probes multiplies the successes the next probe waits for.
const MAX_PROBE_BACKOFF: u32 = 8;

/// What a finished call says about the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It succeeded.
    Success,
    /// The server asked to slow down: a 429, or a retryable error with a `Retry-After`.
    SlowDown,
    /// Any other error: it says nothing about how many calls the server takes.
    Other,
}

/// How the current epoch began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Began {
    /// At the start, or with a cut or an undone increase.
    Down,
    /// With an increase by one; `probe`: above the highest limit known to work.
    Up { probe: bool },
}

/// What one result did to the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Verdict {
    change: Option<Change>,
    /// The window's slow-down answers reached the congestion share.
    congested: bool,
    /// ...and not only right after a step up: the server's "slow down" is meant for every
    /// call (see the module docs on `Retry-After`).
    pause: bool,
}

/// The limit and the rules that move it; no clock of its own, no locking (unit tested).
#[derive(Debug, Clone)]
struct Aimd {
    limit: usize,
    /// The settings (`initial` is only where `limit` started).
    c: AdaptiveConfig,
    began: Began,
    /// The number of the first call admitted in this epoch (the limit's last change): only
    /// calls admitted since are counted in its window.
    epoch_start: u64,
    /// Which of the last calls were answered "slow down".
    slowed: Recent,
    /// Successes since the last change of the limit.
    successes: u32,
    /// Below this limit the limit climbs quickly: it is known to have worked.
    recovery_target: usize,
    /// Multiplies `increase_after` above the recovery target; doubled by each failed probe,
    /// back to 1 when a probe holds.
    backoff: u32,
    /// No cut before this instant (the cool-down).
    no_cut_before: Option<Instant>,
    /// Until the first congestion, below the cap: every success that took the last free slot
    /// raises the limit.
    slow_start: bool,
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
            c: c.clone(),
            began: Began::Down,
            epoch_start: 0,
            slowed: Recent::default(),
            successes: 0,
            recovery_target: 0,
            backoff: 1,
            no_cut_before: None,
            slow_start: c.adaptive && c.initial < c.cap,
        }
    }

    /// `limit * factor`, rounded down, at least one less than `limit`, at least `min`.
    fn decreased(limit: usize, factor: f64, min: usize) -> usize {
        // Limits are far below 2^52: the product is exact enough.
        let cut = (limit as f64 * factor).floor() as usize;
        cut.min(limit.saturating_sub(1)).max(min)
    }

    /// The limit changed from `from`: a new epoch begins. Returns the change.
    fn new_epoch(&mut self, began: Began, from: usize) -> Option<Change> {
        self.began = began;
        self.epoch_start = self.slowed.admitted;
        self.slowed.bits = 0;
        self.successes = 0;
        Some(Change {
            from,
            to: self.limit,
        })
    }

    /// Call `seq` (numbered by `slowed`) finished at `now` with `outcome`; `saturated` says
    /// whether the limit was reached when it was admitted.
    fn on_result(&mut self, seq: u64, saturated: bool, outcome: Outcome, now: Instant) -> Verdict {
        if seq >= self.epoch_start && outcome == Outcome::SlowDown {
            self.slowed.mark(seq);
            // Congestion: enough slow-down answers, and at least the congestion share of the
            // calls the window sent.
            let raised = self.just_raised();
            let evidence = if raised { UNDO_EVIDENCE } else { CUT_EVIDENCE };
            let slowed = self
                .slowed
                .share(self.epoch_start, self.window(), CONGESTED_SHARE);
            if slowed.is_some_and(|n| n >= evidence) {
                // Two answers after a step up are enough to take the step back, not to make
                // every call wait.
                return Verdict {
                    change: self.back_off(raised, now),
                    congested: true,
                    pause: !raised,
                };
            }
        }
        Verdict {
            change: self.on_success(outcome == Outcome::Success && saturated),
            ..Verdict::default()
        }
    }

    /// The size of the window: as many calls as the limit, within bounds.
    fn window(&self) -> u64 {
        (self.limit as u64).clamp(MIN_WINDOW, MAX_WINDOW)
    }

    /// Whether this epoch began with an increase and has not yet sent a window's worth of
    /// calls: the time in which a step up the server cannot take shows.
    fn just_raised(&self) -> bool {
        matches!(self.began, Began::Up { .. })
            && self.slowed.admitted - self.epoch_start <= self.window()
    }

    /// Congestion: undo the increase that began this epoch (`undo`: it came within the first
    /// window after it), or cut. The window starts again whatever happens, so the next verdict
    /// needs new evidence.
    fn back_off(&mut self, undo: bool, now: Instant) -> Option<Change> {
        self.slowed.bits = 0;
        self.slow_start = false;
        if !self.c.adaptive || self.limit <= self.c.min {
            return None;
        }
        let from = self.limit;
        let slower_probes = match self.began {
            // The step up is what the server refused: take it back (the level below is the
            // one that works).
            Began::Up { probe } if undo => {
                self.limit -= 1;
                probe
            }
            _ if self.no_cut_before.is_some_and(|t| now < t) => return None,
            _ => {
                self.limit = Self::decreased(from, self.c.decrease_factor, self.c.min);
                self.no_cut_before = now.checked_add(self.c.cooldown);
                // The levels just below the cut are where trouble starts: probe them slowly.
                true
            }
        };
        self.recovery_target = from - 1;
        if slower_probes {
            self.backoff = (self.backoff * 2).min(MAX_PROBE_BACKOFF);
        }
        self.new_epoch(Began::Down, from)
    }

    /// A call finished; `saturated`: it succeeded (whatever epoch it was admitted in: a
    /// success is a success) and the limit was reached when it was admitted. Nothing else
    /// counts: a success with slots to spare says nothing about a higher limit, and counting
    /// it would let the limit run up while callers are few (in retry back-off, say) and then
    /// let them all in at once.
    fn on_success(&mut self, saturated: bool) -> Option<Change> {
        if !self.c.adaptive || !saturated || self.limit >= self.c.cap {
            return None;
        }
        self.successes += 1;
        let needed = if self.slow_start {
            1
        } else if self.limit < self.recovery_target {
            self.c.recovery_increase_after
        } else {
            self.c.increase_after.saturating_mul(self.backoff)
        };
        if self.successes < needed {
            return None;
        }
        if self.began == (Began::Up { probe: true }) {
            // The last probe held: the next one need not wait longer.
            self.backoff = 1;
        }
        let from = self.limit;
        self.limit += 1;
        let probe = !self.slow_start && from >= self.recovery_target;
        self.new_epoch(Began::Up { probe }, from)
    }
}

// ---------------------------------------------------------------------------------------------
// The circuit breaker.

crate::error::named_enum! {
/// The state of an [`Adaptive`] wrapper's circuit breaker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls are admitted (subject to the limit).
    #[default]
    Closed = "closed",
    /// After a run of outage errors: no call is admitted until the pause has passed.
    Open = "open",
    /// The pause has passed: one call (the probe) is let through to see whether the backend is
    /// back.
    HalfOpen = "half_open",
}
}

#[derive(Debug, Clone)]
struct Breaker {
    /// The settings (`breaker_*` are the breaker's).
    c: AdaptiveConfig,
    /// The pause the next opening uses.
    next_pause: Duration,
    /// Outage errors in a row while closed.
    failures: u32,
    /// Which of the last calls failed with an outage error.
    down: Recent,
    /// The number of the first call admitted since the breaker last closed.
    since: u64,
    state: BreakerState,
    /// While open: the end of the pause.
    until: Instant,
    /// While half open: the probe is out.
    probing: bool,
}

/// Of the calls admitted last (four times the threshold, at most 64), the share that failed
/// with an outage error at or above which a streak of them opens the breaker: three in four
/// (numerator, denominator).
const OUTAGE_SHARE: (u64, u64) = (3, 4);

impl Breaker {
    fn new(c: &AdaptiveConfig) -> Self {
        Breaker {
            c: c.clone(),
            next_pause: c.breaker_pause,
            failures: 0,
            down: Recent::default(),
            since: 0,
            state: BreakerState::Closed,
            until: Instant::now(),
            probing: false,
        }
    }

    /// Records the result of call `seq`: `down` says whether it failed with a server error,
    /// a connection failure or a timeout, `probe` whether it was the half-open probe.
    /// Returns the event of a state change.
    fn on_result(&mut self, down: bool, seq: u64, probe: bool, now: Instant) -> Option<Event> {
        let threshold = self.c.breaker_threshold?;
        match (self.state, down) {
            (BreakerState::Closed, false) => {
                self.failures = 0;
                None
            }
            (BreakerState::Closed, true) => {
                self.failures += 1;
                self.down.mark(seq);
                let window = u64::from(threshold.saturating_mul(4)).min(MAX_WINDOW);
                let outage = self.down.share(self.since, window, OUTAGE_SHARE).is_some();
                if self.failures < threshold || !outage {
                    return None;
                }
                let pause = self.open(now);
                Some(Event::BreakerOpened {
                    failures: self.failures,
                    pause,
                })
            }
            (BreakerState::HalfOpen, false) if probe => {
                self.state = BreakerState::Closed;
                self.failures = 0;
                self.down.bits = 0;
                self.since = self.down.admitted;
                self.next_pause = self.c.breaker_pause;
                Some(Event::BreakerClosed)
            }
            (BreakerState::HalfOpen, true) if probe => {
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
        self.state = BreakerState::Open;
        self.until = later(now, pause);
        self.next_pause = pause.saturating_mul(2).min(self.c.breaker_max_pause);
        pause
    }

    /// The probe was cancelled before it had a result: let another one through.
    fn probe_cancelled(&mut self) {
        self.probing = false;
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
/// at any time: [`snapshot`](Self::snapshot) reads them all at one moment. It is also the
/// limiter: its lock guards the limit, the breaker and the queue.
pub struct AdaptiveStats(Mutex<State>);

/// All of an [`AdaptiveStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdaptiveSnapshot {
    /// The most calls in flight the limit may allow (the configured concurrency).
    pub cap: usize,
    /// The current limit on calls in flight.
    pub limit: usize,
    /// The lowest the limit has been since slow start ended (the current limit until then).
    pub min_limit: usize,
    /// The highest the limit has risen to since slow start ended (before any rise: the
    /// current limit). With slow start and the descent after it left out,
    /// `min_limit..=max_limit` is the range the limit settled in.
    pub max_limit: usize,
    /// Calls running in the inner backend now.
    pub in_flight: usize,
    /// Calls waiting to be admitted now.
    pub waiting: usize,
    /// Calls that finished with a result (successes and errors; cancelled ones not counted).
    pub calls: u64,
    /// Of those, calls that were rate limited ([`BackendErrorKind::RateLimited`]).
    pub rate_limited: u64,
    /// Times the answers asking to slow down were judged congestion (enough of them, and a
    /// large enough share of the calls; see the [module docs](self)). With `rate_limited`
    /// far above it, most 429s were noise.
    pub congestion: u64,
    /// Times the limit was lowered (a cut, or a step up taken back).
    pub decreases: u64,
    /// Times the limit was raised.
    pub increases: u64,
    /// `Retry-After` pauses of every call's admission started (or extended): only congestion
    /// starts one.
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
        // Before any call both are 0.
        self.rate_limited as f64 / self.calls.max(1) as f64
    }
}

impl fmt::Debug for AdaptiveStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
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
                    "congestion: concurrency limit lowered"
                );
            }
            Event::Limit(Change { from, to }, in_flight) => {
                tracing::debug!(backend, from, to, in_flight, "concurrency limit raised");
            }
            Event::Paused(pause) => tracing::info!(
                backend,
                pause_ms = super::millis(pause),
                "congestion with Retry-After: admission of every call paused"
            ),
            Event::BreakerOpened { failures, pause } => tracing::warn!(
                backend,
                failures,
                pause_ms = super::millis(pause),
                "circuit breaker opened: admission paused after failures in a row"
            ),
            Event::BreakerReopened { pause } => tracing::warn!(
                backend,
                pause_ms = super::millis(pause),
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

/// Everything the limiter knows, under one lock: the limit, the breaker, the queue and the
/// counters.
struct State {
    aimd: Aimd,
    breaker: Breaker,
    in_flight: usize,
    /// No admission before this instant (a `Retry-After`).
    paused_until: Option<Instant>,
    /// The waiters, first come first: each one's own wake-up, which is also who it is.
    queue: VecDeque<Arc<Notify>>,
    /// The counters; the gauges are read from the fields above.
    figures: AdaptiveSnapshot,
    /// Whether the limit has risen since slow start (or since the start, without one).
    risen: bool,
}

/// Why a call cannot be admitted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Not before this instant.
    Until(Instant),
    /// Not until a call finishes.
    Full,
}

/// What an admitted call carries: its number, whether it took the last slot the limit
/// allowed, and whether it is the probe.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    seq: u64,
    saturated: bool,
    probe: bool,
}

impl State {
    /// Why a call could not be admitted at `now`, without changing anything.
    fn blocked(&self, now: Instant) -> Option<Block> {
        let b = &self.breaker;
        match self.paused_until {
            Some(t) if now < t => Some(Block::Until(t)),
            _ if b.state == BreakerState::Open && now < b.until => Some(Block::Until(b.until)),
            _ if b.state == BreakerState::HalfOpen && b.probing => Some(Block::Full),
            _ => (self.in_flight >= self.aimd.limit).then_some(Block::Full),
        }
    }

    /// Admits a call at `now` if it may go.
    fn try_admit(&mut self, now: Instant, events: &mut Vec<Event>) -> Result<Ticket, Block> {
        if let Some(block) = self.blocked(now) {
            return Err(block);
        }
        // Not blocked and not closed: the pause is over, or the last probe was cancelled.
        let probe = self.breaker.state != BreakerState::Closed;
        if self.breaker.state == BreakerState::Open {
            events.push(Event::BreakerHalfOpen);
        }
        if probe {
            self.breaker.state = BreakerState::HalfOpen;
            self.breaker.probing = true;
        }
        self.in_flight += 1;
        // The two windows number the calls alike.
        self.breaker.down.admit();
        Ok(Ticket {
            seq: self.aimd.slowed.admit(),
            saturated: self.in_flight >= self.aimd.limit,
            probe,
        })
    }

    /// Wakes the first waiter, if any, to look again.
    fn wake_first(&self) {
        if let Some(w) = self.queue.front() {
            w.notify_one();
        }
    }
}

impl AdaptiveStats {
    /// Every figure at once.
    #[must_use]
    pub fn snapshot(&self) -> AdaptiveSnapshot {
        let st = lock(&self.0);
        AdaptiveSnapshot {
            limit: st.aimd.limit,
            in_flight: st.in_flight,
            waiting: st.queue.len(),
            breaker: st.breaker.state,
            ..st.figures
        }
    }

    /// Waits for admission, in arrival order.
    ///
    /// Cancel safe: dropping the future while it waits takes it out of the queue (and hands a
    /// wake-up it may have had to the next waiter); once admitted, the [`Permit`] frees the
    /// slot when dropped.
    async fn acquire(&self, events: &mut Vec<Event>) -> Permit<'_> {
        let notify = {
            let mut st = lock(&self.0);
            if st.queue.is_empty() {
                if let Ok(ticket) = st.try_admit(Instant::now(), events) {
                    return self.permit(ticket);
                }
            }
            let notify = Arc::new(Notify::new());
            st.queue.push_back(Arc::clone(&notify));
            notify
        };
        let mut place = Place {
            stats: self,
            notify,
            queued: true,
        };
        loop {
            let deadline = {
                let mut st = lock(&self.0);
                let now = Instant::now();
                let first = st
                    .queue
                    .front()
                    .is_some_and(|w| Arc::ptr_eq(w, &place.notify));
                match first.then(|| st.try_admit(now, events)) {
                    Some(Ok(ticket)) => {
                        st.queue.pop_front();
                        place.queued = false;
                        // Pass the turn on unless the next one would only wait for a
                        // release (which wakes it).
                        if st.blocked(now) != Some(Block::Full) {
                            st.wake_first();
                        }
                        return self.permit(ticket);
                    }
                    Some(Err(Block::Until(t))) => Some(t),
                    _ => None,
                }
            };
            let notified = pin!(place.notify.notified());
            match deadline {
                Some(t) => {
                    let sleep = pin!(tokio::time::sleep_until(t));
                    futures::future::select(notified, sleep).await;
                }
                None => notified.await,
            }
        }
    }

    fn permit(&self, ticket: Ticket) -> Permit<'_> {
        Permit {
            stats: self,
            ticket,
            finished: false,
        }
    }
}

/// A waiter's place in the queue; leaving it (by drop) hands the turn on.
struct Place<'a> {
    stats: &'a AdaptiveStats,
    notify: Arc<Notify>,
    queued: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        let mut st = lock(&self.stats.0);
        if let Some(at) = st.queue.iter().position(|w| Arc::ptr_eq(w, &self.notify)) {
            st.queue.remove(at);
            if at == 0 {
                // It may have been woken for a turn it will not take.
                st.wake_first();
            }
        }
    }
}

/// An admitted call's slot; frees it when finished or dropped.
struct Permit<'a> {
    stats: &'a AdaptiveStats,
    ticket: Ticket,
    finished: bool,
}

impl Permit<'_> {
    /// Records the result of the call (`None`: it was cancelled) and frees its slot.
    fn finish(&mut self, result: Option<&Result<Completion, BackendError>>) -> Vec<Event> {
        self.finished = true;
        let (ticket, mut events) = (self.ticket, Vec::new());
        let now = Instant::now();
        let mut guard = lock(&self.stats.0);
        let st = &mut *guard;
        st.in_flight -= 1;
        st.wake_first();
        let Some(result) = result else {
            // Cancelled: no verdict on the backend.
            if ticket.probe {
                st.breaker.probe_cancelled();
            }
            return events;
        };
        let figures = &mut st.figures;
        figures.calls += 1;
        let err = result.as_ref().err();
        let kind = err.map(BackendError::kind);
        let rate_limited = kind == Some(BackendErrorKind::RateLimited);
        figures.rate_limited += u64::from(rate_limited);
        let outcome = match err {
            None => Outcome::Success,
            Some(e) if rate_limited || (e.is_retryable() && e.retry_after().is_some()) => {
                Outcome::SlowDown
            }
            Some(_) => Outcome::Other,
        };
        let verdict = st
            .aimd
            .on_result(ticket.seq, ticket.saturated, outcome, now);
        figures.congestion += u64::from(verdict.congested);
        // Many calls were told to slow down: the wait is meant for everyone.
        let after = err.filter(|e| verdict.pause && e.is_retryable());
        if let Some(pause) = after.and_then(BackendError::retry_after) {
            let pause = pause.min(st.aimd.c.max_pause);
            let until = later(now, pause);
            if !pause.is_zero() && st.paused_until.is_none_or(|t| t < until) {
                st.paused_until = Some(until);
                figures.pauses += 1;
                events.push(Event::Paused(pause));
            }
        }
        if let Some(change @ Change { from, to }) = verdict.change {
            // In slow start (only ever rises) the extremes follow the limit: the range is
            // where it settled.
            if to < from {
                figures.decreases += 1;
                figures.min_limit = figures.min_limit.min(to);
                if !st.risen {
                    // Still descending: the maximum follows the limit down.
                    figures.max_limit = to;
                }
            } else {
                figures.increases += 1;
                if st.aimd.slow_start {
                    figures.min_limit = to;
                } else {
                    st.risen = true;
                }
                figures.max_limit = figures.max_limit.max(to);
            }
            events.push(Event::Limit(change, st.in_flight));
        }
        use BackendErrorKind::{Connection, Server, Timeout, Unavailable};
        let down = matches!(kind, Some(Server | Unavailable | Connection | Timeout));
        let breaker = st.breaker.on_result(down, ticket.seq, ticket.probe, now);
        if let Some(event) = breaker {
            // Opened or reopened (else it closed).
            figures.breaker_opened += u64::from(st.breaker.state == BreakerState::Open);
            events.push(event);
        }
        events
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(None);
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
#[derive(Debug)]
pub struct Adaptive<B> {
    inner: B,
    stats: Arc<AdaptiveStats>,
}

impl<B> Adaptive<B> {
    /// Wraps `inner` with the default settings and this cap (see [`AdaptiveConfig::new`]).
    pub fn new(inner: B, cap: NonZeroUsize) -> Self {
        Self::with_config(inner, AdaptiveConfig::new(cap))
    }

    /// Wraps `inner` with these settings.
    pub fn with_config(inner: B, config: AdaptiveConfig) -> Self {
        let figures = AdaptiveSnapshot {
            cap: config.cap,
            min_limit: config.initial,
            max_limit: config.initial,
            ..AdaptiveSnapshot::default()
        };
        let state = State {
            aimd: Aimd::new(&config),
            breaker: Breaker::new(&config),
            in_flight: 0,
            paused_until: None,
            queue: VecDeque::new(),
            figures,
            risen: false,
        };
        Adaptive {
            inner,
            stats: Arc::new(AdaptiveStats(Mutex::new(state))),
        }
    }

    /// The shared statistics; they keep changing after this call.
    #[must_use]
    pub fn stats(&self) -> Arc<AdaptiveStats> {
        Arc::clone(&self.stats)
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
        let mut permit = self.stats.acquire(&mut events).await;
        for event in events {
            event.emit(&self.inner.name());
        }
        let result = self.inner.complete(request).await;
        for event in permit.finish(Some(&result)) {
            event.emit(&self.inner.name());
        }
        result
    }

    super::forward_names!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    /// Starting at the cap.
    fn aimd(cap: usize) -> Aimd {
        let config = AdaptiveConfig::builder(nz(cap))
            .initial_limit(nz(cap))
            .build()
            .unwrap();
        Aimd::new(&config)
    }

    #[test]
    fn slow_start_doubles_each_round_until_congestion() {
        let mut a = Aimd::new(&AdaptiveConfig::new(nz(256)));
        assert_eq!((a.limit, a.slow_start), (16, true));
        // One per success: 16 successes (a round at 16) take it to 32.
        assert_eq!(successes(&mut a, 16).len(), 16);
        assert_eq!(a.limit, 32);
        // Two slow-downs right after a step take it back and end slow start: congestion, but
        // not enough to make every call wait.
        let now = Instant::now();
        assert_eq!(
            one(&mut a, true, Outcome::SlowDown, now),
            Verdict::default()
        );
        let v = one(&mut a, true, Outcome::SlowDown, now);
        assert_eq!(v.change, Some(Change { from: 32, to: 31 }));
        assert!(v.congested && !v.pause);
        assert!(!a.slow_start);
        // From there, probes: 25 successes a step, then twice that after a failed one.
        assert!(successes(&mut a, 24).is_empty());
        assert_eq!(successes(&mut a, 1), vec![Change { from: 31, to: 32 }]);
        // A fixed limit starts at the cap and has no slow start.
        let fixed = AdaptiveConfig::builder(nz(256))
            .adaptive(false)
            .build()
            .unwrap();
        let a = Aimd::new(&fixed);
        assert_eq!((a.limit, a.slow_start), (256, false));
        // Nor does a cap of 16 or less.
        let a = Aimd::new(&AdaptiveConfig::new(nz(8)));
        assert_eq!((a.limit, a.slow_start), (8, false));
    }

    /// `n` calls admitted at once, then answered "slow down" in turn at `now`; the changes
    /// they made.
    fn slow_downs(a: &mut Aimd, n: usize, now: Instant) -> Vec<Change> {
        let calls: Vec<_> = (0..n).map(|_| a.slowed.admit()).collect();
        calls
            .into_iter()
            .filter_map(|c| a.on_result(c, true, Outcome::SlowDown, now).change)
            .collect()
    }

    /// One call admitted and answered with `outcome`.
    fn one(a: &mut Aimd, saturated: bool, outcome: Outcome, now: Instant) -> Verdict {
        let call = a.slowed.admit();
        a.on_result(call, saturated, outcome, now)
    }

    /// `n` saturated successes, one after the other.
    fn successes(a: &mut Aimd, n: usize) -> Vec<Change> {
        let t = Instant::now();
        (0..n)
            .filter_map(|_| one(a, true, Outcome::Success, t).change)
            .collect()
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
    fn congestion_needs_evidence_and_a_share() {
        let mut a = aimd(64);
        let t = Instant::now();
        // Four slow-downs in a row are not enough evidence after a cut or at the start...
        assert!(slow_downs(&mut a, 4, t).is_empty());
        // ...the fifth is, at 5 of 5.
        let v = one(&mut a, true, Outcome::SlowDown, t);
        assert_eq!(v.change, Some(Change { from: 64, to: 54 }));
        assert!(v.congested && v.pause);

        // Five slow-downs among 40 results (12.5%) are not congestion.
        let mut a = aimd(64);
        for i in 0..40 {
            let outcome = if i % 8 == 0 {
                Outcome::SlowDown
            } else {
                Outcome::Other
            };
            assert_eq!(one(&mut a, true, outcome, t), Verdict::default());
        }
        // A quarter is: 7 more slow-downs in a row bring the window to 12 of 47.
        for _ in 0..6 {
            assert_eq!(one(&mut a, true, Outcome::SlowDown, t), Verdict::default());
        }
        let v = one(&mut a, true, Outcome::SlowDown, t);
        assert_eq!(v.change, Some(Change { from: 64, to: 54 }));

        // The share is of the calls sent, not of the answers: 64 calls go out at once and the
        // five that fail come back first: 5 of 64 is not congestion.
        let mut a = aimd(64);
        let calls: Vec<_> = (0..64).map(|_| a.slowed.admit()).collect();
        for &c in &calls[..5] {
            assert_eq!(
                a.on_result(c, true, Outcome::SlowDown, t),
                Verdict::default()
            );
        }
    }

    #[test]
    fn one_cut_per_epoch_and_cooldown() {
        let mut a = aimd(256);
        let t0 = Instant::now();
        let old = a.slowed.admit();
        assert_eq!(
            slow_downs(&mut a, 200, t0),
            vec![Change { from: 256, to: 217 }]
        );
        // The rest of the burst was admitted in the first epoch: no further cut.
        assert_eq!(
            a.on_result(old, true, Outcome::SlowDown, t0),
            Verdict::default()
        );
        assert_eq!(a.limit, 217);
        // Calls of the new epoch inside the cool-down do not cut either...
        assert!(old < a.epoch_start);
        let v = one(&mut a, true, Outcome::SlowDown, t0);
        assert_eq!(v, Verdict::default());
        assert!(slow_downs(&mut a, 10, t0 + Duration::from_millis(10)).is_empty());
        // ...after it, they do.
        assert_eq!(
            slow_downs(&mut a, 5, t0 + Duration::from_millis(20)),
            vec![Change { from: 217, to: 184 }]
        );
    }

    #[test]
    fn noise_neither_cuts_nor_stops_the_rise() {
        // One result in twenty asks to slow down, spread evenly: the worst steady pattern of a
        // 5% rate.
        let t = Instant::now();
        let mut a = aimd(64);
        for i in 0..20_000 {
            let outcome = if i % 20 == 7 {
                Outcome::SlowDown
            } else {
                Outcome::Success
            };
            assert_eq!(one(&mut a, true, outcome, t).change, None);
        }
        assert_eq!(a.limit, 64);

        // Started low, the limit climbs to the cap through the same noise (past slow start:
        // the first congestion is long gone).
        let config = AdaptiveConfig::builder(nz(64))
            .initial_limit(nz(16))
            .build()
            .unwrap();
        let mut a = Aimd::new(&config);
        a.slow_start = false;
        let mut rises = 0;
        for i in 0..2_000 {
            let outcome = if i % 20 == 7 {
                Outcome::SlowDown
            } else {
                Outcome::Success
            };
            let change = one(&mut a, true, outcome, t).change;
            if let Some(c) = change {
                assert_eq!(c.to, c.from + 1, "only rises: {c:?}");
                rises += 1;
            }
        }
        assert_eq!((a.limit, rises), (64, 48));
    }

    #[test]
    fn a_step_up_into_congestion_is_taken_back_and_probes_back_off() {
        let t = Instant::now();
        let config = AdaptiveConfig::builder(nz(64))
            .initial_limit(nz(32))
            .build()
            .unwrap();
        let mut a = Aimd::new(&config);
        a.slow_start = false;
        // 25 successes: a probe to 33.
        assert_eq!(successes(&mut a, 25), vec![Change { from: 32, to: 33 }]);
        // Two slow-downs right after it take it back (no multiplicative cut).
        assert_eq!(slow_downs(&mut a, 2, t), vec![Change { from: 33, to: 32 }]);
        // The next probe waits 50 successes, then 100, then 200, and no longer.
        for wait in [50, 100, 200, 200] {
            assert!(successes(&mut a, wait - 1).is_empty(), "{wait}");
            assert_eq!(successes(&mut a, 1), vec![Change { from: 32, to: 33 }]);
            assert_eq!(slow_downs(&mut a, 2, t), vec![Change { from: 33, to: 32 }]);
        }
        // A probe that holds (200 successes at 33) rises and resets the wait to 25.
        assert_eq!(successes(&mut a, 200), vec![Change { from: 32, to: 33 }]);
        assert_eq!(successes(&mut a, 200), vec![Change { from: 33, to: 34 }]);
        assert_eq!(successes(&mut a, 25), vec![Change { from: 34, to: 35 }]);
        // Congestion later in an epoch that did not start with a rise cuts.
        let mut a = aimd(64);
        assert_eq!(slow_downs(&mut a, 5, t), vec![Change { from: 64, to: 54 }]);
    }

    #[test]
    fn increase_after_a_run_fast_below_the_last_cut() {
        let config = AdaptiveConfig::builder(nz(64))
            .initial_limit(nz(40))
            .build()
            .unwrap();
        let mut a = Aimd::new(&config);
        a.slow_start = false;
        // Plain additive increase: one per 25 successes.
        assert!(successes(&mut a, 24).is_empty());
        assert_eq!(successes(&mut a, 1), vec![Change { from: 40, to: 41 }]);
        // Successes of calls admitted with slots to spare do not count.
        for _ in 0..100 {
            let v = one(&mut a, false, Outcome::Success, Instant::now());
            assert_eq!(v, Verdict::default());
        }
        // 25 more successes at 41 hold the step; at 42, five slow-downs among the first
        // results cut (the step was taken back first, so the cut is from 41).
        assert_eq!(successes(&mut a, 25), vec![Change { from: 41, to: 42 }]);
        let now = Instant::now();
        assert_eq!(
            slow_downs(&mut a, 2, now),
            vec![Change { from: 42, to: 41 }]
        );
        assert_eq!(
            slow_downs(&mut a, 5, now),
            vec![Change { from: 41, to: 34 }]
        );
        // From 34 to 40: one per 2 successes.
        assert_eq!(successes(&mut a, 12).len(), 6);
        assert_eq!(a.limit, 40);
        // Above it, probes wait four times 25: the failed step to 42 and the cut each
        // doubled the wait.
        assert!(successes(&mut a, 99).is_empty());
        assert_eq!(successes(&mut a, 1), vec![Change { from: 40, to: 41 }]);
    }

    #[test]
    fn never_above_the_cap_nor_below_the_minimum() {
        let mut a = aimd(4);
        assert!(successes(&mut a, 1000).is_empty());
        assert_eq!(a.limit, 4);
        let mut now = Instant::now();
        for _ in 0..10 {
            now += Duration::from_secs(1);
            slow_downs(&mut a, 5, now);
        }
        assert_eq!(a.limit, 1);
        // At the floor, congestion is still reported (for the pause) and moves nothing.
        let v = one(&mut a, true, Outcome::SlowDown, now);
        assert_eq!(v, Verdict::default());
        for _ in 0..3 {
            one(&mut a, true, Outcome::SlowDown, now);
        }
        let v = one(&mut a, true, Outcome::SlowDown, now);
        assert_eq!((v.change, v.congested, v.pause), (None, true, true));
    }

    #[test]
    fn fixed_limit_does_not_move() {
        let config = AdaptiveConfig::builder(nz(16))
            .adaptive(false)
            .build()
            .unwrap();
        let mut a = Aimd::new(&config);
        let t = Instant::now();
        assert!(slow_downs(&mut a, 4, t).is_empty());
        let v = one(&mut a, true, Outcome::SlowDown, t);
        assert_eq!((v.change, v.congested, v.pause), (None, true, true));
        assert!(successes(&mut a, 1000).is_empty());
        assert_eq!(a.limit, 16);
    }

    /// One call admitted and answered.
    fn answer(b: &mut Breaker, down: bool, probe: bool, now: Instant) -> Option<Event> {
        let seq = b.down.admit();
        b.on_result(down, seq, probe, now)
    }

    const DOWN: bool = true;
    const UP: bool = false;

    /// The pause has passed and the probe went out.
    fn probing(b: &mut Breaker) {
        b.state = BreakerState::HalfOpen;
        b.probing = true;
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
        assert_eq!(answer(&mut b, DOWN, false, t), None);
        assert_eq!(answer(&mut b, UP, false, t), None);
        assert_eq!(answer(&mut b, DOWN, false, t), None);
        assert_eq!(answer(&mut b, DOWN, false, t), None);
        assert_eq!(
            answer(&mut b, DOWN, false, t),
            Some(Event::BreakerOpened {
                failures: 3,
                pause: Duration::from_secs(1)
            })
        );
        assert_eq!(b.state, BreakerState::Open);
        // Late results of calls admitted before do nothing.
        assert_eq!(answer(&mut b, UP, false, t), None);
        assert_eq!(b.state, BreakerState::Open);
        probing(&mut b);
        assert_eq!(
            answer(&mut b, DOWN, true, t),
            Some(Event::BreakerReopened {
                pause: Duration::from_secs(2)
            })
        );
        probing(&mut b);
        // Doubling stops at the maximum.
        assert_eq!(
            answer(&mut b, DOWN, true, t),
            Some(Event::BreakerReopened {
                pause: Duration::from_secs(3)
            })
        );
        probing(&mut b);
        b.probe_cancelled();
        assert_eq!((b.state, b.probing), (BreakerState::HalfOpen, false));
        probing(&mut b);
        assert_eq!(answer(&mut b, UP, true, t), Some(Event::BreakerClosed));
        assert_eq!(b.next_pause, Duration::from_secs(1));
    }

    #[test]
    fn a_streak_among_successes_does_not_open_the_breaker() {
        let mut b = Breaker::new(&AdaptiveConfig::new(nz(8)));
        let t = Instant::now();
        // 15 successes, then 14 timeouts together (one bad connection): 14 of the last 20.
        for _ in 0..15 {
            assert_eq!(answer(&mut b, UP, false, t), None);
        }
        for _ in 0..14 {
            assert_eq!(answer(&mut b, DOWN, false, t), None);
        }
        // The fifteenth makes three quarters of the window: an outage.
        assert!(matches!(
            answer(&mut b, DOWN, false, t),
            Some(Event::BreakerOpened { failures: 15, .. })
        ));
        // A failure share of 30% in streaks of 6, after a first success, never opens it.
        let mut b = Breaker::new(&AdaptiveConfig::new(nz(8)));
        for i in 0..10_000 {
            let health = if (i + 10) % 20 < 6 { DOWN } else { UP };
            assert_eq!(answer(&mut b, health, false, t), None, "{i}");
        }
        assert_eq!(b.state, BreakerState::Closed);
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
        assert_eq!(b().build().unwrap().initial, 10);
        let big = AdaptiveConfig::builder(nz(100));
        assert_eq!(big.clone().build().unwrap().initial, 16);
        assert_eq!(big.adaptive(false).build().unwrap().initial, 100);
    }
}
