//! A quality report on a preference dataset, and an optional check of its labels by an LLM
//! judge.
//!
//! [`Report`] reads examples (a JSONL file written by [`ExampleWriter`](crate::ExampleWriter)
//! in either format, or examples in memory) and, optionally, a failure ledger, and measures
//! what tends to go wrong with synthetic preference data:
//!
//! - **counts**: examples, duplicate ids, the methods seen (`metadata.method`);
//! - **label balance**: better vs worse (a skewed split teaches a reward model a shortcut; for
//!   the baselines see [what `label` means](crate::methods#what-label-means-for-a-baseline));
//! - **length bias**: mean length of chosen and rejected responses in characters, their ratio
//!   (mean chosen / mean rejected), and the share of pairs whose chosen response is strictly
//!   longer (near 50% is unbiased);
//! - **near-identical pairs**: pairs whose responses have a token Jaccard similarity of at
//!   least [`NEAR_IDENTICAL_JACCARD`] (0.9): such pairs teach little and are often noise.
//!   Tokens are maximal runs of alphanumeric characters, lowercased; the similarity is
//!   |common tokens| / |all tokens| over the two token *sets* (two empty responses count 1.0);
//! - **diversity**: distinct-1 and distinct-2, the number of distinct token unigrams
//!   (bigrams, within a response) over their total number, over all chosen and rejected
//!   responses;
//! - **aspects**: how often each aspect name appears;
//! - **cost**: mean backend calls per example and total tokens (`metadata.usage.total`);
//! - **failures** (with a ledger): the ids that failed and never made it into the dataset,
//!   by kind, and the failure rate = those ids / (distinct dataset ids + those ids).
//!
//! A failure ledger is a JSONL file with at least `id` and `kind` on each line (other fields,
//! such as `message`, are ignored). An id that failed and later succeeded (on resume) counts as
//! recovered, not failed; the kind counted is the one on the id's last ledger line.
//!
//! The report prints as text ([`Display`](std::fmt::Display)) and serialises to JSON
//! ([`serde::Serialize`]); ratios are `null` in JSON when there is nothing to divide by.
//!
//! ```
//! use rmboost::report::Report;
//! use rmboost::{Label, Message, PreferenceExample};
//!
//! let ex = |id: &str, chosen: &str, rejected: &str, label| PreferenceExample {
//!     id: id.into(),
//!     prompt: vec![Message::user("q")],
//!     chosen: chosen.into(),
//!     rejected: rejected.into(),
//!     label,
//!     grade: None,
//!     aspects: vec!["clarity".into()],
//!     margin: None,
//!     metadata: Default::default(),
//! };
//! let data = [
//!     ex("1", "a long and careful answer", "short", Label::Better),
//!     ex("2", "same words here", "Same words, here!", Label::Worse),
//! ];
//! let report = Report::from_examples(&data);
//! assert_eq!(report.examples, 2);
//! assert_eq!(report.labels.better_share, Some(0.5));
//! assert_eq!(report.near_identical.pairs, 1);
//! assert_eq!(report.aspects["clarity"], 2);
//! println!("{report}");
//! let json = serde_json::to_value(&report).unwrap();
//! assert_eq!(json["length"]["chosen_longer_share"], 0.5);
//! ```
//!
//! [`JudgeCheck`] samples K examples and asks an LLM judge which response is better, in both
//! orders (exactly 2K calls), to estimate how often the constructed labels disagree with it.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::aspect::AspectSet;
use crate::checks::similarity;
use crate::engine::example_rng;
use crate::error::{Error, ErrorKind};
use crate::example::PreferenceExample;
use crate::io::line::{JsonlLines, MAX_LINE_BYTES};
use crate::judge::{Judge, Verdict};
use crate::label::Label;

pub use crate::checks::{token_jaccard, NEAR_IDENTICAL_JACCARD};

/// Label counts.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct LabelBalance {
    /// Examples labelled better.
    pub better: u64,
    /// Examples labelled worse.
    pub worse: u64,
    /// better / (better + worse).
    pub better_share: Option<f64>,
}

