//! [`Replicas`]: one backend over several replicas of one model (feature `middleware`).
//!
//! A model served by several servers (vLLM, SGLang or llama.cpp replicas on a cluster), or any
//! set of [`LlmBackend`]s that answer alike, used as one backend:
//!
//! - **Each replica has its own limit.** An [`Adaptive`] limit on calls in flight (with its
//!   `Retry-After` pauses; the draining below stands for its circuit breaker) per replica, so
//!   a slow or capped replica is held back without holding back the others.
//! - **Affinity.** The calls of one example go to the same replica while it is healthy: a call
//!   is placed by rendezvous hashing of its conversation (the request's messages other than
//!   system messages), which the first call, the second call and every re-ask of an example
//!   share; different examples spread evenly over the replicas. What that buys depends on the
//!   server's prefix cache. vLLM's automatic prefix caching (and SGLang's radix cache) keep the
//!   KV cache of the requests they served and let a new request skip the prefill of the
//!   tokens it shares with one of them *from its start* (vLLM hashes each block of tokens
//!   together with every token before it, so a block matches only when all of its prefix
//!   does). A re-ask repeats its request, so on its replica it skips the whole prompt's
//!   prefill; with [`DefaultTemplate`](crate::DefaultTemplate) the second call starts with its
//!   own instructions and shares with the first call only the chat template's opening tokens,
//!   so a template that puts the conversation first would gain the first call's prefill as
//!   well. Without affinity each of those requests would land on a replica whose cache holds
//!   nothing of it in two cases out of three (three replicas).
//! - **Failover.** A replica whose calls fail as an outage would (no connection, a timeout, a
//!   5xx, an answer that cannot be read, [`Unavailable`](crate::BackendErrorKind::Unavailable))
//!   three times in a row is
//!   drained: calls go to the next replica in their order, so an
//!   example moves once and stays. After a pause (2 s, doubling up to a minute while it keeps
//!   failing) one call probes it; a success brings it back. The failed call itself comes back
//!   as an error, for the retry wrapper outside to send again (to a healthy replica): nothing
//!   is sent twice but by the retry rules.
//!
//! Put it inside the retry, as the backend of a [`Stack`](super::Stack) without an adaptive
//! limit of its own (each replica has one):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> rmboost::Result<()> {
//! use std::num::NonZeroUsize;
//! use rmboost::backend::{AdaptiveConfig, Replicas, RetryPolicy, Stack};
//! use rmboost::testing::ScriptedBackend;
//! use rmboost::{Completion, CompletionRequest, LlmBackend, Message};
//!
//! let config = AdaptiveConfig::new(NonZeroUsize::new(32).unwrap());
//! let replicas = Replicas::new(config)
//!     .replica("gpu1", ScriptedBackend::from_fn(|_| Ok(Completion::new("from gpu1"))))
//!     .replica("gpu2", ScriptedBackend::from_fn(|_| Ok(Completion::new("from gpu2"))));
//! let stats = replicas.clone();
//! let backend = Stack::new().retry(RetryPolicy::default()).build(replicas);
//! let ask = || CompletionRequest::new(vec![Message::user("Why is the sky blue?")]);
//! let first = backend.complete(ask()).await.unwrap().text;
//! // The same conversation goes to the same replica.
//! assert_eq!(backend.complete(ask()).await.unwrap().text, first);
//! let calls: u64 = stats.stats().iter().map(|r| r.calls).sum();
//! assert_eq!(calls, 2);
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::time::Instant;

use super::adaptive::{Adaptive, AdaptiveConfig, AdaptiveSnapshot};
use super::{lock, Completion, CompletionRequest, LlmBackend, Role};
use crate::error::{BackendError, BackendErrorKind};

/// Outage errors in a row that drain a replica.
const DRAIN_AFTER: u32 = 3;
/// The first pause of a drained replica before it is probed; doubles while probes fail.
const FIRST_PAUSE: Duration = Duration::from_secs(2);
/// The longest pause of a drained replica.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Several replicas of one model as one backend; see the [module docs](self).
///
/// Cheap to clone (clones share the replicas and their state).
#[derive(Clone)]
pub struct Replicas {
    config: AdaptiveConfig,
    replicas: Arc<Vec<Replica>>,
}

struct Replica {
    name: String,
    backend: Adaptive<Box<dyn LlmBackend>>,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    /// The totals of [`ReplicaStats`].
    calls: u64,
    errors: u64,
    drains: u64,
    /// Outage errors in a row.
    failures: u32,
    /// Drained until then; `None` when healthy.
    drained_until: Option<Instant>,
    /// The next pause, if drained again.
    pause: Duration,
    /// A probe is in flight (only one at a time).
    probing: bool,
}

