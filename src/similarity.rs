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
//! are deterministic. [`token_jaccard`] (the report's) is exact up to 64-bit hash collisions.
//! [`text_stats`] (the response checks', on the hot path of every example) *estimates* both
//! figures with bitmaps and linear counting: each token or trigram sets one bit of a bitmap
//! with at least 16 bits per possible token, and a set's size is read from the share of bits
//! left unset. That is several times faster than hash sets (the checks must fit in the
//! generator's budget of a few microseconds per example) and stays within about 0.01 of the
//! exact figures for answers of ordinary length. Scratch space lives in a per-thread buffer:
//! after the first call no allocation happens for texts of a size seen before.

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

/// For each byte: its lowercase form if it is an ASCII letter or digit, else 0.
const TOKEN_BYTE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = c.to_ascii_lowercase();
        }
        b += 1;
    }
    t
};

/// A 64-bit finaliser (the one of MurmurHash3): every input bit affects every output bit.
fn fmix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// [`for_each_token`] for the hot path: the same tokens, hashed differently (so its hashes
/// are not comparable with `for_each_token`'s). ASCII text is read in one pass without a
/// lowercased copy, 8 bytes of a token folded into the hash at a time; other text goes
/// through `for_each_token`.
fn for_each_token_fast(text: &str, buf: &mut String, mut f: impl FnMut(u64)) -> usize {
    for_each_token_until(text, buf, |h| {
        f(h);
        true
    })
}

/// [`for_each_token_fast`] that stops when `f` returns `false`; returns the tokens seen.
fn for_each_token_until(text: &str, buf: &mut String, mut f: impl FnMut(u64) -> bool) -> usize {
    if !text.is_ascii() {
        let mut go = true;
        return for_each_token(text, buf, |h| {
            if go {
                go = f(h);
            }
        });
    }
    let mut n = 0;
    let (mut h, mut word, mut len) = (0u64, 0u64, 0usize);
    for &b in text.as_bytes() {
        let t = TOKEN_BYTE[b as usize];
        if t != 0 {
            word |= u64::from(t) << ((len % 8) * 8);
            len += 1;
            if len % 8 == 0 {
                h = fmix(h ^ word);
                word = 0;
            }
        } else if len > 0 {
            n += 1;
            if !f(fmix(h ^ word ^ ((len as u64) << 56) ^ 0x9e37_79b9)) {
                return n;
            }
            (h, word, len) = (0, 0, 0);
        }
    }
    if len > 0 {
        f(fmix(h ^ word ^ ((len as u64) << 56) ^ 0x9e37_79b9));
        n += 1;
    }
    n
}

/// The hash of a trigram from its tokens' hashes. Order matters: (x, y, z) and (y, x, z) are
/// different trigrams.
fn trigram(a: u64, b: u64, c: u64) -> u64 {
    fmix(a.rotate_left(43) ^ b.rotate_left(21) ^ c)
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

/// Both statistics of a candidate response, estimated (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TextStats {
    /// Token Jaccard similarity with the reference text; `None` when no reference was given.
    pub jaccard: Option<f64>,
    /// Distinct trigram share; `None` below [`TRIGRAM_MIN_TOKENS`] tokens.
    pub distinct_trigrams: Option<f64>,
}

#[derive(Default)]
struct Bitmaps {
    lower: String,
    a: Vec<u64>,
    b: Vec<u64>,
    grams: Vec<u64>,
}

thread_local! {
    static BITMAPS: RefCell<Bitmaps> = RefCell::new(Bitmaps::default());
}

/// Bits for texts of at most `bytes` bytes: a power of two, at least 16 per possible token
/// (a token and its separator take 2 bytes or more; English prose averages about 6, so about
/// 50 bits per actual token), at least 8192.
fn bitmap_bits(bytes: usize) -> usize {
    (bytes / 2 + 1)
        .saturating_mul(16)
        .max(8192)
        .next_power_of_two()
}

fn reset(map: &mut Vec<u64>, bits: usize) {
    map.clear();
    map.resize(bits / 64, 0);
}

/// Sets the bit of `h` in `map` (of `2^(64 - shift)` bits): Fibonacci hashing, so every bit
/// of the hash matters.
fn set_bit(map: &mut [u64], shift: u32, h: u64) {
    let (word, bit) = bit_of(shift, h);
    map[word] |= bit;
}