/// Response lengths, in characters (Unicode scalar values).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct LengthStats {
    /// Mean length of the chosen responses.
    pub mean_chosen_chars: Option<f64>,
    /// Mean length of the rejected responses.
    pub mean_rejected_chars: Option<f64>,
    /// Mean chosen length / mean rejected length.
    pub ratio: Option<f64>,
    /// Share of pairs whose chosen response is strictly longer.
    pub chosen_longer_share: Option<f64>,
    /// Share of pairs whose responses have the same length.
    pub equal_share: Option<f64>,
}

/// Pairs whose responses are nearly the same.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct NearIdentical {
    /// The threshold used ([`NEAR_IDENTICAL_JACCARD`]).
    pub threshold: f64,
    /// Pairs with a token Jaccard similarity at or above it.
    pub pairs: u64,
    /// pairs / examples.
    pub share: Option<f64>,
    /// Mean token Jaccard similarity of all pairs.
    pub mean_jaccard: Option<f64>,
}

/// Lexical diversity of all responses (chosen and rejected).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Diversity {
    /// Responses counted.
    pub responses: u64,
    /// Tokens counted.
    pub tokens: u64,
    /// Distinct unigrams / unigrams.
    pub distinct_1: Option<f64>,
    /// Distinct bigrams / bigrams (within a response).
    pub distinct_2: Option<f64>,
}

/// Cost of the examples, from their metadata.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Cost {
    /// Mean `metadata.calls` per example.
    pub mean_calls: Option<f64>,
    /// Sum of `metadata.usage.total` (prompt + completion tokens).
    pub total_tokens: u64,
}

/// Failures from a ledger.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Failures {
    /// Lines in the ledger.
    pub ledger_lines: u64,
    /// Distinct ids that failed and are not in the dataset.
    pub failed: u64,
    /// Distinct ids that failed at some point but are in the dataset.
    pub recovered: u64,
    /// The failed ids by kind (of their last ledger line).
    pub by_kind: BTreeMap<String, u64>,
    /// failed / (distinct dataset ids + failed).
    pub rate: Option<f64>,
}

/// The quality report of a dataset; see the [module docs](self) for what each part measures.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Report {
    /// Examples read.
    pub examples: u64,
    /// Examples whose id appeared earlier in the dataset.
    pub duplicate_ids: u64,
    /// Examples by `metadata.method` (`"unknown"` when empty).
    pub methods: BTreeMap<String, u64>,
    /// Label balance.
    pub labels: LabelBalance,
    /// Length bias.
    pub length: LengthStats,
    /// Near-identical pairs.
    pub near_identical: NearIdentical,
    /// Lexical diversity.
    pub diversity: Diversity,
    /// How many examples name each aspect.
    pub aspects: BTreeMap<String, u64>,
    /// Examples with no aspect.
    pub examples_without_aspects: u64,
    /// Calls and tokens.
    pub cost: Cost,
    /// Failures, when a ledger was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<Failures>,
}

/// Accumulates a [`Report`] one example (and one ledger line) at a time, so a dataset of any
/// size can be reported in one pass; memory grows with the number of distinct ids and n-grams.
#[derive(Debug, Default)]
pub struct ReportBuilder {
    /// The counts so far; the ratios are filled in by [`finish`](Self::finish).
    report: Report,
    ids: HashSet<String>,
    chosen_chars: u64,
    rejected_chars: u64,
    chosen_longer: u64,
    equal_len: u64,
    jaccard_sum: f64,
    bigrams: u64,
    /// Token hashes (those of [`token_jaccard`]), and pairs of them.
    distinct_unigrams: HashSet<u64>,
    distinct_bigrams: HashSet<(u64, u64)>,
    calls: u64,
    /// The kind of each failed id's last ledger line.
    failed: HashMap<String, String>,
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| num / den)
}