/// One replica's totals, from [`Replicas::stats`]. Serialises to JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ReplicaStats {
    /// The replica's name (for HTTP replicas, their endpoint).
    pub name: String,
    /// Calls it answered or failed.
    pub calls: u64,
    /// Of those, calls that failed.
    pub errors: u64,
    /// Times it was drained.
    pub drains: u64,
    /// Whether it is drained now.
    pub drained: bool,
    /// Its limit on calls in flight.
    #[serde(skip)]
    pub limit: AdaptiveSnapshot,
}

impl Replicas {
    /// No replica yet; each one added gets its own [`Adaptive`] limit with `config`.
    #[must_use]
    pub fn new(config: AdaptiveConfig) -> Self {
        Replicas {
            config,
            replicas: Arc::new(Vec::new()),
        }
    }

    /// Adds a replica; `name` shows in the statistics (an HTTP replica's endpoint, say).
    ///
    /// # Panics
    ///
    /// If this `Replicas` was cloned already (add every replica first).
    #[must_use]
    pub fn replica(mut self, name: impl Into<String>, backend: impl LlmBackend + 'static) -> Self {
        let backend: Box<dyn LlmBackend> = Box::new(backend);
        // The replicas drain a failing one themselves, so calls move instead of waiting
        // behind its breaker.
        let backend = Adaptive::with_config(backend, self.config.clone().without_breaker());
        let replicas = Arc::get_mut(&mut self.replicas)
            .expect("add every replica before cloning the Replicas");
        replicas.push(Replica {
            name: name.into(),
            backend,
            health: Mutex::new(Health {
                pause: FIRST_PAUSE,
                ..Health::default()
            }),
        });
        self
    }

    /// Each replica's totals so far, in the order they were added.
    #[must_use]
    pub fn stats(&self) -> Vec<ReplicaStats> {
        let now = Instant::now();
        self.replicas
            .iter()
            .map(|r| {
                let h = lock(&r.health);
                ReplicaStats {
                    name: r.name.clone(),
                    calls: h.calls,
                    errors: h.errors,
                    drains: h.drains,
                    drained: h.drained_until.is_some_and(|t| t > now),
                    limit: r.backend.stats().snapshot(),
                }
            })
            .collect()
    }

    /// The replicas in the order a call with this key tries them (rendezvous hashing: each
    /// key ranks the replicas its own way, and removing one moves only its keys).
    fn order(&self, key: u64) -> Vec<usize> {
        let mut ranked: Vec<(u64, usize)> = (0..self.replicas.len())
            .map(|i| (mix(key ^ mix(i as u64 + 1)), i))
            .collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        ranked.into_iter().map(|(_, i)| i).collect()
    }

    /// The replica for a call with this key, and whether the call is its probe.
    fn pick(&self, key: u64) -> (usize, bool) {
        let now = Instant::now();
        let order = self.order(key);
        for &i in &order {
            if let Some(probe) = self.replicas[i].availability(now) {
                return (i, probe);
            }
        }
        // Every replica is drained: the one back soonest (the call will most likely fail and
        // be retried; the replicas' pauses bound how often).
        let soonest = order
            .iter()
            .copied()
            .min_by_key(|&i| lock(&self.replicas[i].health).drained_until)
            .unwrap_or(0);
        (soonest, false)
    }
}

impl Replica {
    /// Whether a call may take this replica: `None` when it is drained (pass it by),
    /// `Some(probe)` when it may, as the probe of a drained replica whose pause passed if
    /// `probe`.
    fn availability(&self, now: Instant) -> Option<bool> {
        let mut h = lock(&self.health);
        match h.drained_until {
            Some(until) if until > now || h.probing => None,
            Some(_) => {
                h.probing = true;
                Some(true)
            }
            None => Some(false),
        }
    }

