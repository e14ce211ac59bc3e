//! Walking the hash chain one line at a time: what `audit verify` checks. Pure: lines in,
//! verdicts out.
//!
//! Each line must parse as a record whose `hash` matches its content (else: edited), whose `seq`
//! follows the previous one (else: missing or reordered) and whose `prev` is the previous
//! record's hash (else: the chain is broken, e.g. spliced from another log, or a record was
//! replaced with a recomputed hash). A chain alone cannot show that records were cut off at the
//! end; compare the last `seq` and `hash` with an anchor kept elsewhere (the writer logs one at
//! every rotation and shutdown).

use serde_json::{Map, Value};

use super::record::{hash_of, GENESIS};

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The last line of the log stops before its end (a write cut short, or the file truncated).
    #[error("truncated mid-line")]
    Truncated,
    /// The line is not a record at all.
    #[error("not a record ({0})")]
    Unparseable(String),
    /// The content does not match the record's own hash.
    #[error("edited: its content does not match its hash")]
    Edited,
    /// The record is absent; the next record present has sequence number `found`.
    #[error("missing: the next record present is seq {found}")]
    Missing {
        /// The sequence number found in its place.
        found: u64,
    },
    /// The record is present, but not where it belongs.
    #[error("reordered: seq {found} stands where this record belongs")]
    Reordered {
        /// The sequence number found in its place.
        found: u64,
    },
    /// `prev` is not the hash of the record before.
    #[error("broken chain: `prev` is not the hash of the record before it (spliced, or a record was replaced)")]
    BrokenLink,
}

/// The position of a verified record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// The state of a walk: what the next record must be.
#[derive(Debug, Clone)]
pub(super) struct Chain {
    expected: Option<u64>,
    prev: Option<String>,
    last: Option<Link>,
    first: Option<u64>,
}

/// The parts of a line the chain needs.
struct Parsed {
    seq: u64,
    prev: String,
    hash: String,
    rest: Map<String, Value>,
}

fn parse(line: &str) -> Result<Parsed, String> {
    let mut obj = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("not JSON: {e}")),
    };
    let seq = obj.get("seq").and_then(Value::as_u64).ok_or("no numeric `seq`")?;
    let prev = obj.get("prev").and_then(Value::as_str).ok_or("no `prev`")?.to_owned();
    let hash = match obj.remove("hash") {
        Some(Value::String(h)) => h,
        _ => return Err("no `hash`".into()),
    };
    Ok(Parsed { seq, prev, hash, rest: obj })
}

/// Reads only the sequence number of a line (for looking ahead after a gap).
pub(super) fn seq_of(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line).ok()?.get("seq")?.as_u64()
}

impl Chain {
    /// A walk that must start at the first record of the log (seq 1, `prev` = genesis).
    pub(super) fn from_genesis() -> Chain {
        Chain { expected: Some(1), prev: Some(GENESIS.to_owned()), last: None, first: None }
    }

    /// A walk that may start anywhere (a tail of the log whose earlier files are gone).
    pub(super) fn partial() -> Chain {
        Chain { expected: None, prev: None, last: None, first: None }
    }

    /// The sequence number the next record must have, if known.
    pub(super) fn expected(&self) -> Option<u64> {
        self.expected
    }

    /// The first and the last record verified so far.
    pub(super) fn span(&self) -> Option<(u64, &Link)> {
        Some((self.first?, self.last.as_ref()?))
    }