impl ReportBuilder {
    /// An empty builder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn add_response(&mut self, text: &str) {
        let mut prev = None;
        let n = similarity::token_hashes(text, |h| {
            self.distinct_unigrams.insert(h);
            if let Some(p) = prev.replace(h) {
                self.distinct_bigrams.insert((p, h));
            }
        });
        self.report.diversity.responses += 1;
        self.report.diversity.tokens += n as u64;
        self.bigrams += n.saturating_sub(1) as u64;
    }

    /// Adds one example.
    pub fn add(&mut self, example: &PreferenceExample) {
        let r = &mut self.report;
        r.examples += 1;
        r.duplicate_ids += u64::from(!self.ids.insert(example.id.clone()));
        let method = if example.metadata.method.is_empty() {
            "unknown"
        } else {
            &example.metadata.method
        };
        *r.methods.entry(method.to_string()).or_default() += 1;
        match example.label {
            Label::Better => r.labels.better += 1,
            Label::Worse => r.labels.worse += 1,
        }
        let (c, r_len) = (
            example.chosen.chars().count() as u64,
            example.rejected.chars().count() as u64,
        );
        self.chosen_chars += c;
        self.rejected_chars += r_len;
        self.chosen_longer += u64::from(c > r_len);
        self.equal_len += u64::from(c == r_len);
        let j = token_jaccard(&example.chosen, &example.rejected);
        self.jaccard_sum += j;
        r.near_identical.pairs += u64::from(j >= NEAR_IDENTICAL_JACCARD);
        r.examples_without_aspects += u64::from(example.aspects.is_empty());
        for a in &example.aspects {
            *r.aspects.entry(a.clone()).or_default() += 1;
        }
        self.calls += u64::from(example.metadata.calls);
        if let Some(u) = example.metadata.usage.get("total") {
            r.cost.total_tokens = r.cost.total_tokens.saturating_add(u.total());
        }
        self.add_response(&example.chosen);
        self.add_response(&example.rejected);
    }

    /// The report of everything added.
    #[must_use]
    pub fn finish(self) -> Report {
        let mut r = self.report;
        let n = r.examples as f64;
        if let Some(f) = &mut r.failures {
            for (id, kind) in &self.failed {
                if self.ids.contains(id) {
                    f.recovered += 1;
                } else {
                    f.failed += 1;
                    *f.by_kind.entry(kind.clone()).or_default() += 1;
                }
            }
            f.rate = ratio(f.failed as f64, (self.ids.len() as u64 + f.failed) as f64);
        }
        let (better, worse) = (r.labels.better, r.labels.worse);
        r.labels.better_share = ratio(better as f64, (better + worse) as f64);
        let (chosen, rejected) = (self.chosen_chars as f64, self.rejected_chars as f64);
        r.length = LengthStats {
            mean_chosen_chars: ratio(chosen, n),
            mean_rejected_chars: ratio(rejected, n),
            ratio: ratio(chosen, rejected).filter(|_| n > 0.0),
            chosen_longer_share: ratio(self.chosen_longer as f64, n),
            equal_share: ratio(self.equal_len as f64, n),
        };
        let ni = &mut r.near_identical;
        ni.threshold = NEAR_IDENTICAL_JACCARD;
        ni.share = ratio(ni.pairs as f64, n);
        ni.mean_jaccard = ratio(self.jaccard_sum, n);
        let d = &mut r.diversity;
        d.distinct_1 = ratio(self.distinct_unigrams.len() as f64, d.tokens as f64);
        d.distinct_2 = ratio(self.distinct_bigrams.len() as f64, self.bigrams as f64);
        r.cost.mean_calls = ratio(self.calls as f64, n);
        r
    }
}

/// Parses each non-blank line of the JSONL file at `path` as a `T` and hands it to `add`,
/// stopping at the first error: [`ErrorKind::Io`] if the file cannot be read,
/// [`ErrorKind::Parse`] naming the file and line (prefixed with `what`) for a line that is not
/// a `T`, not UTF-8, or longer than 64 MiB.
fn read_jsonl<T: DeserializeOwned>(
    path: &Path,
    what: &str,
    mut add: impl FnMut(T),
) -> Result<(), Error> {
    let file = File::open(path).map_err(|source| Error::io(path.to_path_buf(), source))?;
    let mut lines = JsonlLines::new(BufReader::new(file), path.to_path_buf(), MAX_LINE_BYTES);
    while let Some(line) = lines.next_line() {
        let line = line?;
        add(serde_json::from_str(&line.text).map_err(|e| lines.err(format!("{what}: {e}")))?);
        lines.recycle(line);
    }
    Ok(())
}

