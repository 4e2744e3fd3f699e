//! Numbers and times as the pages print them.

/// A duration in µs as text.
pub fn micros(value: u64) -> String {
    if value >= 10_000 {
        format!("{:.1} ms", value as f64 / 1000.0)
    } else {
        format!("{value} µs")
    }
}

/// `(YYYY-MM-DD, HH:MM:SS)` in UTC of microseconds since the Unix epoch.
pub fn utc(micros: i64) -> (String, String) {
    let text = cqrs_core::Timestamp(micros).to_string();
    let mut parts = text.split(' ');
    let (date, time) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    (date.to_owned(), time.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), ("1970-01-01".into(), "00:00:00".into()));
        assert_eq!(utc(951_782_400_000_000), ("2000-02-29".into(), "00:00:00".into()));
        assert_eq!(utc(-1), ("1969-12-31".into(), "23:59:59".into()));
    }
}
