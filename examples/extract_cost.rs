//! What extracting a page costs, and what moving it off the async workers costs (issue 14,
//! direction 5): `cargo run --release --example extract_cost -- PAGE.html [FORMATS]`
//! (FORMATS: comma-separated, default `metadata`; e.g. `curl -s $UPSTREAM/page > page.html`).
//!
//! Prints, per call: `extract` inline, the same through `tokio::task::spawn_blocking` (what
//! the workers do), and an empty `spawn_blocking` (the hand-off alone). A job's extraction
//! blocks an async worker only if it runs inline; whether running it inline would be worth
//! it is the difference between the first two rows.

use std::time::{Duration, Instant};

use bytes::Bytes;
use keymeter::jobs::extract::{extract, ExtractLimits, Format};
use keymeter::jobs::fetch::Fetched;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: extract_cost PAGE.html [FORMATS]"))?;
    let formats: Vec<Format> = args
        .next()
        .unwrap_or_else(|| "metadata".into())
        .split(',')
        .map(|f| serde_json::from_value(serde_json::Value::String(f.trim().to_owned())))
        .collect::<Result<_, _>>()?;
    let body = Bytes::from(std::fs::read(&path)?);
    let page = Fetched {
        url: "http://127.0.0.1/page".parse()?,
        status: 200,
        content_type: Some("text/html; charset=utf-8".into()),
        body,
        truncated: false,
        redirects: Vec::new(),
    };
    let limits = ExtractLimits::default();
    let n = 2_000u32;
    for _ in 0..200 {
        std::hint::black_box(extract(&page, &formats, &limits));
    }
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(extract(&page, &formats, &limits));
    }
    let inline = t.elapsed() / n;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (blocking, handoff) = rt.block_on(async {
        let page = std::sync::Arc::new(page);
        let time = |work: bool| {
            let (page, formats, limits) = (page.clone(), formats.clone(), limits.clone());
            async move {
                let t = Instant::now();
                for _ in 0..n {
                    let (page, formats, limits) = (page.clone(), formats.clone(), limits.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        if work {
                            std::hint::black_box(extract(&page, &formats, &limits));
                        }
                    })
                    .await;
                }
                t.elapsed() / n
            }
        };
        let blocking: Duration = time(true).await;
        let handoff: Duration = time(false).await;
        (blocking, handoff)
    });
    println!(
        "page {} bytes, formats {formats:?}, {n} calls each",
        page_len(&path)
    );
    println!("extract inline:                {inline:>10.1?} per call");
    println!("extract via spawn_blocking:    {blocking:>10.1?} per call");
    println!("empty spawn_blocking hand-off: {handoff:>10.1?} per call");
    Ok(())
}

fn page_len(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