    /// Checks the next complete line. On failure, returns the sequence number of the bad
    /// record (where it should be, for a gap; as it claims, when nothing else is known).
    pub(super) fn check(&mut self, line: &str) -> Result<&Link, (u64, Problem)> {
        let here = |found: Option<u64>| self.expected.or(found).unwrap_or(0);
        let p = parse(line).map_err(|e| (here(seq_of(line)), Problem::Unparseable(e)))?;
        if hash_of(&p.rest) != p.hash {
            return Err((here(Some(p.seq)), Problem::Edited));
        }
        if let Some(expected) = self.expected {
            if p.seq > expected {
                return Err((expected, Problem::Missing { found: p.seq }));
            }
            if p.seq < expected {
                return Err((expected, Problem::Reordered { found: p.seq }));
            }
        }
        if self.prev.as_ref().is_some_and(|prev| *prev != p.prev) {
            return Err((p.seq, Problem::BrokenLink));
        }
        self.first.get_or_insert(p.seq);
        self.expected = Some(p.seq + 1);
        self.prev = Some(p.hash.clone());
        Ok(self.last.insert(Link { seq: p.seq, hash: p.hash }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{seal, Kind, Record};

    fn log(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let r =
                    Record::new(Kind::SubscriptionCreated).tenant("acme").field("subscription_id", format!("s{seq}"));
                let s = seal(&r, seq, "2026-12-01T00:00:00Z", &prev);
                prev = s.hash;
                s.line
            })
            .collect()
    }

    fn walk(lines: &[String]) -> Result<u64, (u64, Problem)> {
        let mut c = Chain::from_genesis();
        let mut last = 0;
        for l in lines {
            last = c.check(l)?.seq;
        }
        Ok(last)
    }

    #[test]
    fn an_untouched_log_verifies() {
        assert_eq!(walk(&log(5)), Ok(5));
    }

    #[test]
    fn an_edited_field_is_named_by_seq() {
        let mut l = log(5);
        l[2] = l[2].replace("\"acme\"", "\"evil\"");
        assert_eq!(walk(&l), Err((3, Problem::Edited)));
    }

    #[test]
    fn an_edited_seq_is_an_edit_not_a_gap() {
        let mut l = log(5);
        l[2] = l[2].replace("\"seq\":3", "\"seq\":4");
        assert_eq!(walk(&l), Err((3, Problem::Edited)));
    }

    #[test]
    fn a_deleted_line_is_a_gap() {
        let mut l = log(5);
        l.remove(1);
        assert_eq!(walk(&l), Err((2, Problem::Missing { found: 3 })));
    }

    #[test]
    fn a_moved_back_line_is_reordered() {
        let mut l = log(5);
        let moved = l.remove(1);
        l.insert(3, moved);
        // seq 2 is missing at its place first; the driver looks ahead to tell the two apart.
        assert_eq!(walk(&l), Err((2, Problem::Missing { found: 3 })));
        let mut l = log(5);
        l.swap(1, 2);
        l.remove(1);
        assert_eq!(walk(&l), Err((3, Problem::Missing { found: 4 })));
        let mut l = log(5);
        l.insert(4, l[1].clone());
        assert_eq!(walk(&l), Err((5, Problem::Reordered { found: 2 })));
    }

    #[test]
    fn a_record_from_another_chain_breaks_the_link() {
        let mut other = log(5);
        other[2] = other[2].replace("s3", "x3");
        // Re-seal the edited record so its own hash is right: only the link can tell.
        let mut m: Map<String, Value> = serde_json::from_str(&other[2]).expect("json");
        m.remove("hash");
        let h = hash_of(&m);
        m.insert("hash".into(), h.into());
        let mut l = log(5);
        l[2] = crate::audit::record::canonical(&Value::Object(m));
        assert_eq!(walk(&l), Err((4, Problem::BrokenLink)));
    }

    #[test]
    fn a_log_must_start_at_genesis_unless_partial() {
        let l = log(5);
        assert_eq!(walk(&l[2..]), Err((1, Problem::Missing { found: 3 })));
        let mut c = Chain::partial();
        for line in &l[2..] {
            c.check(line).expect("a tail verifies as partial");
        }
        assert_eq!(c.span().map(|(f, l)| (f, l.seq)), Some((3, 5)));
    }

    #[test]
    fn garbage_is_unparseable_at_the_expected_seq() {
        let mut l = log(3);
        l[1] = "{\"seq\":2,".into();
        assert!(matches!(walk(&l), Err((2, Problem::Unparseable(_)))));
    }
}
