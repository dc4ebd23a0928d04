//! The reading pages: the overview (with the low-balance banner of `credits::alerts`),
//! usage per day or hour and per key (with its CSV) and jobs. Each reads through the
//! same domain functions as `GET /v1/usage` and `GET /v1/jobs` (`credits::report`,
//! `jobs::queue`), for the signed-in account only.

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use super::chart;
use super::format::{maybe_time, millis, thousands, time};
use super::layout::{notices, page, respond, Nav, Notice};
use super::{state, ConsoleError, Owner, Result, BASE};
use crate::auth::key_actions;
use crate::auth::key_store::KeyView;
use crate::credits::alerts;
use crate::credits::report::{self, Granularity, Usage, UsageFilter, UsageWindow};
use crate::jobs::queue::{self as jobs, Job};

fn db_err(e: impl std::error::Error + Send + Sync + 'static) -> ConsoleError {
    ConsoleError::Internal(anyhow::Error::new(e))
}

/// Today's UTC midnight.
fn today() -> DateTime<Utc> {
    Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map_or_else(Utc::now, |t| t.and_utc())
}

/// How many keys the usage page offers to choose from (the newest).
const KEYS_LISTED: i64 = 100;

fn status_badge(status: &str) -> Markup {
    html! { span class={"state " (status)} { (status) } }
}

