//! The audit log on disk: the active file and its rotated predecessors, walking them for
//! `audit verify` and `audit query`, and reading the tail the writer resumes the chain from.
//!
//! Rotated files are named `<active>.<first seq, 12 digits>`, so they sort in chain order and a
//! reader that pages by `seq` can skip whole files by name.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::chain::{seq_of, Chain, Link, Problem};
use super::query::Query;

/// Why a walk over the files could not complete (as opposed to finding a bad record).
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    pub source: io::Error,
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError { path: path.to_owned(), source }
}

/// The name of a rotated file whose first record has `first_seq`.
pub fn rotated_name(active: &Path, first_seq: u64) -> PathBuf {
    let mut name = active.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{first_seq:012}"));
    active.with_file_name(name)
}

/// The rotated files of `active` in chain order (by their first seq), then `active` if it exists.
pub fn log_files(active: &Path) -> Result<Vec<(PathBuf, Option<u64>)>, FileError> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let base = active.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let mut rotated = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(suffix) = name.strip_prefix(&base).and_then(|s| s.strip_prefix('.')) else { continue };
                if suffix.len() == 12 && suffix.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(n) = suffix.parse::<u64>() {
                        rotated.push((dir.join(name), Some(n)));
                    }
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(FileError { path: dir, source: e }),
    }
    rotated.sort_by_key(|(_, n)| *n);
    if active.exists() {
        rotated.push((active.to_owned(), None));
    }
    Ok(rotated)
}

/// Orders files given on a command line by the seq of their first record (the order they were
/// given when a first line cannot be read, so the walk reports it where it stands).
pub fn chain_order(files: &[PathBuf]) -> Vec<PathBuf> {
    let firsts: Vec<Option<u64>> =
        files.iter().map(|f| first_line(f).ok().flatten().and_then(|l| seq_of(&l))).collect();
    if firsts.iter().any(Option::is_none) {
        return files.to_vec();
    }
    let mut order: Vec<(u64, &PathBuf)> = firsts.into_iter().flatten().zip(files).collect();
    order.sort_by_key(|(s, _)| *s);
    order.into_iter().map(|(_, f)| f.clone()).collect()
}

fn first_line(path: &Path) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    BufReader::new(File::open(path)?).take(1 << 20).read_until(b'\n', &mut line)?;
    Ok((!line.is_empty()).then(|| String::from_utf8_lossy(&line).trim_end().to_owned()))
}

/// One line of a file: its text (without the newline), its number, and whether it was complete.
struct Line {
    text: Result<String, &'static str>,
    number: usize,
    complete: bool,
}

/// Longest line read whole; records are far shorter (a filter is bounded by the frame size).
const MAX_LINE: u64 = 1 << 20;

/// Reads lines one at a time with a bounded buffer.
struct Lines {
    reader: BufReader<File>,
    number: usize,
    buf: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Lines, FileError> {
        let f = File::open(path).map_err(file_err(path))?;
        Ok(Lines { reader: BufReader::with_capacity(64 * 1024, f), number: 0, buf: Vec::new() })
    }

    fn next(&mut self, path: &Path) -> Result<Option<Line>, FileError> {
        self.buf.clear();
        let n = (&mut self.reader).take(MAX_LINE + 1).read_until(b'\n', &mut self.buf).map_err(file_err(path))?;
        if n == 0 {
            return Ok(None);
        }
        self.number += 1;
        let mut complete = self.buf.last() == Some(&b'\n');
        if !complete && n as u64 > MAX_LINE {
            // Far longer than any record: skip to the end of the line without holding it.
            loop {
                self.buf.clear();
                let m = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut self.buf).map_err(file_err(path))?;
                complete = self.buf.last() == Some(&b'\n');
                if m == 0 || complete {
                    break;
                }
            }
            return Ok(Some(Line { text: Err("a line longer than 1 MiB"), number: self.number, complete }));
        }
        if complete {
            self.buf.pop();
        }
        let text = std::str::from_utf8(&self.buf).map(str::to_owned).map_err(|_| "not UTF-8");
        Ok(Some(Line { text, number: self.number, complete }))
    }
}

/// A verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Files walked.
    pub files: usize,
    /// The first seq and the last record (none when the files hold no record).
    pub span: Option<(u64, Link)>,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seq {seq} ({}, line {line}): {problem}", file.display())]
pub struct Broken {
    /// The file.
    pub file: PathBuf,
    /// The line in that file (1-based).
    pub line: usize,
    /// The first bad sequence number.
    pub seq: u64,
    /// What is wrong.
    pub problem: Problem,
}

/// The outcome of a verification that could read every file.
pub type Verdict = Result<Verified, Broken>;

