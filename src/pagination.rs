//! What a list route accepts from a client, parsed and range-checked in one place: the page
//! (`limit`, `cursor`) and the time range (`from`, `to`).
//!
//! Cursor pagination, newest first: a cursor names the last item a page showed (its time and
//! id), so pages stay stable while new items arrive — unlike offsets.
//!
//! Every instant a client can name — a date, an RFC 3339 time, the time inside a cursor —
//! must fall in [`EARLIEST`, `LATEST`]: the years RFC 3339 can write (0000–9999). That range
//! sits well inside chrono's (±262,143 years) and PostgreSQL's (4713 BC – 294276 AD), with
//! room for the date arithmetic the routes do (a 30-day default, a 366-day window). So a
//! client's value can neither overflow chrono (a panic) nor reach PostgreSQL out of range (a
//! "timestamp out of range" 500): it is refused here with `422 validation_failed` naming the
//! parameter, before any route does anything with it.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

/// 0000-01-01T00:00:00Z, in Unix seconds: the earliest instant a client may name.
pub const EARLIEST: i64 = -62_167_219_200;
/// 9999-12-31T23:59:59Z, in Unix seconds (its fraction included): the latest.
pub const LATEST: i64 = 253_402_300_799;

/// Whether `t` is inside the range every client-supplied instant must be in.
pub fn in_range(t: &DateTime<Utc>) -> bool {
    (EARLIEST..=LATEST).contains(&t.timestamp())
}

/// Why a client's page or time range was refused. Each message names the parameter, and
/// [`Error::field`] says which one it was (the HTTP layer reports it as `field`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a cursor of our shape (or one whose id is not of the list's kind).
    #[error("The cursor is not one this API returned.")]
    BadCursor,
    /// A cursor, `from` or `to` whose instant is outside [`EARLIEST`, `LATEST`].
    #[error("{field} must be between 0000-01-01 and 9999-12-31 (UTC).")]
    OutOfRange { field: &'static str },
    #[error("limit must be a whole number between 1 and {MAX_LIMIT}.")]
    BadLimit,
    #[error("{field} must be a date (2026-11-23) or an RFC 3339 time.")]
    BadTime { field: &'static str },
}

impl Error {
    /// The parameter that was refused; `None` for a cursor that is not ours at all (a
    /// client cannot fix that one by changing a value, only by using a cursor we gave it).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::BadCursor => None,
            Error::OutOfRange { field } | Error::BadTime { field } => Some(field),
            Error::BadLimit => Some("limit"),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(pattern = "^-?[0-9]{1,16}_[A-Za-z0-9-]{1,64}$")]
    pub cursor: Option<String>,
}

/// A list route's `limit` and `cursor`, checked in that order (so a route with its own
/// query struct — one with filters besides the page — parses the page in one call).
pub fn page(limit: Option<&str>, cursor: Option<&str>) -> Result<(i64, Option<Cursor>), Error> {
    Ok((parse_limit(limit)?, cursor.map(Cursor::decode).transpose()?))
}

#[derive(Debug, Clone)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub id: String,
}

impl Cursor {
    pub fn encode(at: DateTime<Utc>, id: &str) -> String {
        format!("{}_{}", at.timestamp_micros(), id)
    }

    /// A cursor that is not of our shape is [`Error::BadCursor`] (the API's
    /// `400 invalid_request`); one of our shape whose time is outside the accepted range (a
    /// number past `i64`, a year before 0000 or after 9999) is [`Error::OutOfRange`] naming
    /// `cursor` (`422 validation_failed`).
    pub fn decode(s: &str) -> Result<Cursor, Error> {
        let bad = || Error::BadCursor;
        let (micros, id) = s.split_once('_').ok_or_else(bad)?;
        let digits = micros.strip_prefix('-').unwrap_or(micros);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad());
        }
        let at = micros
            .parse::<i64>()
            .ok()
            .and_then(|m| Utc.timestamp_micros(m).single())
            .filter(in_range)
            .ok_or(Error::OutOfRange { field: "cursor" })?;
        Ok(Cursor {
            at,
            id: id.to_owned(),
        })
    }

    /// The id part read as the route's id type (a ledger row's number, a job's UUID): one
    /// that does not parse is not a cursor this API returned ([`Error::BadCursor`]).
    pub fn id_as<T: std::str::FromStr>(&self) -> Result<T, Error> {
        self.id.parse().map_err(|_| Error::BadCursor)
    }
}

/// `limit`: a whole number from 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent. Taken as
/// text so that anything else — `abc`, `1e3`, a number past `i64` — is the same
/// [`Error::BadLimit`] (a `422` naming `limit`), not a query-string error.
pub fn parse_limit(raw: Option<&str>) -> Result<i64, Error> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or(Error::BadLimit)
}

impl PageQuery {
    pub fn limit(&self) -> Result<i64, Error> {
        parse_limit(self.limit.as_deref())
    }

    pub fn cursor(&self) -> Result<Option<Cursor>, Error> {
        self.cursor.as_deref().map(Cursor::decode).transpose()
    }
}