fn jobs_table(jobs: &[Job]) -> Markup {
    html! {
        div.table-wrap {
            table {
                thead { tr {
                    th scope="col" { "Created" } th scope="col" { "URL" } th scope="col" { "Formats" }
                    th scope="col" { "Status" } th scope="col" class="num" { "Cost" } th scope="col" { "Credits" }
                } }
                tbody {
                    @for j in jobs {
                        tr {
                            td { a href={(BASE) "/jobs/" (j.id)} { (time(j.created_at)) } }
                            td.url { (j.url) }
                            td { (j.formats.join(", ")) }
                            td { (status_badge(&j.status)) }
                            td.num { (thousands(j.cost)) }
                            td { @if j.refunded { "refunded" } @else if j.charged { "charged" } @else { "free" } }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /console/`
pub async fn overview(req: HttpRequest, owner: Owner) -> Result<HttpResponse> {
    let state = state(&req)?;
    let a = &owner.account;
    let tier = state.tiers.get_or_default(&a.tier);
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let now = Utc::now();
    const DAYS: i64 = 30;
    let from = today() - Duration::days(DAYS - 1);
    let window = UsageWindow::new(Granularity::Day, Some(from), Some(now), now).map_err(db_err)?;
    let usage = report::usage(&client, a.id, window).await.map_err(db_err)?;
    let recent = jobs::list(&client, a.id, None, None, 5)
        .await
        .map_err(db_err)?;
    // The same test as `balance.low` (the account's own threshold, else its tier's).
    let alert = alerts::get(&client, &state.tiers, a.id)
        .await
        .map_err(db_err)?;
    let body = html! {
        h1 { "Overview" }
        @if a.credit_balance <= 0 {
            p.notice.error role="alert" {
                "Your balance is " (thousands(a.credit_balance)) " credits: paid calls are refused until it is positive. "
                a href={(BASE) "/billing"} { "Buy credits" } "."
            }
        } @else if alert.below_threshold {
            p.notice.warn #low-balance role="alert" {
                "Your balance of " (thousands(alert.balance)) " credits is below your low-balance threshold of "
                (thousands(alert.low_balance_threshold)) " credits"
                @if alert.low_balance_threshold_source == "tier" { " (your tier's default)" }
                ". " a href={(BASE) "/billing"} { "Buy credits" } " or "
                a href={(BASE) "/settings#alerts"} { "change the threshold" } "."
            }
        }
        div.grid {
            section.card.balance-card aria-labelledby="balance-title" {
                h2 #balance-title { "Balance" }
                p.balance data-balance=(a.credit_balance) { (thousands(a.credit_balance)) span.unit { " credits" } }
                p.muted { "Tier " strong { (a.tier) } }
                a.button href={(BASE) "/billing"} { "Buy credits" }
            }
            section.card aria-labelledby="buys-title" {
                h2 #buys-title { "What it buys at your tier's prices" }
                ul.buys {
                    @for (format, price) in &tier.prices {
                        li {
                            @if *price <= 0 {
                                code { (format) } " jobs are free"
                            } @else {
                                strong { (thousands(a.credit_balance.max(0) / price)) } " "
                                code { (format) } " jobs (" (thousands(*price)) " credit" @if *price != 1 { "s" } " each)"
                            }
                        }
                    }
                }
                p.muted { "A job costs the sum of its formats' prices, and failed jobs are refunded." }
            }
        }
        section.card aria-labelledby="chart-title" {
            h2 #chart-title { "Usage, last 30 days" }
            (chart::daily(&usage.buckets, from, DAYS))
            p { a href={(BASE) "/usage"} { "Usage details and CSV" } }
        }
        section.card aria-labelledby="jobs-title" {
            h2 #jobs-title { "Latest jobs" }
            @if recent.is_empty() {
                p { "No jobs yet. Start one with " code { "POST /v1/scrape" } " — see " a href="/docs" { "the API reference" } "." }
            } @else {
                (jobs_table(&recent))
                p { a href={(BASE) "/jobs"} { "All jobs" } }
            }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page("Overview", Some(&owner), Nav::Overview, body),
    ))
}

#[derive(Deserialize, Default)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
    /// One key's usage only (its id); empty: every key's.
    key: Option<String>,
    /// `key`: one row per key in each bucket.
    split: Option<String>,
}

impl UsageQuery {
    fn key(&self) -> Option<&str> {
        self.key.as_deref().map(str::trim).filter(|k| !k.is_empty())
    }

    fn split(&self) -> bool {
        self.split.as_deref() == Some("key")
    }
}

/// What a usage query asks for, checked: the window, its dates as the form shows them, and
/// which keys' rows.
struct UsageAsk {
    window: UsageWindow,
    from: String,
    to: String,
    filter: UsageFilter,
}

/// The window a usage query asks for: dates are whole UTC days, `to` included. Defaults:
/// the last 30 days by day, the last 2 days by hour.
fn usage_ask(q: &UsageQuery) -> std::result::Result<UsageAsk, String> {
    let granularity = match q.granularity.as_deref().unwrap_or("day") {
        "day" | "" => Granularity::Day,
        "hour" => Granularity::Hour,
        _ => return Err("Choose days or hours.".into()),
    };
    let date = |s: &Option<String>, what: &str| -> std::result::Result<Option<NaiveDate>, String> {
        match s.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(d) => NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .map(Some)
                .map_err(|_| format!("The {what} date must look like 2026-11-30.")),
        }
    };
    let to_day = date(&q.to, "end")?.unwrap_or_else(|| Utc::now().date_naive());
    let default_days = if granularity == Granularity::Day {
        29
    } else {
        1
    };
    let from_day = date(&q.from, "start")?.unwrap_or(to_day - Duration::days(default_days));
    let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    let (Some(from), Some(to)) = (midnight(from_day), midnight(to_day + Duration::days(1))) else {
        return Err("That date is out of range.".into());
    };
    let window =
        UsageWindow::new(granularity, Some(from), Some(to), Utc::now()).map_err(|e| match e {
            crate::credits::Error::EmptyRange => {
                "The start must be on or before the end.".to_owned()
            }
            other => format!("{} Choose a shorter range.", capitalise(&other.to_string())),
        })?;
    let filter = UsageFilter::parse(q.split().then_some("key"), q.key())
        .map_err(|_| "Choose one of your keys, or all keys.".to_owned())?;
    Ok(UsageAsk {
        window,
        from: from_day.to_string(),
        to: to_day.to_string(),
        filter,
    })
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

async fn read_usage(req: &HttpRequest, owner: &Owner, ask: &UsageAsk) -> Result<Usage> {
    let state = state(req)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    report::usage_filtered(&client, owner.account.id, ask.window, &ask.filter)
        .await
        .map_err(db_err)
}

/// A key's name for the usage page: `name (km_live_<id>_…)`, or what a row without a key
/// (written before keys were recorded on the ledger) or an unknown one is.
fn key_label(keys: &[KeyView], id: Option<&str>) -> Markup {
    match id {
        None => html! { span.muted { "no key recorded" } },
        Some(id) => match keys.iter().find(|k| k.id == id) {
            Some(k) => html! { (k.name) " " code { (k.id) } },
            None => html! { code { (id) } },
        },
    }
}

/// `GET /console/usage`
pub async fn usage(
    req: HttpRequest,
    owner: Owner,
    q: web::Query<UsageQuery>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let mut keys = key_actions::list(&state.db, owner.account.id, KEYS_LISTED, None).await?;
    keys.truncate(KEYS_LISTED as usize);
    let parsed = usage_ask(&q);
    let (form_from, form_to, hourly) = match &parsed {
        Ok(a) => (
            a.from.clone(),
            a.to.clone(),
            a.window.granularity == Granularity::Hour,
        ),
        Err(_) => (
            q.from.clone().unwrap_or_default(),
            q.to.clone().unwrap_or_default(),
            q.granularity.as_deref() == Some("hour"),
        ),
    };
    let chosen_key = q.key().unwrap_or_default().to_owned();
    let split = q.split();
    let (status, result) = match parsed {
        Ok(ask) => (StatusCode::OK, Ok(read_usage(&req, &owner, &ask).await?)),
        Err(msg) => (StatusCode::UNPROCESSABLE_ENTITY, Err(msg)),
    };
    let csv_query = serde_urlencoded::to_string([
        ("from", form_from.as_str()),
        ("to", form_to.as_str()),
        ("granularity", if hourly { "hour" } else { "day" }),
        ("key", chosen_key.as_str()),
        ("split", if split { "key" } else { "" }),
    ])
    .unwrap_or_default();
    let body = html! {
        h1 { "Usage" }
        section.card {
            form.filters method="get" action={(BASE) "/usage"} {
                div.field {
                    label for="u-from" { "From (UTC date)" }
                    input #u-from type="date" name="from" value=(form_from);
                }
                div.field {
                    label for="u-to" { "To (UTC date, included)" }
                    input #u-to type="date" name="to" value=(form_to);
                }
                div.field {
                    label for="u-gran" { "Per" }
                    select #u-gran name="granularity" {
                        option value="day" selected[!hourly] { "day" }
                        option value="hour" selected[hourly] { "hour" }
                    }
                }
                div.field {
                    label for="u-key" { "Key" }
                    select #u-key name="key" {
                        option value="" selected[chosen_key.is_empty()] { "all keys" }
                        @for k in &keys {
                            option value=(k.id) selected[k.id == chosen_key] { (k.name) " (" (k.id) ")" }
                        }
                    }
                }
                div.field.check {
                    input #u-split type="checkbox" name="split" value="key" checked[split];
                    label for="u-split" { "One row per key" }
                }
                button type="submit" { "Show" }
            }
            p.muted { "Days up to 366, hours up to 31 days. Each charge and refund is counted for the key that made it." }
        }
        @match &result {
            Err(msg) => { (notices(&[Notice::Error(msg.clone())])) }
            Ok(u) => {
                section.card {
                    h2 { "Totals" }
                    p #usage-totals { strong { (thousands(u.charged)) } " credits charged, "
                        strong { (thousands(u.refunded)) } " refunded, "
                        strong { (thousands(u.charged - u.refunded)) } " net." }
                    p { a.button.secondary href={(BASE) "/usage.csv?" (csv_query)} download { "Download CSV" } }
                    @if u.buckets.is_empty() {
                        p { "Nothing was charged or refunded in this range." }
                    } @else {
                        div.table-wrap {
                            table #usage-table {
                                thead { tr {
                                    th scope="col" { @if hourly { "Hour" } @else { "Day" } }
                                    @if split { th scope="col" { "Key" } }
                                    th.num scope="col" { "Charged" } th.num scope="col" { "Refunded" }
                                    th.num scope="col" { "Net" } th.num scope="col" { "Charges" } th.num scope="col" { "Refunds" }
                                } }
                                tbody {
                                    @for b in &u.buckets {
                                        tr {
                                            td { (time(b.start)) }
                                            @if split { td { (key_label(&keys, b.key_id.as_ref().and_then(|k| k.as_deref()))) } }
                                            td.num { (thousands(b.charged)) }
                                            td.num { (thousands(b.refunded)) }
                                            td.num { (thousands(b.net)) }
                                            td.num { (thousands(b.charges)) }
                                            td.num { (thousands(b.refunds)) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(respond(
        status,
        page("Usage", Some(&owner), Nav::Usage, body),
    ))
}

/// `GET /console/usage.csv`: the same report as a file, written by the same function as
/// `GET /v1/usage?format=csv` (plain numbers, RFC 3339 UTC times, `key_id` when split).
pub async fn usage_csv(
    req: HttpRequest,
    owner: Owner,
    q: web::Query<UsageQuery>,
) -> Result<HttpResponse> {
    let ask = match usage_ask(&q) {
        Ok(a) => a,
        Err(msg) => {
            return Ok(super::layout::error_page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "That range cannot be reported",
                &msg,
            ))
        }
    };
    let u = read_usage(&req, &owner, &ask).await?;
    // Only `0-9A-Za-z` (a key id's alphabet, checked by the filter) reaches the file name.
    let key = ask
        .filter
        .key_id
        .as_deref()
        .map(|k| format!("-{k}"))
        .unwrap_or_default();
    Ok(HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"keymeter-usage-{}{key}-{}-{}.csv\"",
                ask.window.granularity.as_str(),
                ask.from,
                ask.to
            ),
        ))
        .body(report::csv(&u.buckets, ask.filter.by_key)))
}

#[derive(Deserialize)]
pub struct JobsQuery {
    status: Option<String>,
    before: Option<String>,
}

const JOB_STATUSES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];
const JOBS_PER_PAGE: i64 = 25;

/// `GET /console/jobs`
pub async fn jobs(
    req: HttpRequest,
    owner: Owner,
    q: web::Query<JobsQuery>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let status = q.status.as_deref().filter(|s| JOB_STATUSES.contains(s));
    // The page before: the job whose (created_at, id) the list continues after.
    let before = match q.before.as_deref().map(Uuid::parse_str) {
        Some(Ok(id)) => jobs::get(&client, owner.account.id, id)
            .await
            .map_err(db_err)?
            .map(|j| (j.created_at, j.id)),
        _ => None,
    };
    let mut list = jobs::list(&client, owner.account.id, status, before, JOBS_PER_PAGE)
        .await
        .map_err(db_err)?;
    let more = list.len() as i64 > JOBS_PER_PAGE;
    list.truncate(JOBS_PER_PAGE as usize);
    let next = more.then(|| {
        let last = list.last().map(|j| j.id.to_string()).unwrap_or_default();
        let mut q = vec![("before", last)];
        if let Some(s) = status {
            q.push(("status", s.to_owned()));
        }
        serde_urlencoded::to_string(q).unwrap_or_default()
    });
    let body = html! {
        h1 { "Jobs" }
        section.card {
            form.filters method="get" action={(BASE) "/jobs"} {
                div.field {
                    label for="j-status" { "Status" }
                    select #j-status name="status" {
                        option value="" { "any" }
                        @for s in JOB_STATUSES {
                            @if Some(s) == status { option value=(s) selected { (s) } }
                            @else { option value=(s) { (s) } }
                        }
                    }
                }
                button type="submit" { "Filter" }
            }
            @if list.is_empty() {
                p { "No jobs" @if let Some(s) = status { " with status " (s) } "." }
            } @else {
                (jobs_table(&list))
            }
            @if let Some(n) = next {
                p { a href={(BASE) "/jobs?" (n)} { "Older jobs" } }
            }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page("Jobs", Some(&owner), Nav::Jobs, body),
    ))
}

/// How much of a result the page shows; the API has the whole of it.
const PREVIEW_CHARS: usize = 4000;

/// `GET /console/jobs/{id}`
pub async fn job(req: HttpRequest, owner: Owner, id: web::Path<String>) -> Result<HttpResponse> {
    let state = state(&req)?;
    let id = Uuid::parse_str(&id).map_err(|_| ConsoleError::NotFound)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let j = jobs::get(&client, owner.account.id, id)
        .await
        .map_err(db_err)?
        .ok_or(ConsoleError::NotFound)?;
    let preview = |v: &serde_json::Value| {
        let s = serde_json::to_string_pretty(v).unwrap_or_default();
        if s.chars().count() > PREVIEW_CHARS {
            format!("{}\n…", s.chars().take(PREVIEW_CHARS).collect::<String>())
        } else {
            s
        }
    };
    let body = html! {
        h1 { "Job" }
        section.card {
            dl.facts {
                dt { "Id" } dd { code { (j.id) } }
                dt { "URL" } dd.url { (j.url) }
                dt { "Status" } dd { (status_badge(&j.status)) }
                dt { "Mode" } dd { (j.mode) }
                dt { "Formats" } dd { (j.formats.join(", ")) }
                dt { "Cost" } dd { (thousands(j.cost)) " credit" @if j.cost != 1 { "s" } " — "
                    @if j.refunded { "charged, then refunded" } @else if j.charged { "charged" } @else { "free" } }
                dt { "Attempts" } dd { (j.attempts) }
                dt { "Created" } dd { (time(j.created_at)) }
                dt { "Started" } dd { (maybe_time(j.started_at)) }
                dt { "Finished" } dd { (maybe_time(j.finished_at)) }
                dt { "Queued for" } dd { (millis(j.timings.queued_ms)) }
                dt { "Ran for" } dd { (millis(j.timings.run_ms)) }
                dt { "Total" } dd { (millis(j.timings.total_ms)) }
            }
        }
        @if let Some(e) = &j.error {
            section.card {
                h2 { "Error" }
                pre { (preview(e)) }
            }
        }
        @if let Some(r) = &j.result {
            section.card {
                h2 { "Result (preview)" }
                pre.result { (preview(r)) }
                p.muted { "The whole result: " code { "GET /v1/jobs/" (j.id) } "." }
            }
        }
        p { a href={(BASE) "/jobs"} { "All jobs" } }
    };
    Ok(respond(
        StatusCode::OK,
        page("Job", Some(&owner), Nav::Jobs, body),
    ))
}