#[derive(Deserialize)]
struct LedgerLine {
    id: LedgerId,
    kind: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LedgerId {
    Text(String),
    Number(serde_json::Number),
}

impl Report {
    /// The report of examples in memory.
    pub fn from_examples<I>(examples: I) -> Report
    where
        I: IntoIterator,
        I::Item: Borrow<PreferenceExample>,
    {
        let mut b = ReportBuilder::new();
        for e in examples {
            b.add(e.borrow());
        }
        b.finish()
    }

    /// The report of a JSONL dataset.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the file cannot be read; [`ErrorKind::Parse`] naming the file and line at
    /// the first line that is not a preference example.
    pub fn from_jsonl(path: impl AsRef<Path>) -> Result<Report, Error> {
        Self::read(path.as_ref(), None)
    }

    /// The report of a JSONL dataset and its failure ledger.
    ///
    /// # Errors
    ///
    /// As [`from_jsonl`](Self::from_jsonl), for either file; a ledger line needs a string or
    /// integer `id` and a string `kind`.
    pub fn from_jsonl_with_ledger(
        path: impl AsRef<Path>,
        ledger: impl AsRef<Path>,
    ) -> Result<Report, Error> {
        Self::read(path.as_ref(), Some(ledger.as_ref()))
    }

    fn read(path: &Path, ledger: Option<&Path>) -> Result<Report, Error> {
        let mut b = ReportBuilder::new();
        read_jsonl(path, "not a preference example", |e| b.add(&e))?;
        if let Some(ledger) = ledger {
            b.read_ledger(ledger)?;
        }
        Ok(b.finish())
    }
}

impl ReportBuilder {
    /// Adds every line of a failure-ledger file, and marks that a ledger was read, so the
    /// report has a failure section even if it is empty.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the file cannot be read; [`ErrorKind::Parse`] naming the file
    /// and line of a line without a string or integer `id` and a string `kind`.
    pub fn read_ledger(&mut self, ledger: impl AsRef<Path>) -> Result<(), Error> {
        let failures = self.report.failures.get_or_insert_with(Failures::default);
        let what = "not a failure-ledger line (needs `id` and `kind`)";
        read_jsonl(ledger.as_ref(), what, |line: LedgerLine| {
            failures.ledger_lines += 1;
            let id = match line.id {
                LedgerId::Text(s) => s,
                LedgerId::Number(n) => n.to_string(),
            };
            self.failed.insert(id, line.kind);
        })
    }
}

/// `0.123` → `12.3%`; `n/a` for none.
pub(crate) fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{:.1}%", x * 100.0))
}

/// `x` with `digits` decimals; `n/a` for none.
pub(crate) fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.digits$}"))
}

/// `a 3, b 1`: the counts, largest first; `none` for none.
pub(crate) fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    // A stable sort of the map's entries (in key order): ties stay in key order.
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    let v: Vec<_> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
    v.join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (b, l, ni, d) = (
            &self.labels,
            &self.length,
            &self.near_identical,
            &self.diversity,
        );
        let without = match self.examples_without_aspects {
            0 => String::new(),
            n => format!("; {n} examples without"),
        };
        write!(
            f,
            "examples:        {} ({} duplicate ids); methods: {}\n\
             labels:          better {}, worse {} ({} better)\n\
             length (chars):  chosen {} vs rejected {} on average, ratio {}; chosen longer in {} of pairs, equal in {}\n\
             near-identical:  {} pairs ({}) with token Jaccard >= {}; mean Jaccard {}\n\
             diversity:       distinct-1 {}, distinct-2 {} over {} responses ({} tokens)\n\
             aspects:         {}{without}\n\
             cost:            {} calls per example, {} tokens",
            self.examples,
            self.duplicate_ids,
            counts(&self.methods),
            b.better,
            b.worse,
            pct(b.better_share),
            num(l.mean_chosen_chars, 1),
            num(l.mean_rejected_chars, 1),
            num(l.ratio, 3),
            pct(l.chosen_longer_share),
            pct(l.equal_share),
            ni.pairs,
            pct(ni.share),
            ni.threshold,
            num(ni.mean_jaccard, 3),
            num(d.distinct_1, 3),
            num(d.distinct_2, 3),
            d.responses,
            d.tokens,
            counts(&self.aspects),
            num(self.cost.mean_calls, 2),
            self.cost.total_tokens
        )?;
        if let Some(fl) = &self.failures {
            write!(
                f,
                "\nfailures:        {} ids failed ({} of prompts), {} recovered, {} ledger lines",
                fl.failed,
                pct(fl.rate),
                fl.recovered,
                fl.ledger_lines
            )?;
            if !fl.by_kind.is_empty() {
                write!(f, ": {}", counts(&fl.by_kind))?;
            }
        }
        Ok(())
    }
}

