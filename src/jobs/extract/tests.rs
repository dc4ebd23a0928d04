use super::*;
use bytes::Bytes;

fn page(url: &str, content_type: Option<&str>, body: &[u8]) -> Fetched {
    Fetched {
        url: Url::parse(url).expect("test URL"),
        status: 200,
        content_type: content_type.map(str::to_owned),
        body: Bytes::copy_from_slice(body),
        truncated: false,
        redirects: Vec::new(),
    }
}

fn html_page(body: &str) -> Fetched {
    page(
        "https://example.com/blog/post?id=1",
        Some("text/html; charset=utf-8"),
        body.as_bytes(),
    )
}

const ALL: &[Format] = &[
    Format::Metadata,
    Format::Text,
    Format::Markdown,
    Format::Links,
    Format::Html,
];

const ARTICLE: &str = r#"<!doctype html>
<html lang="en-GB">
<head>
  <title>  The   Post </title>
  <meta name="Description" content="A post about things.">
  <meta property="og:title" content="OG Post">
  <meta property="og:description" content="OG description">
  <meta property="og:image" content="/img/cover.png">
  <meta property="og:type" content="article">
  <meta property="og:url" content="https://example.com/blog/post">
  <meta property="og:site_name" content="Example">
  <link rel="Canonical" href="/blog/post">
  <style>body { color: red }</style>
  <script>var secret = "do not show";</script>
</head>
<body>
  <h1>Hello <em>world</em></h1>
  <p>First   paragraph
 with <a href="other">a relative link</a>.</p>
  <script>document.write("script text")</script>
  <noscript>Enable JavaScript</noscript>
  <template><p>inert <a href="/template-link">t</a></p></template>
  <ul><li><a href="/abs#section">Absolute</a></li>
  <li><a href="/abs#other">Same page, other fragment</a></li>
  <li><a href="https://other.example/x">External</a></li>
  <li><a href="mailto:me@example.com">Mail</a></li>
  <li><a href="javascript:void(0)">JS</a></li>
  <li><a href="../up">Up</a></li></ul>
  <img src="pic.png" alt="A picture">
</body>
</html>"#;

#[test]
fn metadata_has_title_description_canonical_language_and_open_graph() {
    let out = extract(
        &html_page(ARTICLE),
        &[Format::Metadata],
        &ExtractLimits::default(),
    );
    let m = out.metadata.expect("requested");
    assert_eq!(m.url, "https://example.com/blog/post?id=1");
    assert_eq!(m.status_code, 200);
    assert_eq!(m.content_type.as_deref(), Some("text/html; charset=utf-8"));
    assert_eq!(m.title.as_deref(), Some("The Post"));
    assert_eq!(m.description.as_deref(), Some("A post about things."));
    assert_eq!(
        m.canonical.as_deref(),
        Some("https://example.com/blog/post")
    );
    assert_eq!(m.language.as_deref(), Some("en-GB"));
    assert_eq!(
        m.open_graph,
        OpenGraph {
            title: Some("OG Post".into()),
            description: Some("OG description".into()),
            image: Some("https://example.com/img/cover.png".into()),
            kind: Some("article".into()),
            url: Some("https://example.com/blog/post".into()),
            site_name: Some("Example".into()),
        }
    );
    assert!(!m.truncated);
}

