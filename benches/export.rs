//! Export time and sizes: a JSONL dataset of realistic synthetic examples (default 100,000)
//! exported with `DatasetExport::from_jsonl`, as `rmboost export` does, into a Hub folder with
//! a 5% test split. Prints the JSONL and Parquet sizes, the time of the export (reading and
//! parsing the JSONL, the report for the card, encoding and writing the Parquet files) and of
//! the Parquet encoding alone (the same examples from memory into a `Vec<u8>`).
//!
//! ```text
//! cargo bench --features parquet --bench export
//! cargo bench --features parquet --bench export -- --examples 10000
//! ```
//!
//! The examples are made once, outside the timed part: multi-sentence responses of 600 to
//! 2,400 characters from a 2,000-word vocabulary (Zipf-like word frequencies, as in text),
//! one- or three-turn prompts, two to three aspects, the metadata of a real run (method,
//! seed, two models, token usage, calls). Each timed part runs three times; the best and the
//! median are printed.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rmboost::export::{DatasetExport, ParquetWriter};
use rmboost::{
    ExampleFormat, ExampleMetadata, ExampleWriter, Label, Message, PreferenceExample, Usage,
};

const ASPECTS: [&str; 6] = [
    "helpfulness",
    "correctness",
    "clarity",
    "completeness",
    "conciseness",
    "harmlessness",
];

struct Words(Vec<String>);

impl Words {
    fn new(rng: &mut ChaCha8Rng) -> Self {
        let letters = b"etaoinshrdlcumwfgypbvkjxqz";
        Words(
            (0..2000)
                .map(|_| {
                    let len = rng.random_range(2..10);
                    (0..len)
                        .map(|_| letters[(rng.random::<f64>().powi(2) * 26.0) as usize] as char)
                        .collect()
                })
                .collect(),
        )
    }

    /// Text of about `chars` characters: sentences of Zipf-like words.
    fn text(&self, rng: &mut ChaCha8Rng, chars: usize) -> String {
        let mut s = String::with_capacity(chars + 16);
        let mut in_sentence = 0;
        while s.len() < chars {
            let rank = (rng.random::<f64>().powi(3) * self.0.len() as f64) as usize;
            let w = &self.0[rank.min(self.0.len() - 1)];
            if in_sentence == 0 {
                let mut c = w.chars();
                if let Some(first) = c.next() {
                    s.extend(first.to_uppercase());
                    s.push_str(c.as_str());
                }
            } else {
                s.push_str(w);
            }
            in_sentence += 1;
            if in_sentence > rng.random_range(6..20usize) {
                s.push_str(". ");
                in_sentence = 0;
            } else {
                s.push(' ');
            }
        }
        s
    }
}

fn examples(n: usize) -> Vec<PreferenceExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let words = Words::new(&mut rng);
    (0..n)
        .map(|i| {
            let mut metadata = ExampleMetadata {
                method: "rmboost".into(),
                seed: 42,
                calls: 2 + u32::from(rng.random_bool(0.1)),
                ..Default::default()
            };
            metadata
                .models
                .insert("first".into(), "Qwen2.5-7B-Instruct".into());
            metadata
                .models
                .insert("second".into(), "Qwen2.5-7B-Instruct".into());
            let (p, c) = (rng.random_range(100..600), rng.random_range(200..700));
            metadata.usage.insert("first".into(), Usage::new(p, c));
            metadata
                .usage
                .insert("second".into(), Usage::new(p + c + 150, c + 50));
            metadata
                .usage
                .insert("total".into(), Usage::new(2 * p + c + 150, 2 * c + 50));
            let prompt = if rng.random_bool(0.2) {
                vec![
                    Message::user(words.text(&mut rng, 150)),
                    Message::assistant(words.text(&mut rng, 400)),
                    Message::user(words.text(&mut rng, 100)),
                ]
            } else {
                let len = rng.random_range(60..400);
                vec![Message::user(words.text(&mut rng, len))]
            };
            let (a, b) = (rng.random_range(600..1800), rng.random_range(800..2400));
            let first = words.text(&mut rng, a);
            let second = words.text(&mut rng, b);
            let label = if rng.random_bool(0.5) {
                Label::Better
            } else {
                Label::Worse
            };
            let (chosen, rejected) = match label {
                Label::Better => (second, first),
                Label::Worse => (first, second),
            };
            let k = rng.random_range(2..4);
            PreferenceExample {
                id: format!("{:016x}", rng.random::<u64>() ^ i as u64),
                prompt,
                chosen,
                rejected,
                label,
                grade: None,
                aspects: (0..k)
                    .map(|_| ASPECTS[rng.random_range(0..ASPECTS.len())].to_string())
                    .collect(),
                margin: None,
                metadata,
            }
        })
        .collect()
}

fn stats(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    (times[0], times[times.len() / 2])
}

fn main() {
    let mut n = 100_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--examples" {
            n = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--examples N");
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let data = examples(n);
    let jsonl = dir.path().join("pairs.jsonl");
    {
        let out = BufWriter::new(std::fs::File::create(&jsonl).expect("create"));
        let mut w = ExampleWriter::new(out, ExampleFormat::Conversational);
        for e in &data {
            w.write(e).expect("write");
        }
        w.into_inner().expect("flush").flush().expect("flush");
    }
    let jsonl_bytes = std::fs::metadata(&jsonl).expect("size").len();
    println!("examples: {n}");
    println!(
        "JSONL:    {jsonl_bytes} bytes ({:.1} MB)",
        jsonl_bytes as f64 / 1e6
    );

    let mut export_times = Vec::new();
    let mut parquet_bytes = 0;
    let mut files = 0;
    for round in 0..3 {
        let out = dir.path().join(format!("hub{round}"));
        let t = Instant::now();
        let summary = DatasetExport::new(&out)
            .test_fraction(0.05)
            .from_jsonl(&jsonl)
            .expect("export");
        export_times.push(t.elapsed());
        parquet_bytes = summary.bytes();
        files = summary.splits.iter().map(|s| s.files.len()).sum::<usize>();
        assert_eq!(summary.rows(), n as u64);
        std::fs::remove_dir_all(&out).expect("clean up");
    }
    let mut encode_times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut w = ParquetWriter::new(
            Vec::with_capacity(parquet_bytes as usize),
            ExampleFormat::Conversational,
        )
        .expect("writer");
        for e in &data {
            w.write(e).expect("write");
        }
        let (bytes, _) = w.finish().expect("finish");
        encode_times.push(t.elapsed());
        std::hint::black_box(bytes);
    }
    let (best, median) = stats(export_times);
    let (ebest, emedian) = stats(encode_times);
    println!(
        "Parquet:  {parquet_bytes} bytes ({:.1} MB, {:.1}% of the JSONL) in {files} files",
        parquet_bytes as f64 / 1e6,
        parquet_bytes as f64 * 100.0 / jsonl_bytes as f64
    );
    println!(
        "export (JSONL -> folder): best {:.2} s, median {:.2} s ({:.0} examples/s, {:.0} MB/s of JSONL)",
        best.as_secs_f64(),
        median.as_secs_f64(),
        n as f64 / median.as_secs_f64(),
        jsonl_bytes as f64 / 1e6 / median.as_secs_f64()
    );
    println!(
        "Parquet encoding alone (from memory): best {:.2} s, median {:.2} s",
        ebest.as_secs_f64(),
        emedian.as_secs_f64()
    );
}