/// What [`JudgeCheck`] found.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct JudgeAgreement {
    /// Examples judged.
    pub sampled: u64,
    /// Judge calls made (2 per example).
    pub calls: u64,
    /// Both judgements preferred the chosen response.
    pub agree: u64,
    /// Both judgements preferred the rejected response.
    pub disagree: u64,
    /// The judgements contradicted each other or one was a tie.
    pub inconsistent: u64,
    /// A judgement had no readable verdict.
    pub unreadable: u64,
    /// A judge call failed (a non-fatal backend error).
    pub failed: u64,
    /// agree / (agree + disagree).
    pub agreement: Option<f64>,
    /// disagree / (agree + disagree): the estimated share of wrong labels, if the judge is
    /// right whenever it is consistent.
    pub label_noise: Option<f64>,
    /// The ids of the examples the judge disagreed with, to inspect.
    pub disagreeing_ids: Vec<String>,
}

impl fmt::Display for JudgeAgreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "judge check:     {} examples, {} calls: agree {}, disagree {}, inconsistent {}, unreadable {}, failed {}; agreement {}, estimated label noise {}",
            self.sampled,
            self.calls,
            self.agree,
            self.disagree,
            self.inconsistent,
            self.unreadable,
            self.failed,
            pct(self.agreement),
            pct(self.label_noise)
        )
    }
}

/// Checks a dataset's labels against an LLM judge: samples K examples (seeded) and asks the
/// judge which response is better in both orders, (chosen, rejected) then (rejected, chosen).
///
/// Costs exactly 2K calls: the judge is not re-asked, an answer without a verdict is counted as
/// unreadable. Consistent verdicts count as agreement or disagreement with the label;
/// contradicting verdicts and ties are counted apart as inconsistent. The label-noise estimate
/// takes the judge as right whenever it is consistent, so a weak judge inflates it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rmboost::Error> {
/// use rmboost::report::JudgeCheck;
/// use rmboost::testing::ScriptedBackend;
/// use rmboost::{Completion, Label, Message, PreferenceExample};
///
/// // A judge that prefers the longer answer, whichever position it is in.
/// let judge = ScriptedBackend::from_fn(|req| {
///     let t = &req.messages[1].content;
///     let part = |open: &str, close: &str| t[t.find(open).unwrap()..t.find(close).unwrap()].len();
///     let a_longer = part("<answer_a>", "</answer_a>") > part("<answer_b>", "</answer_b>");
///     Ok(Completion::new(if a_longer { "<verdict>A</verdict>" } else { "<verdict>B</verdict>" }))
/// });
/// let ex = |id: &str, chosen: &str, rejected: &str| PreferenceExample {
///     id: id.into(),
///     prompt: vec![Message::user("q")],
///     chosen: chosen.into(),
///     rejected: rejected.into(),
///     label: Label::Better,
///     grade: None,
///     aspects: vec![],
///     margin: None,
///     metadata: Default::default(),
/// };
/// let data = vec![ex("1", "a full answer", "short"), ex("2", "no", "a longer one")];
/// let result = JudgeCheck::new(judge.clone()).k(2).run(&data).await?;
/// assert_eq!((result.agree, result.disagree, result.calls), (1, 1, 4));
/// assert_eq!(result.label_noise, Some(0.5));
/// assert_eq!(judge.calls(), 4);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct JudgeCheck {
    judge: Judge,
    k: usize,
    seed: u64,
    concurrency: NonZeroUsize,
    criteria: Arc<dyn AspectSet>,
}

