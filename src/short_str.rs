//! A string kept inline when short (22 bytes or less), boxed otherwise.
//!
//! Every idle connection keeps a few short strings for its whole life (its token's id, its
//! subscriptions' ids): held in a `Box<str>`, each also costs a heap block of at least 32 bytes.
//! A `ShortStr` is 24 bytes inline and allocates only for longer text.

use std::fmt;
use std::ops::Deref;

/// Longest text kept inline.
const INLINE: usize = 22;

/// See the module docs. Compares, hashes and prints as its text.
#[derive(Clone)]
pub(crate) enum ShortStr {
    /// `len` bytes of UTF-8 at the start of `bytes`.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// Longer text.
    Heap(Box<str>),
}

impl ShortStr {
    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Only ever filled with a whole `&str`, so always UTF-8.
            ShortStr::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default(),
            ShortStr::Heap(s) => s,
        }
    }
}

impl From<&str> for ShortStr {
    fn from(s: &str) -> ShortStr {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                ShortStr::Inline { len, bytes }
            }
            _ => ShortStr::Heap(s.into()),
        }
    }
}

impl From<String> for ShortStr {
    fn from(s: String) -> ShortStr {
        if s.len() <= INLINE {
            ShortStr::from(s.as_str())
        } else {
            ShortStr::Heap(s.into_boxed_str())
        }
    }
}

impl Deref for ShortStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ShortStr {
    fn eq(&self, other: &ShortStr) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ShortStr {}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_stays_inline_and_long_text_is_boxed_and_both_read_back() {
        assert_eq!(std::mem::size_of::<ShortStr>(), 24);
        for s in ["", "s", "0123456789abcdef", "exactly-twenty-two-by.", "é∂ünïcødé", "twenty-three-bytes-long"]
        {
            let short = ShortStr::from(s);
            assert_eq!(short.as_str(), s);
            assert_eq!(&*ShortStr::from(s.to_owned()), s);
            assert_eq!(short.to_string(), s);
            assert_eq!(matches!(short, ShortStr::Inline { .. }), s.len() <= INLINE, "{s:?}");
        }
        let long = "x".repeat(300);
        assert_eq!(ShortStr::from(long.clone()).as_str(), long);
        let (a, also_a, b) = (ShortStr::from("a"), ShortStr::from("a".to_owned()), ShortStr::from("b"));
        assert_eq!(a, also_a);
        assert_ne!(a, b);
        assert!(a == *"a" && b != *"a");
    }
}
