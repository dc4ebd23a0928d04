//! How the console writes numbers and times: thousands separators (the API's JSON has none,
//! people need them), and times as `<time datetime>` in UTC that the page script rewrites in
//! the browser's own zone (without JavaScript the UTC text stays, and says so).

use chrono::{DateTime, Utc};
use maud::{html, Markup};

/// `1234567` → `1,234,567`; `-1234` → `-1,234`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A point in time, readable without JavaScript (UTC) and localised with it.
pub fn time(t: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)) {
            (t.format("%Y-%m-%d %H:%M UTC"))
        }
    }
}

/// [`time`], or a dash for "never".
pub fn maybe_time(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => time(t),
        None => html! { span.muted { "—" } },
    }
}

/// Milliseconds as a person reads them: `850 ms`, `2.4 s`.
pub fn millis(ms: Option<i64>) -> String {
    match ms {
        None => "—".to_owned(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
    }
}

/// A typed number that is not a whole number.
#[derive(Debug, PartialEq, Eq)]
pub struct NotAWholeNumber;

/// A whole number as a person types it: `5000`, `5,000`, `5 000` or `5_000` (the pages show
/// numbers with separators, so a copied one must read back). Empty is `None`.
pub fn parse_whole(s: &str) -> Result<Option<i64>, NotAWholeNumber> {
    let digits: String = s
        .trim()
        .chars()
        .filter(|c| !matches!(c, ',' | '_' | ' ' | '\u{a0}' | '\u{202f}'))
        .collect();
    if digits.is_empty() {
        return Ok(None);
    }
    digits.parse::<i64>().map(Some).map_err(|_| NotAWholeNumber)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_read_back_with_their_separators() {
        assert_eq!(parse_whole(""), Ok(None));
        assert_eq!(parse_whole("  "), Ok(None));
        assert_eq!(parse_whole("5000"), Ok(Some(5000)));
        assert_eq!(parse_whole("5,000"), Ok(Some(5000)));
        assert_eq!(parse_whole(" 1 234 567 "), Ok(Some(1_234_567)));
        assert_eq!(parse_whole("-12"), Ok(Some(-12)));
        assert_eq!(parse_whole("1.5"), Err(NotAWholeNumber));
        assert_eq!(parse_whole("ten"), Err(NotAWholeNumber));
        assert_eq!(parse_whole("99999999999999999999"), Err(NotAWholeNumber));
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1234), "-1,234");
        assert_eq!(thousands(i64::MIN), "-9,223,372,036,854,775,808");
    }
}
