//! A Prometheus text format (0.0.4) parser, written here independently of the exporter, so a
//! malformed line, an untyped sample or an inconsistent histogram fails the test that scrapes.

use std::collections::{BTreeMap, HashMap};

use super::app::{TestApp, ADMIN_TOKEN};

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug)]
pub struct Exposition {
    /// `# TYPE` of each family.
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// `{a="x",b="y\"z"}` → labels; the rest of the line after the closing brace.
fn parse_labels(s: &str, line: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut chars = s.chars().peekable();
    assert_eq!(chars.next(), Some('{'), "line {line:?}");
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek() == Some(&'}') {
            chars.next();
            break;
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        assert!(valid_label_name(&name), "label name {name:?} in {line:?}");
        assert_eq!(chars.next(), Some('='), "line {line:?}");
        assert_eq!(chars.next(), Some('"'), "line {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        assert!(
            labels.insert(name.clone(), value).is_none(),
            "label {name} twice in {line:?}"
        );
        match chars.next() {
            Some(',') => continue,
            Some('}') => break,
            other => panic!("expected , or }} but got {other:?} in {line:?}"),
        }
    }
    (labels, chars.collect())
}

/// The family a sample belongs to: its own name, or a histogram's/summary's base name.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base;
            }
        }
    }
    name
}

/// Parses the text format, failing the test on anything Prometheus would refuse.
pub fn parse(text: &str) -> Exposition {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut seen_samples_of: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(valid_metric_name(name), "HELP name in {line:?}");
            assert!(
                helps.insert(name.into(), help.into()).is_none(),
                "second HELP for {name}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
            assert!(valid_metric_name(name), "TYPE name in {line:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "type in {line:?}"
            );
            assert!(
                !seen_samples_of.iter().any(|n| n == name),
                "TYPE for {name} after its samples"
            );
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "second TYPE for {name}"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(valid_metric_name(name), "sample name in {line:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (BTreeMap::new(), line[name_end..].to_owned())
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing text in {line:?}");
        let family = family_of(name, &types).to_owned();
        let kind = types
            .get(&family)
            .unwrap_or_else(|| panic!("sample {name} has no TYPE line before it"));
        if kind == "counter" {
            assert!(value >= 0.0, "negative counter in {line:?}");
        }
        seen_samples_of.push(family);
        samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    let exposition = Exposition { types, samples };
    exposition.check_histograms();
    exposition
}

impl Exposition {
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples named `name` carrying all of `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one sample named `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .matching(name, labels)
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} is not unique");
        found.first().map(|s| s.value)
    }

    /// Every histogram series: buckets cumulative, `+Inf` present and equal to `_count`.
    fn check_histograms(&self) {
        for (family, _) in self.types.iter().filter(|(_, t)| *t == "histogram") {
            let bucket_name = format!("{family}_bucket");
            let mut series: HashMap<BTreeMap<String, String>, Vec<(f64, f64)>> = HashMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket_name) {
                let mut labels = s.labels.clone();
                let le = labels.remove("le").expect("bucket has le");
                let le = parse_value(&le).expect("le is a number");
                series.entry(labels).or_default().push((le, s.value));
            }
            for (labels, mut buckets) in series {
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                assert!(
                    buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                    "{family} {labels:?}: buckets not cumulative"
                );
                let inf = buckets.last().expect("buckets");
                assert!(inf.0.is_infinite(), "{family} {labels:?}: no +Inf bucket");
                let pairs: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let count = self
                    .get(&format!("{family}_count"), &pairs)
                    .expect("histogram _count");
                assert_eq!(inf.1, count, "{family} {labels:?}: +Inf != _count");
                assert!(
                    self.get(&format!("{family}_sum"), &pairs).is_some(),
                    "{family} {labels:?}: no _sum"
                );
            }
        }
    }
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

/// `GET url` (with `token`, if any): a 200 in the text format, parsed.
pub async fn scrape_url(client: &reqwest::Client, url: &str, token: Option<&str>) -> Exposition {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("scrape");
    assert_eq!(res.status(), 200, "scrape status");
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with(PROMETHEUS_TEXT), "content-type {ct}");
    parse(&res.text().await.unwrap())
}

/// The app's `/metrics` (with the admin token), parsed.
pub async fn scrape(app: &TestApp) -> Exposition {
    scrape_url(&app.client, &app.url("/metrics"), Some(ADMIN_TOKEN)).await
}

/// The app's `/metrics` (with the admin token) as raw text, for a test that looks for one line.
pub async fn metrics_text(app: &TestApp) -> String {
    app.admin_get("/metrics")
        .await
        .text()
        .await
        .expect("the metrics text")
}