#[test]
fn only_requested_formats_are_present() {
    let out = extract(
        &html_page(ARTICLE),
        &[Format::Links],
        &ExtractLimits::default(),
    );
    let json = serde_json::to_value(&out).expect("serializes");
    let keys: Vec<&String> = json.as_object().expect("object").keys().collect();
    assert_eq!(keys, vec!["links"]);

    let all = serde_json::to_value(extract(&html_page(ARTICLE), ALL, &ExtractLimits::default()))
        .expect("serializes");
    let keys: Vec<&String> = all.as_object().expect("object").keys().collect();
    assert_eq!(keys, vec!["metadata", "text", "markdown", "links", "html"]);
    assert_eq!(all["metadata"]["open_graph"]["type"], "article");

    let formats: Vec<Format> =
        serde_json::from_str(r#"["metadata","text","markdown","links","html"]"#)
            .expect("format names");
    assert_eq!(formats, ALL);
}

#[test]
fn links_are_absolute_http_deduplicated_without_fragments_in_order() {
    let out = extract(
        &html_page(ARTICLE),
        &[Format::Links],
        &ExtractLimits::default(),
    );
    assert_eq!(
        out.links.expect("requested"),
        vec![
            "https://example.com/blog/other",
            "https://example.com/abs",
            "https://other.example/x",
            "https://example.com/up",
        ]
    );
}

#[test]
fn base_href_changes_how_links_resolve() {
    let html = r#"<html><head><base href="https://cdn.example.net/docs/v2/">
        <base href="https://ignored.example/"></head>
        <body><a href="intro">Intro</a> <a href="/root">Root</a>
        <a href="https://example.com/keep#x">Keep</a><area href="map"></body></html>"#;
    let out = extract(
        &html_page(html),
        &[Format::Links],
        &ExtractLimits::default(),
    );
    assert_eq!(
        out.links.expect("requested"),
        vec![
            "https://cdn.example.net/docs/v2/intro",
            "https://cdn.example.net/root",
            "https://example.com/keep",
            "https://cdn.example.net/docs/v2/map",
        ]
    );
    // A relative <base> resolves against the page URL.
    let html = r#"<base href="/other/"><a href="x">x</a>"#;
    let out = extract(
        &html_page(html),
        &[Format::Links],
        &ExtractLimits::default(),
    );
    assert_eq!(
        out.links.expect("requested"),
        vec!["https://example.com/other/x"]
    );
}

#[test]
fn text_is_readable_without_scripts_styles_or_templates() {
    let out = extract(
        &html_page(ARTICLE),
        &[Format::Text],
        &ExtractLimits::default(),
    );
    let text = out.text.expect("requested");
    assert_eq!(
        text.lines().take(3).collect::<Vec<_>>(),
        vec![
            "Hello world",
            "First paragraph with a relative link.",
            "Absolute",
        ]
    );
    for hidden in [
        "secret",
        "script text",
        "color: red",
        "Enable JavaScript",
        "inert",
        "The Post",
    ] {
        assert!(!text.contains(hidden), "{hidden:?} leaked into: {text}");
    }
}

#[test]
fn markdown_has_headings_and_absolute_links() {
    let out = extract(
        &html_page(ARTICLE),
        &[Format::Markdown],
        &ExtractLimits::default(),
    );
    let md = out.markdown.expect("requested");
    assert!(
        md.starts_with("# Hello *world*") || md.starts_with("# Hello _world_"),
        "{md}"
    );
    assert!(
        md.contains("[a relative link](https://example.com/blog/other)"),
        "{md}"
    );
    assert!(
        md.contains("[Absolute](https://example.com/abs#section)"),
        "{md}"
    );
    assert!(md.contains("[Mail](mailto:me@example.com)"), "{md}");
    assert!(
        md.contains("![A picture](https://example.com/blog/pic.png)"),
        "{md}"
    );
    assert!(!md.contains("javascript:"), "{md}");
    for hidden in ["secret", "script text", "color: red", "inert", "The Post"] {
        assert!(!md.contains(hidden), "{hidden:?} leaked into: {md}");
    }
}

#[test]
fn markdown_escapes_parentheses_in_link_targets() {
    let html = r#"<a href="/wiki/Rust_(language)">Rust</a>"#;
    let out = extract(
        &html_page(html),
        &[Format::Markdown],
        &ExtractLimits::default(),
    );
    assert_eq!(
        out.markdown.expect("requested"),
        "[Rust](https://example.com/wiki/Rust_%28language%29)"
    );
}

#[test]
fn deep_nesting_gets_text_as_markdown_instead_of_overflowing_the_stack() {
    // htmd overflows a 2 MiB stack (a test thread's) near 2,000 levels in a debug build.
    let depth = 3_000;
    let html = format!(
        "{}deep <b>text</b>{}",
        "<div>".repeat(depth),
        "</div>".repeat(depth)
    );
    let out = extract(
        &html_page(&html),
        &[Format::Markdown, Format::Text],
        &ExtractLimits::default(),
    );
    assert_eq!(out.markdown.as_deref(), Some("deep text"));
    assert_eq!(out.text.as_deref(), Some("deep text"));
    assert!(!out.partial);
}

#[test]
fn a_page_too_slow_to_parse_is_cut_at_the_budget() {
    // 100,000 nested <div>s would keep html5ever busy for minutes.
    let n = 100_000;
    let html = format!(
        "<title>Slow</title><a href=/first>x</a>{}never reached{}",
        "<div>".repeat(n),
        "</div>".repeat(n)
    );
    let limits = ExtractLimits {
        parse_budget: Duration::from_millis(200),
        ..ExtractLimits::default()
    };
    let started = Instant::now();
    let out = extract(&html_page(&html), ALL, &limits);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(out.partial);
    let m = out.metadata.expect("requested");
    assert_eq!(m.title.as_deref(), Some("Slow"));
    assert_eq!(
        out.links.expect("requested"),
        vec!["https://example.com/first"]
    );
    assert!(!out.text.expect("requested").contains("never reached"));
    assert!(!out.markdown.expect("requested").contains("never reached"));
    let json =
        serde_json::to_value(extract(&html_page(&html), &[Format::Links], &limits)).expect("json");
    assert_eq!(json["partial"], true);
}

#[test]
fn raw_html_is_capped_on_a_character_boundary() {
    let html = "<p>héllo wörld</p>";
    let limits = ExtractLimits {
        max_html_bytes: 5,
        ..ExtractLimits::default()
    };
    let out = extract(&html_page(html), &[Format::Html], &limits);
    assert_eq!(out.html.as_deref(), Some("<p>h"));
    assert!(out.html_truncated);
    let out = extract(&html_page(html), &[Format::Html], &ExtractLimits::default());
    assert_eq!(out.html.as_deref(), Some(html));
    assert!(!out.html_truncated);
    assert!(!serde_json::to_string(&out)
        .expect("json")
        .contains("html_truncated"));
}

#[test]
fn non_html_pages_get_metadata_and_their_text() {
    let plain = page(
        "https://example.com/a.txt",
        Some("text/plain"),
        b"just  text\n",
    );
    let out = extract(&plain, ALL, &ExtractLimits::default());
    let m = out.metadata.expect("requested");
    assert_eq!(
        (m.title, m.content_type.as_deref()),
        (None, Some("text/plain"))
    );
    assert_eq!(out.text.as_deref(), Some("just  text\n"));
    assert_eq!(out.markdown.as_deref(), Some("just  text\n"));
    assert_eq!(out.links, Some(vec![]));
    assert_eq!(out.html.as_deref(), Some(""));

    let png = page(
        "https://example.com/a.png",
        Some("image/png"),
        b"\x89PNG\r\n\x1a\n",
    );
    let out = extract(&png, ALL, &ExtractLimits::default());
    assert_eq!(out.metadata.expect("requested").status_code, 200);
    assert_eq!(out.text.as_deref(), Some(""));
    assert_eq!(out.markdown.as_deref(), Some(""));
}

#[test]
fn html_without_a_content_type_is_sniffed() {
    let p = page(
        "https://example.com/",
        None,
        b"\n <!DOCTYPE html><title>Sniffed</title>",
    );
    let out = extract(&p, &[Format::Metadata], &ExtractLimits::default());
    assert_eq!(
        out.metadata.expect("requested").title.as_deref(),
        Some("Sniffed")
    );
}

#[test]
fn pages_are_decoded_by_their_charset() {
    // "café" in windows-1252, declared in the header, then in a <meta>.
    let body = b"<html><title>caf\xe9</title></html>";
    let p = page(
        "https://example.com/",
        Some("text/html; charset=ISO-8859-1"),
        body,
    );
    let out = extract(&p, &[Format::Metadata], &ExtractLimits::default());
    assert_eq!(
        out.metadata.expect("requested").title.as_deref(),
        Some("café")
    );

    let body = b"<html><head><meta charset=\"windows-1252\"><title>caf\xe9</title></head></html>";
    let p = page("https://example.com/", Some("text/html"), body);
    let out = extract(&p, &[Format::Metadata], &ExtractLimits::default());
    assert_eq!(
        out.metadata.expect("requested").title.as_deref(),
        Some("café")
    );

    let body = b"<meta http-equiv=\"Content-Type\" content=\"text/html; charset=Shift_JIS\"><p>\x93\xfa\x96\x7b</p>";
    let p = page("https://example.com/", Some("text/html"), body);
    let out = extract(&p, &[Format::Text], &ExtractLimits::default());
    assert_eq!(out.text.as_deref(), Some("日本"));
}

#[test]
fn svg_titles_and_missing_values_stay_out_of_metadata() {
    let html = r#"<html><body><svg><title>icon</title></svg><meta name="description" content="  "></body></html>"#;
    let out = extract(
        &html_page(html),
        &[Format::Metadata],
        &ExtractLimits::default(),
    );
    let m = out.metadata.expect("requested");
    assert_eq!((m.title, m.description, m.language), (None, None, None));
}