/// The word and bit mask of `h` in a bitmap of `2^(64 - shift)` bits.
fn bit_of(shift: u32, h: u64) -> (usize, u64) {
    let i = (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize;
    (i / 64, 1 << (i % 64))
}

/// Linear counting: the number of distinct values that set the bits of `map`.
fn estimate(ones: u32, bits: usize) -> f64 {
    let m = bits as f64;
    let zeros = (bits - ones as usize).max(1) as f64;
    m * (m / zeros).ln()
}

fn ones(map: &[u64]) -> u32 {
    map.iter().map(|w| w.count_ones()).sum()
}

/// The statistics of `text`: its similarity with `reference` when one is given (or, for ASCII
/// texts, an upper bound of it below `max_similarity` when reading part of the reference is
/// enough to show that), and, when `min_share` is given, its distinct trigram share (or a
/// lower bound of it when that is enough to show the share is at least `min_share`).
/// Estimates; see the [module docs](self).
///
/// The bound: every distinct token but the last two starts a trigram of its own, so a text of
/// `n` tokens with `d` distinct ones has at least `d - 2` distinct trigrams among its `n - 2`.
/// Prose has many distinct tokens, so the bound usually settles the question from the token
/// bitmap alone and the trigram pass is skipped; a loop has few, and gets the full count.
pub(crate) fn text_stats(
    text: &str,
    reference: Option<&str>,
    max_similarity: Option<f64>,
    min_share: Option<f64>,
) -> TextStats {
    BITMAPS.with(|s| {
        let s = &mut *s.borrow_mut();
        let bits = bitmap_bits(text.len().max(reference.map_or(0, str::len)));
        let shift = 64 - bits.trailing_zeros();
        let Bitmaps { lower, a, b, grams } = s;
        reset(b, bits);
        let tokens = for_each_token_fast(text, lower, |h| set_bit(b, shift, h));
        let nb = ones(b);
        let distinct_trigrams = match min_share {
            Some(min) if tokens >= TRIGRAM_MIN_TOKENS => {
                let positions = (tokens - 2) as f64;
                // The estimate may be a little high: take 3% and one token off.
                let distinct_tokens = estimate(nb, bits) * 0.97 - 1.0;
                let bound = ((distinct_tokens - 2.0) / positions).clamp(0.0, 1.0);
                if bound >= min {
                    Some(bound)
                } else {
                    reset(grams, bits);
                    let (mut p1, mut p2) = (0u64, 0u64);
                    let mut seen = 0usize;
                    for_each_token_fast(text, lower, |h| {
                        if seen >= 2 {
                            set_bit(grams, shift, trigram(p2, p1, h));
                        }
                        p2 = p1;
                        p1 = h;
                        seen += 1;
                    });
                    Some((estimate(ones(grams), bits) / positions).min(1.0))
                }
            }
            _ => None,
        };
        let jaccard = reference.map(|r| {
            reset(a, bits);
            // Both texts must be hashed the same way, whichever is ASCII.
            let ascii = text.is_ascii() && r.is_ascii();
            if ascii {
                // J <= |B| / (|B| + |A \ B|): once that many distinct reference tokens are
                // known to be outside `text` (their bit is unset there), J is below the limit
                // and the rest of the reference need not be read.
                let d_b = estimate(nb, bits);
                let stop_after = match max_similarity {
                    Some(l) if l > 0.0 && l <= 1.0 => d_b * (1.0 / l - 1.0) * 1.05 + 2.0,
                    _ => f64::INFINITY,
                };
                let mut outside = 0.0f64;
                let mut stopped = false;
                for_each_token_until(r, lower, |h| {
                    let (word, bit) = bit_of(shift, h);
                    if a[word] & bit == 0 {
                        a[word] |= bit;
                        if b[word] & bit == 0 {
                            outside += 1.0;
                            if outside > stop_after {
                                stopped = true;
                                return false;
                            }
                        }
                    }
                    true
                });
                if stopped {
                    return (d_b / (d_b + outside)).clamp(0.0, 1.0);
                }
            } else {
                reset(b, bits);
                for_each_token(text, lower, |h| set_bit(b, shift, h));
                for_each_token(r, lower, |h| set_bit(a, shift, h));
            }
            let (na, nb) = (ones(a), ones(b));
            let union_ones: u32 = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x | y).count_ones())
                .sum();
            if union_ones == 0 {
                return 1.0;
            }
            let union = estimate(union_ones, bits);
            let common = estimate(na, bits) + estimate(nb, bits) - union;
            (common / union).clamp(0.0, 1.0)
        });
        if lower.capacity() > KEEP_BYTES {
            *s = Bitmaps::default();
        }
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
            let est = text_stats(b, Some(a), None, Some(1.0)).jaccard.unwrap();
            assert!((est - want).abs() < 0.01, "{a:?} vs {b:?}: {est}");
        }
    }

    #[test]
    fn trigram_share() {
        let prose = "Bees collect nectar from flowers and carry it back to the hive, where \
                     workers pass it from mouth to mouth, add enzymes, and fan it with their \
                     wings until most of the water has gone.";
        let share = text_stats(prose, None, None, Some(1.0))
            .distinct_trigrams
            .unwrap();
        assert!(share > 0.95, "{share}");
        let looped = "I'm not able to assist you. ".repeat(12);
        let share = text_stats(&looped, None, None, Some(1.0))
            .distinct_trigrams
            .unwrap();
        // 7 tokens ("i", "m", "not", ...) 12 times: 82 trigrams, 7 distinct.
        assert!((share - 7.0 / 82.0).abs() < 0.002, "{share}");
        // Too short to judge.
        assert_eq!(
            text_stats("one two three", None, None, Some(1.0)).distinct_trigrams,
            None
        );
        // Order matters: a permutation of a trigram is another trigram.
        let words: Vec<String> = (0..30).map(|i| format!("w{}", i % 3)).collect();
        let share = text_stats(&words.join(" "), None, None, Some(1.0))
            .distinct_trigrams
            .unwrap();
        assert!((share - 3.0 / 28.0).abs() < 0.002, "{share}");
        assert_eq!(text_stats(prose, None, None, None).distinct_trigrams, None);
        // Enough distinct tokens settle it without the trigram pass: a lower bound at or
        // above the limit, never above the exact share.
        let bound = text_stats(prose, None, None, Some(0.5))
            .distinct_trigrams
            .unwrap();
        assert!((0.5..=1.0).contains(&bound), "{bound}");
        // A loop has too few distinct tokens for the bound: the full count decides.
        let share = text_stats(&looped, None, None, Some(0.5))
            .distinct_trigrams
            .unwrap();
        assert!((share - 7.0 / 82.0).abs() < 0.002, "{share}");
    }

    /// Words from a vocabulary of `vocab`, picked by a seeded generator.
    fn words(n: usize, vocab: u64, seed: u64) -> String {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("w{}", x % vocab)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn estimates_stay_close_on_long_texts() {
        for (n, vocab, seed) in [
            (200, 150, 1),
            (1000, 400, 2),
            (5000, 3000, 3),
            (60, 1000, 4),
        ] {
            let a = words(n, vocab, seed);
            let b = format!("{} {}", words(n / 10, vocab, seed + 10), &a[a.len() / 10..]);
            let exact = token_jaccard(&a, &b);
            let est = text_stats(&b, Some(&a), None, None).jaccard.unwrap();
            assert!((est - exact).abs() < 0.015, "n={n}: {est} vs {exact}");
        }
    }

    proptest::proptest! {
        #[test]
        fn jaccard_agrees_with_the_model(a in "[a-cA-C ,.é]{0,40}", b in "[a-cA-C ,.é]{0,40}") {
            let want = jaccard_model(&a, &b);
            proptest::prop_assert_eq!(token_jaccard(&a, &b), want);
        }
    }

    /// With a limit, a dissimilar pair stops early with an upper bound below the limit; a
    /// similar pair is read whole and gets the same estimate as without a limit.
    #[test]
    fn similarity_limit_stops_early_only_below_it() {
        for seed in 1..60u64 {
            let a = words(200, 300, seed);
            let far = words(200, 300, seed + 500);
            let near = format!("{} {}", words(5, 300, seed + 900), &a);
            let exact_far = token_jaccard(&a, &far);
            let bounded = text_stats(&far, Some(&a), Some(0.9), None).jaccard.unwrap();
            assert!(
                bounded < 0.9 && bounded + 0.02 >= exact_far,
                "{bounded} vs {exact_far}"
            );
            let full = text_stats(&near, Some(&a), None, None).jaccard.unwrap();
            let limited = text_stats(&near, Some(&a), Some(0.9), None)
                .jaccard
                .unwrap();
            assert_eq!(full, limited);
            assert!(limited >= 0.9, "{limited}");
        }
    }

    /// The estimate over many short and long pairs: close on average, never far off.
    #[test]
    fn estimate_error_is_small() {
        let (mut sum, mut worst, mut n) = (0.0f64, 0.0f64, 0);
        for seed in 1..400u64 {
            let len = 3 + (seed as usize * 7) % 300;
            let vocab = 5 + seed % 400;
            let a = words(len, vocab, seed);
            let b = words(len, vocab, seed + 1000);
            let exact = token_jaccard(&a, &b);
            let est = text_stats(&b, Some(&a), None, None).jaccard.unwrap();
            let err = (est - exact).abs();
            sum += err;
            worst = worst.max(err);
            n += 1;
        }
        let mean = sum / f64::from(n);
        assert!(mean < 0.005 && worst < 0.05, "mean {mean}, worst {worst}");
    }
}
