//! Text statistics of the response checks ([`crate::checks::ResponseChecks`]) and the dataset
//! report ([`crate::report`]), so that both judge a pair the same way.
//!
//! - **Tokens**: the text is lowercased character by character and split into maximal runs of
//!   alphanumeric characters ("Don't stop!" gives `don`, `t`, `stop`).
//! - **Token Jaccard similarity**: size of the intersection of the two texts' token *sets* over
//!   the size of their union; 1.0 when both have no token.
//! - **Distinct trigram share**: among the word trigrams of a text (3 consecutive tokens), the
//!   share that are distinct. Prose is near 1.0; a model stuck in a loop ("I'm not able to
//!   assist you. I'm not able to assist you. ...") falls far below.
//!
//! Tokens and trigrams are compared by 64-bit hashes with fixed seeds, so results are
//! deterministic. [`token_jaccard`], the one similarity measure (the response checks reject a
//! near-identical pair with it and the report counts them with it), is exact up to 64-bit
//! hash collisions: two hash sets, reused per thread. The distinct trigram share (the
//! repetition check, run on every response, [`pair_stats`]) *estimates* its figure with bitmaps and linear
//! counting: each token or trigram sets one bit of a bitmap with at least 16 bits per possible
//! token, and a set's size is read from the share of bits left unset; it stays within about
//! 0.01 of the exact share for answers of ordinary length, and often settles the question from
//! the token count alone. The tokenizer reads ASCII text 8 bytes at a time (SWAR) and hashes
//! each token from whole-word loads (other text goes character by character, with the same
//! hashes). Scratch space lives in a per-thread buffer: after the first call no allocation
//! happens for texts of a size seen before.

use std::cell::RefCell;

/// Trigram statistics are only meaningful for texts of at least this many tokens.
const TRIGRAM_MIN_TOKENS: usize = 20;

type HashSet64 = foldhash::HashSet<u64>;

