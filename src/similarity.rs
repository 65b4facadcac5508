//! Text statistics shared by the response checks ([`crate::template::ResponseChecks`]) and the
//! dataset report ([`crate::report`]), so that both judge a pair the same way.
//!
//! - **Tokens**: the text is lowercased character by character and split into maximal runs of
//!   alphanumeric characters ("Don't stop!" gives `don`, `t`, `stop`).
//! - **Token Jaccard similarity**: size of the intersection of the two texts' token *sets* over
//!   the size of their union; 1.0 when both have no token.
//! - **Distinct trigram share**: among the word trigrams of a text (3 consecutive tokens), the
//!   share that are distinct. Prose is near 1.0; a model stuck in a loop ("I'm not able to
//!   assist you. I'm not able to assist you. ...") falls far below.
//!
//! Tokens and trigrams are compared by a 64-bit hash with a fixed seed (foldhash), so results
//! are deterministic; two different tokens would have to collide in 64 bits to be counted as
//! one. Scratch sets live in a per-thread buffer: after the first call no allocation happens
//! for texts of a size seen before.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Trigram statistics are only meaningful for texts of at least this many tokens.
pub(crate) const TRIGRAM_MIN_TOKENS: usize = 20;

/// A value that is already a good 64-bit hash goes through unchanged.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashSet64 = HashSet<u64, BuildHasherDefault<PassThrough>>;

#[derive(Default)]
struct Scratch {
    lower: String,
    a: HashSet64,
    b: HashSet64,
    grams: HashSet64,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Larger scratch buffers than this are dropped after use rather than kept for the thread.
const KEEP_BYTES: usize = 1 << 20;

fn hasher() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::with_seed(0x726d_626f_6f73_7431)
}

/// Lowercases `text` into `buf` (character by character).
fn lower_into(text: &str, buf: &mut String) {
    buf.clear();
    if text.is_ascii() {
        buf.push_str(text);
        buf.make_ascii_lowercase();
    } else {
        buf.extend(text.chars().flat_map(char::to_lowercase));
    }
}

/// Calls `f` with the hash of every token of `text`, in order; returns the token count.
fn for_each_token(text: &str, buf: &mut String, mut f: impl FnMut(u64)) -> usize {
    lower_into(text, buf);
    let state = hasher();
    let mut n = 0;
    if buf.is_ascii() {
        for t in buf
            .as_bytes()
            .split(|b| !b.is_ascii_alphanumeric())
            .filter(|t| !t.is_empty())
        {
            f(state.hash_one(t));
            n += 1;
        }
    } else {
        for t in buf
            .split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
        {
            f(state.hash_one(t.as_bytes()));
            n += 1;
        }
    }
    n
}

fn mix(a: u64, b: u64) -> u64 {
    // Order matters: (x, y, z) and (y, x, z) are different trigrams.
    hasher().hash_one((a, b))
}

/// Fills `set` with the token hashes of `text`.
fn token_set(text: &str, buf: &mut String, set: &mut HashSet64) {
    set.clear();
    for_each_token(text, buf, |h| {
        set.insert(h);
    });
}

fn jaccard_of(a: &HashSet64, b: &HashSet64) -> f64 {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let common = small.iter().filter(|h| large.contains(h)).count();
    let union = a.len() + b.len() - common;
    if union == 0 {
        1.0
    } else {
        common as f64 / union as f64
    }
}

fn trim(s: &mut Scratch) {
    if s.lower.capacity() > KEEP_BYTES {
        *s = Scratch::default();
    }
}

/// The token Jaccard similarity of two texts (see the [module docs](self)).
pub(crate) fn token_jaccard(a: &str, b: &str) -> f64 {
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        token_set(a, &mut s.lower, &mut s.a);
        token_set(b, &mut s.lower, &mut s.b);
        let j = jaccard_of(&s.a, &s.b);
        trim(s);
        j
    })
}

/// Both statistics of a candidate response in one pass over it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TextStats {
    /// Token Jaccard similarity with the reference text; `None` when no reference was given.
    pub jaccard: Option<f64>,
    /// Distinct trigram share; `None` below [`TRIGRAM_MIN_TOKENS`] tokens.
    pub distinct_trigrams: Option<f64>,
}