    /// Learns from a call's result.
    fn record(&self, result: &Result<Completion, BackendError>, probe: bool) {
        use BackendErrorKind::{Connection, InvalidResponse, Server, Timeout, Unavailable};
        let mut h = lock(&self.health);
        h.calls += 1;
        h.errors += u64::from(result.is_err());
        let kind = result.as_ref().err().map(BackendError::kind);
        let outage = matches!(
            kind,
            Some(Connection | Timeout | Server | Unavailable | InvalidResponse)
        );
        if !outage {
            if result.is_ok() {
                h.failures = 0;
                if h.drained_until.is_some() && probe {
                    tracing::info!(replica = %self.name, "replica back: calls go to it again");
                    h.drained_until = None;
                    h.pause = FIRST_PAUSE;
                }
            }
            return;
        }
        h.failures = h.failures.saturating_add(1);
        let drained = h.drained_until.is_some();
        if probe || (!drained && h.failures >= DRAIN_AFTER) {
            let pause = h.pause;
            h.drained_until = Some(Instant::now() + pause);
            h.pause = (pause * 2).min(MAX_PAUSE);
            if !drained {
                h.drains += 1;
                tracing::warn!(
                    replica = %self.name,
                    pause_secs = pause.as_secs_f64(),
                    "replica drained: its calls go to the others until a probe succeeds"
                );
            }
        }
    }
}

/// The affinity key of a request: its conversation, without system messages (the second
/// call of an example differs from the first in its system message).
fn affinity_key(request: &CompletionRequest) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in request.messages.iter().filter(|m| m.role != Role::System) {
        m.role.as_str().hash(&mut h);
        m.content.hash(&mut h);
    }
    h.finish()
}

/// SplitMix64's finaliser: spreads a key over the 64 bits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl fmt::Debug for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("Replicas")
            .field("replicas", &names)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LlmBackend for Replicas {
    /// Sends the call to its replica (see the [module docs](self)).
    ///
    /// # Errors
    ///
    /// The replica's error; a [`Fatal`](BackendErrorKind::Fatal) one when there is no replica.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the call; a probe dropped so leaves the replica drained
    /// until the next call probes it.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        if self.replicas.is_empty() {
            return Err(BackendError::stops_run("no replica to send the call to"));
        }
        let (i, probe) = self.pick(affinity_key(&request));
        let replica = &self.replicas[i];
        // Frees the probe slot once the answer is learnt from, or if the call is dropped.
        let _probe = ProbeGuard {
            replica,
            armed: probe,
        };
        let result = replica.backend.complete(request).await;
        replica.record(&result, probe);
        result
    }

    fn name(&self) -> Cow<'_, str> {
        self.replicas
            .first()
            .map_or(Cow::Borrowed("replicas"), |r| r.backend.name())
    }

    fn model(&self) -> Cow<'_, str> {
        self.replicas
            .first()
            .map_or(Cow::Borrowed(""), |r| r.backend.model())
    }

    /// The first replica's identity: the replicas serve one model, so an answer cached from
    /// one stands for all (the cache keys do not change with the number of replicas).
    fn identity(&self) -> Cow<'_, str> {
        self.replicas
            .first()
            .map_or(Cow::Borrowed("replicas"), |r| r.backend.identity())
    }
}

/// Frees the probe slot of a probe when the call ends, answered or dropped.
struct ProbeGuard<'a> {
    replica: &'a Replica,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.replica.health).probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Message;

    #[derive(Debug)]
    struct Echo;

    #[async_trait]
    impl LlmBackend for Echo {
        async fn complete(&self, _: CompletionRequest) -> Result<Completion, BackendError> {
            Ok(Completion::new("echo"))
        }
    }

    #[test]
    fn both_calls_of_an_example_share_a_key() {
        let first = CompletionRequest::new(vec![Message::user("Why is the sky blue?")]);
        let second = CompletionRequest::new(vec![
            Message::system("Answer worse than this reference: ..."),
            Message::user("Why is the sky blue?"),
        ]);
        assert_eq!(affinity_key(&first), affinity_key(&second));
        let other = CompletionRequest::new(vec![Message::user("Why is grass green?")]);
        assert_ne!(affinity_key(&first), affinity_key(&other));
    }

    #[test]
    fn keys_spread_evenly_and_a_lost_replica_moves_only_its_own() {
        let config = AdaptiveConfig::new(std::num::NonZeroUsize::new(4).unwrap());
        let three = Replicas::new(config.clone())
            .replica("a", Echo)
            .replica("b", Echo)
            .replica("c", Echo);
        let mut counts = [0usize; 3];
        for k in 0..30_000u64 {
            let order = three.order(mix(k));
            counts[order[0]] += 1;
            // Without its first choice, a key goes to its second: the others keep theirs.
            let two: Vec<usize> = order.iter().copied().filter(|&i| i != 2).collect();
            if order[0] != 2 {
                assert_eq!(two[0], order[0]);
            }
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
