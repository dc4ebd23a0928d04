//! Cursor pagination, newest first: a cursor names the last item a page showed (its time and
//! id), so pages stay stable while new items arrive — unlike offsets.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    #[param(pattern = "^-?[0-9]{1,16}_[A-Za-z0-9-]{1,64}$")]
    pub cursor: Option<String>,
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

    pub fn decode(s: &str) -> Result<Cursor, ApiError> {
        let bad = || ApiError::InvalidRequest("The cursor is not one this API returned.".into());
        let (micros, id) = s.split_once('_').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad());
        }
        let at = Utc.timestamp_micros(micros).single().ok_or_else(bad)?;
        Ok(Cursor {
            at,
            id: id.to_owned(),
        })
    }
}

impl PageQuery {
    pub fn limit(&self) -> Result<i64, ApiError> {
        let l = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&l) {
            return Err(ApiError::validation(
                "limit",
                format!("limit must be between 1 and {MAX_LIMIT}."),
            ));
        }
        Ok(l)
    }

    pub fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.cursor.as_deref().map(Cursor::decode).transpose()
    }
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
