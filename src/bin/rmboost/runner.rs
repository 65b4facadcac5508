//! Small helpers around the library's run loop ([`rmboost::run::run_to_file`]): the
//! `--shard I/N` parser and a quick line count for the progress bar's total.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rmboost::run::Shard;

/// Parses `--shard I/N` (0-based).
pub(crate) fn parse_shard(s: &str) -> Result<Shard, String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}`: expected I/N, e.g. 0/4"))?;
    let index: u32 = i
        .trim()
        .parse()
        .map_err(|_| format!("`{i}` is not a number"))?;
    let count: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` is not a number"))?;
    Shard::new(index, count).map_err(|_| format!("{index}/{count}: need N >= 1 and 0 <= I < N"))
}

/// Counts the non-blank lines of a file quickly (for the progress bar's total).
pub(crate) fn count_lines(path: &Path) -> Option<u64> {
    let mut f = File::open(path).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0u64;
    let mut in_line = false;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                if in_line {
                    lines += 1;
                }
                in_line = false;
            } else if !b.is_ascii_whitespace() {
                in_line = true;
            }
        }
    }
    if in_line {
        lines += 1;
    }
    Some(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parse() {
        assert!(parse_shard("1/0").is_err());
        assert!(parse_shard("2/2").is_err());
        assert!(parse_shard("x").is_err());
        let s = parse_shard(" 1 / 3").unwrap();
        assert_eq!((s.index(), s.count()), (1, 3));
    }

    #[test]
    fn counts_lines() {
        let dir = std::env::temp_dir().join(format!("rmboost-cli-count-{}", std::process::id()));
        std::fs::write(&dir, b"a\n\n  \nb\nc").unwrap();
        assert_eq!(count_lines(&dir), Some(3));
        std::fs::remove_file(&dir).unwrap();
    }
}
