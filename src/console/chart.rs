//! The overview's usage chart: charges and refunds per day for the last 30 days, drawn as SVG
//! on the server (no chart library, no script). Each day is a focusable group whose label
//! and `<title>` carry its numbers, and whose figure the stylesheet shows on hover and on
//! keyboard focus, so the numbers are reachable by mouse, keyboard and screen reader alike.

use chrono::{DateTime, Duration, Utc};
use maud::{html, Markup};

use super::format::thousands;
use crate::credits::report::UsageBucket;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 200.0;
const PAD_TOP: f64 = 28.0;
const PAD_BOTTOM: f64 = 22.0;

/// One bar per day from `from` (a UTC midnight) for `days` days; days without movements are
/// zero-height bars (still focusable: "0 charged" is an answer too).
pub fn daily(buckets: &[UsageBucket], from: DateTime<Utc>, days: i64) -> Markup {
    let per_day: Vec<(DateTime<Utc>, i64, i64)> = (0..days)
        .map(|i| {
            let day = from + Duration::days(i);
            let b = buckets.iter().find(|b| b.start == day);
            (day, b.map_or(0, |b| b.charged), b.map_or(0, |b| b.refunded))
        })
        .collect();
    let max = per_day
        .iter()
        .map(|(_, c, r)| (*c).max(*r))
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = WIDTH / days.max(1) as f64;
    let bar = (slot * 0.38).max(2.0);
    let plot = HEIGHT - PAD_TOP - PAD_BOTTOM;
    let h = |v: i64| (v as f64 / max as f64) * plot;
    let total_charged: i64 = per_day.iter().map(|d| d.1).sum();
    let total_refunded: i64 = per_day.iter().map(|d| d.2).sum();
    html! {
        figure.chart {
            svg viewBox={"0 0 " (WIDTH) " " (HEIGHT)} role="group"
                aria-label={"Credits charged and refunded per day, last " (days) " days"} {
                line.axis x1="0" y1=(HEIGHT - PAD_BOTTOM) x2=(WIDTH) y2=(HEIGHT - PAD_BOTTOM) {}
                @for (i, (day, charged, refunded)) in per_day.iter().enumerate() {
                    @let x = i as f64 * slot + slot * 0.1;
                    @let label = format!("{}: {} charged, {} refunded",
                        day.format("%b %-d"), thousands(*charged), thousands(*refunded));
                    g.bar tabindex="0" role="img" aria-label=(label) {
                        title { (label) }
                        rect.hit x=(x - slot * 0.1) y="0" width=(slot) height=(HEIGHT - PAD_BOTTOM) {}
                        rect.charged x=(x) y=(HEIGHT - PAD_BOTTOM - h(*charged)) width=(bar) height=(h(*charged)) {}
                        rect.refunded x=(x + bar) y=(HEIGHT - PAD_BOTTOM - h(*refunded)) width=(bar) height=(h(*refunded)) {}
                        text.tip x=(((x + bar).clamp(60.0, WIDTH - 60.0))) y="16" text-anchor="middle" {
                            (label)
                        }
                    }
                    @if i % 7 == 0 {
                        text.tick x=(x) y=(HEIGHT - 6.0) { (day.format("%b %-d")) }
                    }
                }
            }
            figcaption {
                span.key.charged-key { "charged" } " "
                span.key.refunded-key { "refunded" }
                " — last " (days) " days: " (thousands(total_charged)) " charged, "
                (thousands(total_refunded)) " refunded (UTC days)."
            }
        }
    }
}