/// `from` (inclusive) and `to` (exclusive), each optional, each checked by [`parse_time`].
/// What a route does with them (defaults, order, the longest span) stays the route's.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeRange {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl TimeRange {
    pub fn parse(from: Option<&str>, to: Option<&str>) -> Result<TimeRange, Error> {
        Ok(TimeRange {
            from: from.map(|s| parse_time("from", s)).transpose()?,
            to: to.map(|s| parse_time("to", s)).transpose()?,
        })
    }
}

/// `2026-11-23` (midnight UTC) or an RFC 3339 time, inside the accepted range. chrono's
/// `%Y` also reads signed years of any width (`-262143-01-01`): the range check is what
/// keeps those out.
pub fn parse_time(field: &'static str, s: &str) -> Result<DateTime<Utc>, Error> {
    let t = if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&Utc)
    } else {
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc())
            .ok_or(Error::BadTime { field })?
    };
    if !in_range(&t) {
        return Err(Error::OutOfRange { field });
    }
    Ok(t)
}

/// The OpenAPI schema of what [`parse_time`] accepts: a date or an RFC 3339 date-time.
pub fn time_param_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{
        KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
    };
    let string = |format| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(format)))
    };
    Schema::OneOf(
        OneOfBuilder::new()
            .description(Some(
                "A date (`2026-11-23`, meaning midnight UTC) or an RFC 3339 time, between \
                 0000-01-01 and 9999-12-31.",
            ))
            .item(string(KnownFormat::Date))
            .item(string(KnownFormat::DateTime))
            .build(),
    )
}

/// A page of items: `{data, has_more, next_cursor}` (Stripe's shape, plus the cursor).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// `items` was fetched with `limit + 1` rows; the extra one only says there is more.
    pub fn from_overfetch(
        mut items: Vec<T>,
        limit: i64,
        key: impl Fn(&T) -> (DateTime<Utc>, String),
    ) -> Page<T> {
        let has_more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        let next_cursor = if has_more {
            items.last().map(|t| {
                let (at, id) = key(t);
                Cursor::encode(at, &id)
            })
        } else {
            None
        };
        Page {
            data: items,
            has_more,
            next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn refused_field(e: &Error) -> Option<&'static str> {
        e.field()
    }

    #[test]
    fn the_bounds_are_the_first_and_last_second_of_years_0000_to_9999() {
        let at = |y, m, d, h, mi, s| {
            NaiveDate::from_ymd_opt(y, m, d)
                .and_then(|d| d.and_hms_opt(h, mi, s))
                .map(|t| t.and_utc().timestamp())
        };
        assert_eq!(at(0, 1, 1, 0, 0, 0), Some(EARLIEST));
        assert_eq!(at(9999, 12, 31, 23, 59, 59), Some(LATEST));
    }

    proptest! {
        #[test]
        fn a_date_is_accepted_exactly_when_its_year_is_0000_to_9999(
            y in prop_oneof![-300_000i32..300_000, -20i32..10_020],
            m in 1u32..=12,
            d in 1u32..=28,
            plus in any::<bool>(),
        ) {
            let sign = if y < 0 { "-" } else if plus && y > 9999 { "+" } else { "" };
            let s = format!("{sign}{:04}-{m:02}-{d:02}", y.unsigned_abs());
            let parsed = parse_time("from", &s);
            prop_assert_eq!(parsed.is_ok(), (0..=9999).contains(&y), "{}", s);
            if let Err(e) = parsed {
                prop_assert_eq!(refused_field(&e), Some("from"));
            }
        }

        #[test]
        fn whatever_the_text_a_time_is_refused_or_in_range(
            s in prop_oneof![
                "(?s).{0,40}",
                "[+-]?[0-9]{1,7}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2}))?",
            ],
        ) {
            match parse_time("to", &s) {
                Ok(t) => prop_assert!(in_range(&t), "{} → {}", s, t),
                Err(e) => prop_assert_eq!(refused_field(&e), Some("to")),
            }
        }

        #[test]
        fn a_cursor_is_refused_or_in_range_and_round_trips(
            micros in prop_oneof![
                any::<i64>(),
                EARLIEST * 1_000_000..=LATEST * 1_000_000 + 999_999,
            ],
            id in "[A-Za-z0-9-]{1,64}",
        ) {
            let text = format!("{micros}_{id}");
            match Cursor::decode(&text) {
                Ok(c) => {
                    prop_assert!(in_range(&c.at));
                    prop_assert_eq!(Cursor::encode(c.at, &c.id), text);
                }
                Err(e) => prop_assert_eq!(refused_field(&e), Some("cursor")),
            }
        }

        #[test]
        fn any_cursor_text_is_refused_or_in_range(s in "(?s).{0,80}|-?[0-9]{15,30}_[a-z0-9-]{1,8}") {
            if let Ok(c) = Cursor::decode(&s) {
                prop_assert!(in_range(&c.at));
            }
        }

        #[test]
        fn a_limit_is_1_to_100_or_refused_naming_limit(s in "(?s).{0,12}|-?[0-9]{1,30}") {
            match parse_limit(Some(&s)) {
                Ok(l) => prop_assert!((1..=MAX_LIMIT).contains(&l)),
                Err(e) => prop_assert_eq!(refused_field(&e), Some("limit")),
            }
        }
    }
}
