//! Wall-clock formatting: every time on the wire is an RFC 3339 UTC string.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, as RFC 3339 UTC with microseconds.
pub fn rfc3339_now() -> String {
    format_utc(OffsetDateTime::now_utc())
}

/// Now, as RFC 3339 UTC with exactly six fractional digits (fixed width, so audit timestamps
/// sort as text too).
pub fn rfc3339_micros_now() -> String {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    OffsetDateTime::now_utc().format(&f).unwrap_or_default()
}

/// A Unix time in seconds as RFC 3339 UTC (clamped to the representable range).
pub fn rfc3339_from_unix(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    OffsetDateTime::from_unix_timestamp(secs).map(format_utc).unwrap_or_else(|_| "9999-12-31T23:59:59Z".to_owned())
}

/// A Unix time in milliseconds as RFC 3339 UTC.
pub fn rfc3339_from_unix_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map(format_utc)
        .unwrap_or_else(|_| "9999-12-31T23:59:59Z".to_owned())
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

pub(crate) fn format_utc(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    OffsetDateTime::now_utc().unix_timestamp().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(rfc3339_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_from_unix_ms(1_500), "1970-01-01T00:00:01.5Z");
        assert!(unix_now_ms() / 1000 >= unix_now().saturating_sub(1));
        let now = rfc3339_now();
        assert!(now.ends_with('Z'), "{now}");
        assert!(OffsetDateTime::parse(&now, &Rfc3339).is_ok());
        let micros = rfc3339_micros_now();
        assert_eq!(micros.len(), "2026-12-01T00:00:00.000000Z".len(), "{micros}");
        assert!(OffsetDateTime::parse(&micros, &Rfc3339).is_ok(), "{micros}");
    }
}