/// The statistics of `text`: its similarity with `reference` when one is given, its distinct
/// trigram share when `want_trigrams`.
pub(crate) fn text_stats(text: &str, reference: Option<&str>, want_trigrams: bool) -> TextStats {
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        s.b.clear();
        s.grams.clear();
        let (mut p1, mut p2) = (0u64, 0u64);
        let mut seen = 0usize;
        let want_set = reference.is_some();
        let Scratch {
            lower, b, grams, ..
        } = s;
        let tokens = for_each_token(text, lower, |h| {
            if want_set {
                b.insert(h);
            }
            if want_trigrams {
                if seen >= 2 {
                    grams.insert(mix(mix(p2, p1), h));
                }
                p2 = p1;
                p1 = h;
                seen += 1;
            }
        });
        let distinct_trigrams = (want_trigrams && tokens >= TRIGRAM_MIN_TOKENS)
            .then(|| s.grams.len() as f64 / (tokens - 2) as f64);
        let jaccard = reference.map(|r| {
            token_set(r, &mut s.lower, &mut s.a);
            jaccard_of(&s.a, &s.b)
        });
        trim(s);
        TextStats {
            jaccard,
            distinct_trigrams,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition, with owned strings and std sets.
    fn jaccard_model(a: &str, b: &str) -> f64 {
        let toks = |t: &str| -> std::collections::HashSet<String> {
            t.chars()
                .flat_map(char::to_lowercase)
                .collect::<String>()
                .split(|c: char| !c.is_alphanumeric())
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        };
        let (a, b) = (toks(a), toks(b));
        let union = a.union(&b).count();
        if union == 0 {
            1.0
        } else {
            a.intersection(&b).count() as f64 / union as f64
        }
    }

    #[test]
    fn jaccard_matches_the_definition() {
        let cases = [
            ("The cat sat.", "the CAT sat", 1.0),
            ("a b", "b c", 1.0 / 3.0),
            ("", "", 1.0),
            ("", "word", 0.0),
            ("Don't stop!", "don t STOP", 1.0),
            ("Ça va? Élan", "ça VA élan", 1.0),
        ];
        for (a, b, want) in cases {
            assert_eq!(token_jaccard(a, b), want, "{a:?} vs {b:?}");
            assert_eq!(jaccard_model(a, b), want);
            let stats = text_stats(b, Some(a), true);
            assert_eq!(stats.jaccard, Some(want));
        }
    }

    #[test]
    fn trigram_share() {
        let prose = "Bees collect nectar from flowers and carry it back to the hive, where \
                     workers pass it from mouth to mouth, add enzymes, and fan it with their \
                     wings until most of the water has gone.";
        let share = text_stats(prose, None, true).distinct_trigrams.unwrap();
        assert_eq!(share, 1.0);
        let looped = "I'm not able to assist you. ".repeat(12);
        let share = text_stats(&looped, None, true).distinct_trigrams.unwrap();
        // 7 tokens ("i", "m", "not", ...) 12 times: 82 trigrams, 7 distinct.
        assert!((share - 7.0 / 82.0).abs() < 1e-12, "{share}");
        // Too short to judge.
        assert_eq!(
            text_stats("one two three", None, true).distinct_trigrams,
            None
        );
        // Order matters: a permutation of a trigram is another trigram.
        let words: Vec<String> = (0..30).map(|i| format!("w{}", i % 3)).collect();
        let share = text_stats(&words.join(" "), None, true)
            .distinct_trigrams
            .unwrap();
        assert!((share - 3.0 / 28.0).abs() < 1e-12, "{share}");
        assert_eq!(text_stats(prose, None, false).distinct_trigrams, None);
    }

    proptest::proptest! {
        #[test]
        fn jaccard_agrees_with_the_model(a in "[a-cA-C ,.é]{0,40}", b in "[a-cA-C ,.é]{0,40}") {
            let want = jaccard_model(&a, &b);
            proptest::prop_assert_eq!(token_jaccard(&a, &b), want);
            proptest::prop_assert_eq!(text_stats(&b, Some(&a), false).jaccard, Some(want));
        }
    }
}
