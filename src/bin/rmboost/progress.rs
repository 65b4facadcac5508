//! Progress on stderr (a bar on a terminal, periodic lines otherwise) and the tracing
//! subscriber, whose lines go through the bar so the two never interleave.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// The bar on screen, if any; log lines and notices are printed through it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Writes to stderr, hiding the bar for the moment of the write.
struct ThroughBar;

impl Write for ThroughBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the tracing subscriber: `RUST_LOG` (default `warn`) to stderr.
pub(crate) fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| ThroughBar)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Prints one line on stderr without tearing the bar.
pub(crate) fn notice(line: &str) {
    let _ = ThroughBar.write_all(format!("{line}\n").as_bytes());
}

/// One sample of a run's counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tick {
    /// Examples written plus failed in this run.
    pub(crate) processed: u64,
    pub(crate) failed: u64,
    pub(crate) skipped: u64,
    pub(crate) retries: u64,
    pub(crate) tokens: u64,
    pub(crate) cost: Option<f64>,
    pub(crate) elapsed: Duration,
    /// The adaptive limit on calls in flight, its cap and the share of calls answered 429.
    pub(crate) limit: Option<(usize, usize, f64)>,
    /// Batch mode: batches created, waves sent, batches in flight.
    pub(crate) batch: Option<(u64, u64, u64)>,
}

impl Tick {
    /// "3.1 ex/s, 2 failed, 0 retries, 12.3k tokens, $0.0123, ETA 1m 05s"
    fn details(&self, total: Option<u64>) -> String {
        let rate = self.processed as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let left = total.filter(|_| rate > 0.0 && self.processed > 0);
        let eta =
            left.map(|t| Duration::from_secs_f64(t.saturating_sub(self.processed) as f64 / rate));
        let rate = if rate >= 1.0 || rate == 0.0 {
            format!("{rate:.1} ex/s")
        } else {
            format!("{:.1} ex/min", rate * 60.0)
        };
        let (failed, retries, tokens) = (self.failed, self.retries, human_count(self.tokens));
        let parts = [
            Some(format!(
                "{rate}, {failed} failed, {retries} retries, {tokens} tokens"
            )),
            (self.skipped > 0).then(|| format!("{} already done", self.skipped)),
            self.limit.map(|(limit, cap, share)| {
                format!("limit {limit}/{cap}, {:.1}% 429s", 100.0 * share)
            }),
            self.batch.map(|(created, waves, flying)| {
                format!("{created} batches in {waves} waves, {flying} running")
            }),
            self.cost.map(|c| format!("${c:.4}")),
            eta.map(|eta| format!("ETA {}", human_duration(eta))),
        ];
        parts.into_iter().flatten().collect::<Vec<_>>().join(", ")
    }
}

/// `12345` → `12.3k`.
pub(crate) fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

/// `65 s` → `1m 05s`.
pub(crate) fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// How progress is shown.
pub(crate) enum Display {
    Bar(ProgressBar),
    /// A line every 5 s when something changed, and at least once a minute.
    Lines {
        last: Duration,
        shown: Option<(u64, u64)>,
    },
    Off,
}

impl Display {
    /// A bar when `tty`, periodic lines otherwise; `total` is the expected number of examples
    /// this run generates, if known.
    pub(crate) fn new(kind: crate::args::ProgressKind, total: Option<u64>) -> Self {
        use crate::args::ProgressKind;
        let tty = std::io::stderr().is_terminal();
        match kind {
            ProgressKind::Off => Display::Off,
            ProgressKind::Auto if tty => {
                let template = match total {
                    Some(_) => "{spinner} {elapsed_precise} [{bar:24}] {pos}/{len} {wide_msg}",
                    None => "{spinner} [{elapsed_precise}] {pos} {msg}",
                };
                let style = ProgressStyle::with_template(template).expect("valid template");
                let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr())
                    .with_style(style.progress_chars("=> "));
                bar.enable_steady_tick(Duration::from_millis(200));
                *BAR.lock().unwrap_or_else(PoisonError::into_inner) = Some(bar.clone());
                Display::Bar(bar)
            }
            ProgressKind::Auto | ProgressKind::Log => Display::Lines {
                last: Duration::ZERO,
                shown: None,
            },
        }
    }

    /// Shows `tick`.
    pub(crate) fn update(&mut self, tick: &Tick, total: Option<u64>) {
        match self {
            Display::Bar(bar) => {
                if let Some(t) = total {
                    bar.set_length(t.max(tick.processed));
                }
                bar.set_position(tick.processed);
                bar.set_message(tick.details(total));
            }
            Display::Lines { last, shown } => {
                let state = Some((tick.processed, tick.tokens));
                let due = tick.elapsed >= *last + Duration::from_secs(5);
                let heartbeat = tick.elapsed >= *last + Duration::from_secs(60);
                if (due && state != *shown) || heartbeat {
                    *last = tick.elapsed;
                    *shown = state;
                    notice(&progress_line(tick, total));
                }
            }
            Display::Off => {}
        }
    }

    /// Removes the bar (before the summary is printed).
    pub(crate) fn finish(&mut self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
            *BAR.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

fn progress_line(tick: &Tick, total: Option<u64>) -> String {
    match total {
        Some(t) if t > 0 => format!(
            "rmboost: {}/{} ({:.0}%), {}",
            tick.processed,
            t,
            100.0 * tick.processed.min(t) as f64 / t as f64,
            tick.details(total)
        ),
        _ => format!("rmboost: {} done, {}", tick.processed, tick.details(total)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_formats() {
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(12_345), "12.3k");
        assert_eq!(human_count(2_500_000), "2.50M");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 05s");
        assert_eq!(human_duration(Duration::from_secs(7300)), "2h 01m");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn line_has_counts_and_eta() {
        let tick = Tick {
            processed: 10,
            failed: 1,
            skipped: 0,
            retries: 2,
            tokens: 20_000,
            cost: Some(0.5),
            elapsed: Duration::from_secs(5),
            limit: None,
            batch: None,
        };
        let slow = Tick {
            processed: 1,
            elapsed: Duration::from_secs(30),
            ..Tick::default()
        };
        assert!(progress_line(&slow, None).contains("2.0 ex/min"));
        let line = progress_line(&tick, Some(20));
        assert_eq!(
            line,
            "rmboost: 10/20 (50%), 2.0 ex/s, 1 failed, 2 retries, 20.0k tokens, $0.5000, ETA 5.0s"
        );
        let adapted = Tick {
            limit: Some((24, 256, 0.0213)),
            batch: None,
            ..tick
        };
        assert!(
            progress_line(&adapted, Some(20)).contains(", limit 24/256, 2.1% 429s,"),
            "{}",
            progress_line(&adapted, Some(20))
        );
    }
}