/// Walks the files in the order given. `partial` accepts a log whose first record is not seq 1.
pub fn verify(files: &[PathBuf], partial: bool) -> Result<Verdict, FileError> {
    let mut chain = if partial { Chain::partial() } else { Chain::from_genesis() };
    let mut records = 0;
    for (i, path) in files.iter().enumerate() {
        let mut lines = Lines::open(path)?;
        while let Some(line) = lines.next(path)? {
            let broken = |seq, problem| Broken { file: path.clone(), line: line.number, seq, problem };
            let text = match (&line.text, line.complete) {
                (Ok(t), true) => t,
                (_, false) => return Ok(Err(broken(chain.expected().unwrap_or(0), Problem::Truncated))),
                (Err(why), true) => {
                    let p = Problem::Unparseable((*why).into());
                    return Ok(Err(broken(chain.expected().unwrap_or(0), p)));
                }
            };
            match chain.check(text) {
                Ok(_) => records += 1,
                Err((seq, Problem::Missing { found })) => {
                    // A gap: the record is reordered if it turns up later, else it is missing.
                    let later = appears_later(&mut lines, path, &files[i + 1..], seq)?;
                    let problem = if later { Problem::Reordered { found } } else { Problem::Missing { found } };
                    return Ok(Err(broken(seq, problem)));
                }
                Err((seq, problem)) => return Ok(Err(broken(seq, problem))),
            }
        }
    }
    let span = chain.span().map(|(first, last)| (first, last.clone()));
    Ok(Ok(Verified { records, files: files.len(), span }))
}

fn appears_later(lines: &mut Lines, path: &Path, rest: &[PathBuf], seq: u64) -> Result<bool, FileError> {
    while let Some(l) = lines.next(path)? {
        if l.text.ok().and_then(|t| seq_of(&t)) == Some(seq) {
            return Ok(true);
        }
    }
    for p in rest {
        let mut more = Lines::open(p)?;
        while let Some(l) = more.next(p)? {
            if l.text.ok().and_then(|t| seq_of(&t)) == Some(seq) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Calls `each` with every complete record of `files` that `query` selects, in order, until it
/// returns `false`. Files that end before `query.after_seq` are skipped by name.
pub fn query(
    files: &[(PathBuf, Option<u64>)],
    query: &Query,
    mut each: impl FnMut(&str, &Map<String, Value>) -> bool,
) -> Result<(), FileError> {
    for (i, (path, _)) in files.iter().enumerate() {
        // The next file's first seq bounds this one's last: skip files wholly before the page.
        let next_first = files.get(i + 1).and_then(|(_, n)| *n);
        if let (Some(after), Some(next)) = (query.after_seq, next_first) {
            if next <= after + 1 {
                continue;
            }
        }
        let mut lines = match Lines::open(path) {
            Ok(l) => l,
            // Rotated away between listing and reading: it is now under its rotated name.
            Err(e) if e.source.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        while let Some(line) = lines.next(path)? {
            let (Ok(text), true) = (line.text, line.complete) else { continue };
            let Ok(Value::Object(rec)) = serde_json::from_str::<Value>(&text) else { continue };
            if query.matches(&rec) && !each(&text, &rec) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The end of an active file, for resuming the chain after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tail {
    /// The last complete line, if any.
    pub(super) last_line: Option<String>,
    /// The seq of the file's first record, if any.
    pub(super) first_seq: Option<u64>,
    /// Length of the file up to and including the last newline (anything after it is a torn
    /// write that never completed).
    pub(super) complete_len: u64,
    /// Length of the file.
    pub(super) len: u64,
}

/// Reads the first and the last complete line of a file (records are far below 1 MiB).
pub(super) fn tail(path: &Path) -> io::Result<Tail> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let (last_line, complete_len) = match buf.iter().rposition(|&b| b == b'\n') {
        None => (None, start),
        Some(end) => {
            let begin = buf[..end].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let line = String::from_utf8_lossy(&buf[begin..end]).into_owned();
            (Some(line), start + end as u64 + 1)
        }
    };
    let first_seq = first_line(path)?.and_then(|l| seq_of(&l));
    Ok(Tail { last_line, first_seq, complete_len, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_line_is_reported_without_being_held() {
        let dir = std::env::temp_dir().join(format!("incident-stream-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("audit.log");
        let mut text = "x".repeat(3 << 20);
        text.push('\n');
        std::fs::write(&f, &text).expect("write");
        let broken = verify(std::slice::from_ref(&f), false).expect("readable").expect_err("not a record");
        assert_eq!((broken.seq, broken.line), (1, 1));
        assert_eq!(broken.problem, Problem::Unparseable("a line longer than 1 MiB".into()));
        text.pop();
        std::fs::write(&f, &text).expect("write");
        let broken = verify(std::slice::from_ref(&f), false).expect("readable").expect_err("cut");
        assert_eq!(broken.problem, Problem::Truncated);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn rotated_names_sort_in_chain_order() {
        let active = Path::new("/var/log/audit.log");
        assert_eq!(rotated_name(active, 42), PathBuf::from("/var/log/audit.log.000000000042"));
    }
}