/// The per-thread scratch space: a lowercased copy of a non-ASCII text, the two token sets of
/// [`token_jaccard`], the two bitmaps of [`pair_stats`].
#[derive(Default)]
struct Scratch {
    lower: String,
    a: HashSet64,
    b: HashSet64,
    tokens: Vec<u64>,
    grams: Vec<u64>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` on this thread's scratch space, which is dropped afterwards if it holds more than
/// about 4 MB (so that one huge text does not pin memory for the thread's life).
fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        let out = f(s);
        let sets = s.a.capacity() + s.b.capacity() + s.tokens.capacity() + s.grams.capacity();
        if s.lower.capacity() + 8 * sets > 4 << 20 {
            *s = Scratch::default();
        }
        out
    })
}

/// `0x01` in every byte.
const ONES: u64 = 0x0101_0101_0101_0101;
/// `0x80` in every byte.
const HIGHS: u64 = ONES * 0x80;
/// `0x20`, the ASCII lowercase bit, in every byte.
const CASE: u64 = ONES * 0x20;

/// Odd constants (digits of pi) for [`fold_mul`].
const MUL: u64 = 0x243f_6a88_85a3_08d3;
const SEED: u64 = 0x1319_8a2e_0370_7344;

/// The folded multiply (as in foldhash): the two halves of the 128-bit product xored, so
/// that every input bit reaches the output in one multiplication.
fn fold_mul(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

fn finish_token(h: u64, word: u64, len: usize) -> u64 {
    fold_mul(h ^ word ^ SEED, MUL ^ len as u64)
}

/// The mask of the low `n` bytes of a word, `n < 8`.
fn low_bytes(n: usize) -> u64 {
    (1u64 << (8 * n)) - 1
}

/// The high bit of each byte of `x` (all bytes ASCII) set where the byte is a letter or digit.
///
/// For a byte `b < 0x80`, `b + (0x80 - c)` has its high bit set exactly when `b >= c`, and
/// never carries into the next byte, so eight range tests run as one addition. Setting the
/// `0x20` bit lowercases letters and leaves digits as they are.
fn alnum_highs(x: u64) -> u64 {
    let at_least = |v: u64, c: u8| v.wrapping_add(ONES * u64::from(0x80 - c)) & HIGHS;
    let lower = x | CASE;
    let letter = at_least(lower, b'a') & !at_least(lower, b'z' + 1);
    let digit = at_least(x, b'0') & !at_least(x, b'9' + 1);
    letter | digit
}

/// The high bits of [`alnum_highs`] gathered into the low 8 bits (byte `i` to bit `i`).
fn gather_highs(m: u64) -> u64 {
    ((m >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// A 64-bit mask of the letters and digits of a block of up to 64 ASCII bytes (bit `i` for
/// byte `i`; bytes past the end count as separators).
fn block_mask(block: &[u8]) -> u64 {
    let mut mask = 0u64;
    if block.len() == 64 {
        for (i, c) in block.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            mask |= gather_highs(alnum_highs(word)) << (8 * i);
        }
    } else {
        let mut padded = [0u8; 64];
        padded[..block.len()].copy_from_slice(block);
        mask = block_mask(&padded);
    }
    mask
}

/// Calls `f` with the hash of every token of `text`, in order; returns the token count. ASCII
/// text is classified 8 bytes at a time and each token is hashed from whole-word loads,
/// without a lowercased copy; other text is lowercased into `buf` character by character and
/// split into maximal runs of alphanumeric characters, with the same hashes.
fn for_each_token_fast(text: &str, buf: &mut String, mut f: impl FnMut(u64)) -> usize {
    let mut n = 0;
    let mut count = |h| {
        n += 1;
        f(h);
        true
    };
    if text.is_ascii() {
        for_each_token_until(text, count);
    } else {
        buf.clear();
        buf.extend(text.chars().flat_map(char::to_lowercase));
        buf.split(|c: char| !c.is_alphanumeric())
            .filter(|t| !t.is_empty())
            .for_each(|t| _ = count(hash_span(t.as_bytes(), 0, t.len(), 0)));
    }
    n
}

/// Calls `f` with the hash of every token of `text` (those [`token_jaccard`] compares), in
/// order; returns the token count. The dataset report counts distinct n-grams with it.
pub(crate) fn token_hashes(text: &str, f: impl FnMut(u64)) -> usize {
    with_scratch(|s| for_each_token_fast(text, &mut s.lower, f))
}

/// The ASCII tokenizer of [`for_each_token_fast`] (`text` must be ASCII), stopping when `f`
/// returns `false`; returns whether it stopped early.
fn for_each_token_until(text: &str, mut f: impl FnMut(u64) -> bool) -> bool {
    debug_assert!(text.is_ascii());
    let bytes = text.as_bytes();
    let span = |start, end| hash_span(bytes, start, end, CASE);
    // The start of a token that runs on past the block read so far.
    let mut open: Option<usize> = None;
    for (b, block) in bytes.chunks(64).enumerate() {
        let base = b * 64;
        let mut mask = block_mask(block);
        if let Some(start) = open {
            // The token goes on at the start of this block unless bit 0 is a separator.
            let run = (!mask).trailing_zeros() as usize;
            if run == 64 {
                continue;
            }
            open = None;
            if !f(span(start, base + run)) {
                return true;
            }
            // Clears the run of ones at the bottom.
            mask &= mask.wrapping_add(1);
        }
        while mask != 0 {
            let s = mask.trailing_zeros() as usize;
            // The bit just past the lowest run of ones, and every bit of `mask` above it.
            let past = (mask | (mask - 1)).wrapping_add(1);
            let e = past.trailing_zeros() as usize;
            if e == 64 {
                open = Some(base + s);
                break;
            }
            if !f(span(base + s, base + e)) {
                return true;
            }
            mask &= past;
        }
    }
    open.is_some_and(|start| !f(span(start, bytes.len())))
}

/// The hash of the token `bytes[start..end]`: 8 bytes at a time, little-endian, each ored
/// with `case`, each full word folded in by [`fold_mul`], the last partial word (zero-padded)
/// with the length; read with whole-word loads where the text has 8 bytes left. `case`
/// [`CASE`] lowercases an ASCII token of letters and digits in any case; 0 takes an already
/// lowercased token as it is, so both give a lowercase ASCII token the same hash.
#[inline]
fn hash_span(bytes: &[u8], start: usize, end: usize, case: u64) -> u64 {
    let len = end - start;
    // Most tokens: shorter than a word, with a word of text left to load.
    if len < 8 && bytes.len() - start >= 8 {
        let word = u64::from_le_bytes(bytes[start..start + 8].try_into().expect("8 bytes"));
        return finish_token(0, (word | case) & low_bytes(len), len);
    }
    let mut h = 0u64;
    let mut at = start;
    while end - at >= 8 {
        let word = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        h = fold_mul(h ^ (word | case), MUL);
        at += 8;
    }
    let rest = end - at;
    let mut last = [0u8; 8];
    last[..rest].copy_from_slice(&bytes[at..end]);
    finish_token(h, u64::from_le_bytes(last) | (case & low_bytes(rest)), len)
}

/// The hash of a trigram from its tokens' hashes, mixed by the finaliser of MurmurHash3
/// (every input bit affects every output bit). Order matters: (x, y, z) and (y, x, z) are
/// different trigrams.
fn trigram(a: u64, b: u64, c: u64) -> u64 {
    let mut x = a.rotate_left(43) ^ b.rotate_left(21) ^ c;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// What the checks of a second response need, from one pass over it: whether its token
/// Jaccard similarity with `reference` is at least `limit` (exactly `token_jaccard(text,
/// reference) >= limit`), and its distinct trigram share at least to the point of showing it is
/// at least `min_share` (see [`trigram_share`]); each only when asked for. A first response is
/// checked with an empty `reference` and no `limit`.
///
/// Nearly every pair is settled without hash sets, from two bitmaps and part of
/// `reference`: `J = |A ∩ B| / |A ∪ B| <= |B| / (|B| + |A \ B|)`, which grows with `|B|`, so it
/// is below `limit` once `|A \ B| > n (1 / limit - 1)` for any `n >= |B|` (the token count of
/// `text`). A token of `reference` whose bit is unset in `text`'s bitmap is certainly outside
/// `text`, and one whose bit in a second bitmap was still unset was not counted before, so
/// their count is a lower bound of `|A \ B|`. A pair this does not settle (a near copy, or
/// non-ASCII text) gets the exact figure.
pub(crate) fn pair_stats(
    text: &str,
    reference: &str,
    limit: Option<f64>,
    min_share: Option<f64>,
) -> (bool, Option<f64>) {
    let ascii = text.is_ascii() && reference.is_ascii();
    let (proven_below, share) = with_scratch(|s| {
        let bits = bitmap_bits(text.len().max(reference.len()));
        let shift = 64 - bits.trailing_zeros();
        let in_text = reset(&mut s.tokens, bits);
        let mut ones = 0u32;
        let n = for_each_token_fast(text, &mut s.lower, |h| {
            ones += u32::from(set_bit(in_text, shift, h));
        });
        let proven_below = match limit {
            Some(l) if ascii && l > 0.0 && l <= 1.0 => {
                // A hair of margin, so rounding in `1 / l` never decides a pair at the limit.
                let stop_after = n as f64 * (1.0 / l - 1.0) * (1.0 + 1e-9) + 1e-9;
                let counted = reset(&mut s.grams, bits);
                let mut outside = 0usize;
                for_each_token_until(reference, |h| {
                    let (word, bit) = bit_of(shift, h);
                    if in_text[word] & bit == 0 && set_bit(counted, shift, h) {
                        outside += 1;
                        return outside as f64 <= stop_after;
                    }
                    true
                })
            }
            _ => false,
        };
        let share = min_share
            .and_then(|min| trigram_share(text, &mut s.lower, &mut s.grams, bits, n, ones, min));
        (proven_below, share)
    });
    let near_identical = match limit {
        Some(l) if l <= 0.0 => true,
        Some(l) if l > 1.0 || l.is_nan() || proven_below => false,
        Some(l) => token_jaccard(text, reference) >= l,
        None => false,
    };
    (near_identical, share)
}

/// The token Jaccard similarity of two texts, the one measure of the crate: the response
/// checks reject a near-identical pair with it and the [report](crate::report) counts
/// near-identical pairs with it, so the two never disagree. Tokens are maximal runs of
/// alphanumeric characters, lowercased; two texts without tokens have a similarity of 1.
///
/// ```
/// use rmboost::checks::token_jaccard;
///
/// assert_eq!(token_jaccard("The cat sat.", "the CAT sat"), 1.0);
/// assert_eq!(token_jaccard("a b", "b c"), 1.0 / 3.0);
/// ```
#[must_use]
pub fn token_jaccard(a: &str, b: &str) -> f64 {
    with_scratch(|s| {
        for (text, set) in [(a, &mut s.a), (b, &mut s.b)] {
            set.clear();
            for_each_token_fast(text, &mut s.lower, |h| _ = set.insert(h));
        }
        let (small, large) = if s.a.len() <= s.b.len() {
            (&s.a, &s.b)
        } else {
            (&s.b, &s.a)
        };
        let common = small.iter().filter(|h| large.contains(h)).count();
        let union = s.a.len() + s.b.len() - common;
        if union == 0 {
            1.0
        } else {
            common as f64 / union as f64
        }
    })
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

/// Clears `map` to `bits` zero bits and returns it as a slice (which the token loops keep in
/// registers, unlike the `Vec` behind it).
fn reset(map: &mut Vec<u64>, bits: usize) -> &mut [u64] {
    map.clear();
    map.resize(bits / 64, 0);
    map
}

/// Sets the bit of `h` in `map` (of `2^(64 - shift)` bits; see [`bit_of`]). Returns whether the bit was unset, so that callers count set bits as
/// they go instead of a popcount pass over the bitmap.
fn set_bit(map: &mut [u64], shift: u32, h: u64) -> bool {
    let (word, bit) = bit_of(shift, h);
    let new = map[word] & bit == 0;
    map[word] |= bit;
    new
}

/// The word and bit mask of `h` in a bitmap of `2^(64 - shift)` bits: the top bits of `h`
/// (every hash given here comes out of a full mixing step).
fn bit_of(shift: u32, h: u64) -> (usize, u64) {
    let i = (h >> shift) as usize;
    (i / 64, 1 << (i % 64))
}

/// Linear counting: the number of distinct values that set the bits of `map`.
fn estimate(ones: u32, bits: usize) -> f64 {
    let m = bits as f64;
    let zeros = (bits - ones as usize).max(1) as f64;
    m * (m / zeros).ln()
}

/// The distinct word-trigram share of `text` (`n` tokens, `ones` bits set in a token bitmap of
/// `bits` bits; `None` below [`TRIGRAM_MIN_TOKENS`] tokens), estimated with bitmaps (see the
/// [module docs](self)), or a lower bound of it when that shows it is at least `min_share`.
///
/// The bound: every distinct token but the last two starts a trigram of its own, so a text of
/// `n` tokens with `d` distinct ones has at least `d - 2` distinct trigrams among its `n - 2`.
/// Prose has many distinct tokens, so the bound usually settles the question from the token
/// bitmap alone and the trigram pass is skipped; a loop has few, and gets the full count.
fn trigram_share(
    text: &str,
    lower: &mut String,
    grams: &mut Vec<u64>,
    bits: usize,
    n: usize,
    ones: u32,
    min_share: f64,
) -> Option<f64> {
    if n < TRIGRAM_MIN_TOKENS {
        return None;
    }
    let shift = 64 - bits.trailing_zeros();
    let positions = (n - 2) as f64;
    // The estimate may be a little high: take 3% and one token off.
    let distinct_tokens = estimate(ones, bits) * 0.97 - 1.0;
    let bound = ((distinct_tokens - 2.0) / positions).clamp(0.0, 1.0);
    if bound >= min_share {
        return Some(bound);
    }
    let grams = reset(grams, bits);
    let (mut p1, mut p2) = (0u64, 0u64);
    let (mut seen, mut ng) = (0usize, 0u32);
    for_each_token_fast(text, lower, |h| {
        if seen >= 2 {
            ng += u32::from(set_bit(grams, shift, trigram(p2, p1, h)));
        }
        p2 = p1;
        p1 = h;
        seen += 1;
    });
    Some((estimate(ng, bits) / positions).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct_trigram_share(text: &str, min_share: f64) -> Option<f64> {
        pair_stats(text, "", None, Some(min_share)).1
    }

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
        }
    }

    #[test]
    fn trigram_share() {
        let prose = "Bees collect nectar from flowers and carry it back to the hive, where \
                     workers pass it from mouth to mouth, add enzymes, and fan it with their \
                     wings until most of the water has gone.";
        let share = distinct_trigram_share(prose, 1.0).unwrap();
        assert!(share > 0.95, "{share}");
        let looped = "I'm not able to assist you. ".repeat(12);
        let share = distinct_trigram_share(&looped, 1.0).unwrap();
        // 7 tokens ("i", "m", "not", ...) 12 times: 82 trigrams, 7 distinct.
        assert!((share - 7.0 / 82.0).abs() < 0.002, "{share}");
        // Too short to judge.
        assert_eq!(distinct_trigram_share("one two three", 1.0), None);
        // Order matters: a permutation of a trigram is another trigram.
        let words: Vec<String> = (0..30).map(|i| format!("w{}", i % 3)).collect();
        let share = distinct_trigram_share(&words.join(" "), 1.0).unwrap();
        assert!((share - 3.0 / 28.0).abs() < 0.002, "{share}");
        // Enough distinct tokens settle it without the trigram pass: a lower bound at or
        // above the limit, never above the exact share.
        let bound = distinct_trigram_share(prose, 0.5).unwrap();
        assert!((0.5..=1.0).contains(&bound), "{bound}");
        // A loop has too few distinct tokens for the bound: the full count decides.
        let share = distinct_trigram_share(&looped, 0.5).unwrap();
        assert!((share - 7.0 / 82.0).abs() < 0.002, "{share}");
    }

    fn fast_model(text: &str) -> Vec<u64> {
        text.as_bytes()
            .split(|b| !b.is_ascii_alphanumeric())
            .filter(|t| !t.is_empty())
            .map(|t| hash_span(t, 0, t.len(), CASE))
            .collect()
    }

    fn fast(text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let n = for_each_token_fast(text, &mut String::new(), |h| out.push(h));
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn fast_tokens_at_block_and_word_edges() {
        // Tokens of every length from 1 to 150 at every offset around the 64-byte blocks.
        for len in 1..150 {
            for lead in 0..70 {
                let text = format!("{}{}-Ab9 x", " ".repeat(lead), &"Zq7".repeat(50)[..len]);
                assert_eq!(fast(&text), fast_model(&text), "len {len}, lead {lead}");
            }
        }
        assert_eq!(fast(""), Vec::<u64>::new());
        assert_eq!(fast(" .,;"), Vec::<u64>::new());
        // Letter case does not matter; every other ASCII byte separates.
        assert_eq!(fast("HeLLo WORLD"), fast("hello world"));
        let all: String = (0u8..128).map(char::from).collect();
        assert_eq!(fast(&all), fast_model(&all));
        assert_eq!(fast(&all).len(), 3);
    }

    proptest::proptest! {
        /// The early-exit decision is exactly the full measure's.
        #[test]
        fn pair_stats_agrees_with_token_jaccard(
            a in "[a-eA-E é]{0,120}",
            b in "[a-eA-E é]{0,120}",
            limit in 0.0f64..1.2,
        ) {
            let reached = pair_stats(&a, &b, Some(limit), None).0;
            proptest::prop_assert_eq!(reached, token_jaccard(&a, &b) >= limit);
            let ascii_a: String = a.chars().filter(char::is_ascii).collect();
            let ascii_b: String = b.chars().filter(char::is_ascii).collect();
            proptest::prop_assert_eq!(
                pair_stats(&ascii_a, &ascii_b, Some(limit), Some(0.5)).0,
                token_jaccard(&ascii_a, &ascii_b) >= limit
            );
        }

        #[test]
        fn fast_tokens_agree_with_the_model(text in "[a-zA-Z0-9 ,.\\-_@\\[`{]{0,200}") {
            proptest::prop_assert_eq!(fast(&text), fast_model(&text));
        }

        #[test]
        fn jaccard_agrees_with_the_model(a in "[a-cA-C ,.é]{0,40}", b in "[a-cA-C ,.é]{0,40}") {
            let want = jaccard_model(&a, &b);
            proptest::prop_assert_eq!(token_jaccard(&a, &b), want);
        }
    }
}