impl JudgeCheck {
    /// A check with a default [`Judge`] on `backend`, K = 100, seed 0, concurrency 8, and all
    /// of [`Aspects::general`](crate::Aspects::general) as criteria.
    pub fn new(backend: impl crate::LlmBackend + 'static) -> Self {
        Self::with_judge(Judge::new(backend))
    }

    /// A check with this judge (its re-ask setting is ignored: the check never re-asks).
    pub fn with_judge(judge: Judge) -> Self {
        JudgeCheck {
            judge: judge.max_reasks(0),
            k: 100,
            seed: 0,
            concurrency: NonZeroUsize::new(8).expect("8 is not zero"),
            criteria: Arc::new(crate::judge::default_criteria()),
        }
    }

    setters! {
        /// How many examples to judge (all of them if there are fewer). Default: 100.
        k(k: usize) => k = k;
        /// The seed of the sample and of the judge calls. Default: 0.
        seed(seed: u64) => seed = seed;
        /// How many examples are judged at once. Default: 8.
        concurrency(concurrency: NonZeroUsize) => concurrency = concurrency;
        /// The criteria shown to the judge. Default: all of the general aspects.
        criteria(criteria: impl AspectSet + 'static) => criteria = Arc::new(criteria);
    }

    /// The indices of the examples a dataset of `len` examples would be checked on, sorted.
    #[must_use]
    pub fn sample_indices(&self, len: usize) -> Vec<usize> {
        let mut rng = example_rng(self.seed, "rmboost/judge-check");
        let mut idx = rand::seq::index::sample(&mut rng, len, self.k.min(len)).into_vec();
        idx.sort_unstable();
        idx
    }

    /// Judges the sample of `examples`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the judge's sampling settings are invalid; the first fatal
    /// [`ErrorKind::Backend`] (a bad key, no quota, no such model), which stops the check.
    /// Non-fatal call failures are counted in [`JudgeAgreement::failed`].
    pub async fn run(&self, examples: &[PreferenceExample]) -> Result<JudgeAgreement, Error> {
        self.judge.validate("judge params")?;
        let picked = self.sample_indices(examples.len());
        let mut out = JudgeAgreement {
            sampled: picked.len() as u64,
            calls: 2 * picked.len() as u64,
            ..JudgeAgreement::default()
        };
        let mut results = stream::iter(picked.into_iter().map(|i| self.check_one(&examples[i])))
            .buffered(self.concurrency.get());
        while let Some(judged) = results.next().await {
            let (id, verdicts) = judged?;
            match verdicts {
                [Err(false), _] | [_, Err(false)] => out.failed += 1,
                [Err(true), _] | [_, Err(true)] => out.unreadable += 1,
                [Ok(Verdict::A), Ok(Verdict::B)] => out.agree += 1,
                [Ok(Verdict::B), Ok(Verdict::A)] => {
                    out.disagree += 1;
                    out.disagreeing_ids.push(id.to_string());
                }
                _ => out.inconsistent += 1,
            }
        }
        let decided = (out.agree + out.disagree) as f64;
        out.agreement = ratio(out.agree as f64, decided);
        out.label_noise = ratio(out.disagree as f64, decided);
        Ok(out)
    }

    /// The two judgements of `ex`, (chosen, rejected) then (rejected, chosen): each its
    /// verdict, or whether it was unreadable (else it failed).
    async fn check_one<'e>(
        &self,
        ex: &'e PreferenceExample,
    ) -> Result<(&'e str, [Result<Verdict, bool>; 2]), Error> {
        // Draws first: the criteria and both judge seeds.
        let mut rng = example_rng(self.seed, &ex.id);
        let seeds = [rng.next_u64(), rng.next_u64()];
        let criteria = self.criteria.sample(&mut rng).aspects;
        let (c, r) = (&ex.chosen, &ex.rejected);
        let mut verdicts = [Err(false), Err(false)];
        for (v, (a, b, seed)) in verdicts
            .iter_mut()
            .zip([(c, r, seeds[0]), (r, c, seeds[1])])
        {
            let judged = self
                .judge
                .compare(&ex.id, "judge", &ex.prompt, a, b, &criteria, seed);
            *v = match judged.await {
                Ok(v) => Ok(v.value),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => Err(e.kind() == ErrorKind::Unusable),
            };
        }
        Ok((&ex.id, verdicts))
    }
}
