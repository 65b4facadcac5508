//! A quick line count for the progress bar's total (the run itself is
//! [`rmboost::run::run_to_file`]).

use std::fs::File;
use std::io::Read;
use std::path::Path;

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
    fn counts_lines() {
        let dir = std::env::temp_dir().join(format!("rmboost-cli-count-{}", std::process::id()));
        std::fs::write(&dir, b"a\n\n  \nb\nc").unwrap();
        assert_eq!(count_lines(&dir), Some(3));
        std::fs::remove_file(&dir).unwrap();
    }
}
