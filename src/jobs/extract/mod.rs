//! Turning a fetched page into what the customer asked for: `metadata`, `text`, `markdown`,
//! `links`, `html`. The result carries only the requested formats, so a job that asked for
//! `links` does not store the page's HTML.
//!
//! Why it is shaped this way:
//!
//! - **Bytes are decoded once, by the page's own charset** (the `Content-Type` parameter,
//!   else a byte-order mark, else `<meta charset>` in the first 1024 bytes, else UTF-8), so a
//!   Latin-1 or Shift_JIS page reads as text rather than replacement characters.
//! - **One parse (scraper/html5ever, the browsers' algorithm) and one walk** give the metadata,
//!   the links and the text. The walk is iterative: a page of a million nested `<div>`s is
//!   5 MB of input, and must not be able to overflow a worker's stack.
//! - **Markdown is htmd's**, with our handlers for `<a>` and `<img>` so links come out
//!   absolute (a relative link in Markdown served from our API points nowhere). htmd walks
//!   the tree recursively, so a page nested deeper than [`ExtractLimits::max_markdown_depth`]
//!   gets the readable text as its Markdown instead of a stack overflow, which would abort the
//!   process, not just fail the job. A panic inside htmd is caught the same way.
//! - **Links are what a crawler would follow**: `<a href>` and `<area href>`, resolved against
//!   `<base href>` (first one, as browsers do) and the final URL, http/https only, fragment
//!   removed, each once, in document order.
//! - **Parsing has a time budget** ([`ExtractLimits::parse_budget`]): html5ever is quadratic
//!   on some hostile inputs and cannot be interrupted from outside, so it is fed in slices and
//!   the rest of the page is dropped once the budget is spent (the result says `partial`).
//! - Extraction is CPU-bound: call it from `tokio::task::spawn_blocking`, not on an async
//!   worker.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use ego_tree::iter::Edge;
use htmd::element_handler::{HandlerResult, Handlers};
use htmd::{Element, HtmlToMarkdown};
use html5ever::tendril::{StrTendril, TendrilSink};
use scraper::{ElementRef, Html, HtmlTreeSink, Node};
use serde::{Deserialize, Serialize};
use url::Url;
use utoipa::ToSchema;

use super::fetch::Fetched;

mod decode;

use decode::{decode, ContentKind};

/// The formats a job can ask for (`"formats": ["metadata", "markdown"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = JobFormat)]
pub enum Format {
    Metadata,
    Text,
    Markdown,
    Links,
    Html,
}

#[derive(Debug, Clone)]
pub struct ExtractLimits {
    /// Bytes of raw HTML returned in `html`; longer pages are cut (on a character boundary)
    /// and `html_truncated` is set.
    pub max_html_bytes: usize,
    /// Deepest element nesting converted to Markdown (see the module doc). htmd needs
    /// about 1 KiB of stack per level in a debug build; 512 fits a 2 MiB thread with room.
    pub max_markdown_depth: usize,
    /// Time the HTML parser may take before the rest of the page is left unparsed (and the
    /// result marked `partial`).
    pub parse_budget: Duration,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        Self {
            max_html_bytes: 2 * 1024 * 1024,
            max_markdown_depth: 512,
            parse_budget: Duration::from_secs(3),
        }
    }
}

/// A job's result: one field per requested format, the others absent from the JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(
    as = JobResult,
    description = "A succeeded job's result: one member per requested format, the others \
        absent (never `null`). `text` is the readable text; `markdown` the page as Markdown with \
        absolute links; `links` the absolute http(s) links of `<a href>`/`<area href>`, without \
        fragments, each once, in document order; `html` the raw HTML, cut at 2 MiB \
        (`html_truncated: true` then). `partial: true`: the page took too long to parse and \
        the formats cover only its beginning. Both flags are absent when false."
)]
pub struct Extracted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Metadata)]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub markdown: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Vec<String>)]
    pub links: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub html: Option<String>,
    /// `html` was cut at the size cap (2 MiB by default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub html_truncated: bool,
    /// The page took longer than the parse time budget: the other formats cover only its
    /// beginning, and `markdown` is the readable text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// What the page says about itself. Absent values are `null`, so every key is always there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = PageMetadata)]
pub struct Metadata {
    /// The final URL, after redirects.
    pub url: String,
    pub status_code: u16,
    pub content_type: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    /// `<link rel="canonical">`, absolute.
    pub canonical: Option<String>,
    /// `<html lang>`.
    pub language: Option<String>,
    pub open_graph: OpenGraph,
    /// The body was cut at the fetch size cap; everything here comes from its first part.
    pub truncated: bool,
}

/// `<meta property="og:…">`; `image` and `url` made absolute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OpenGraph {
    pub title: Option<String>,
    pub description: Option<String>,
    pub image: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub url: Option<String>,
    pub site_name: Option<String>,
}

/// Produces the requested `formats` from a fetched page. Never fails: a page with nothing
/// to extract gives empty values.
pub fn extract(page: &Fetched, formats: &[Format], limits: &ExtractLimits) -> Extracted {
    let want = |f: Format| formats.contains(&f);
    let kind = ContentKind::of(page.content_type.as_deref(), &page.body);
    let decoded = match kind {
        ContentKind::Html => decode(page.content_type.as_deref(), &page.body, true),
        ContentKind::Text => decode(page.content_type.as_deref(), &page.body, false),
        ContentKind::Other => String::new(),
    };
    let needs_parse = kind == ContentKind::Html
        && (want(Format::Metadata)
            || want(Format::Text)
            || want(Format::Markdown)
            || want(Format::Links));
    let mut partial = false;
    let scan = needs_parse.then(|| {
        let (doc, complete) = parse_within(&decoded, limits.parse_budget);
        partial = !complete;
        Scan::of(&doc, want(Format::Text) || want(Format::Markdown))
    });
    let base = scan
        .as_ref()
        .and_then(|s| s.base_href.as_deref())
        .and_then(|href| page.url.join(href.trim()).ok())
        .filter(is_http)
        .unwrap_or_else(|| page.url.clone());

    let mut out = Extracted {
        partial,
        ..Extracted::default()
    };
    if want(Format::Metadata) {
        out.metadata = Some(metadata(page, scan.as_ref(), &base));
    }
    if want(Format::Text) {
        out.text = Some(match (&scan, kind) {
            (Some(s), _) => s.text.clone(),
            (None, ContentKind::Text) => decoded.clone(),
            _ => String::new(),
        });
    }
    if want(Format::Markdown) {
        out.markdown = Some(match (&scan, kind) {
            (Some(s), _) if partial || s.max_depth > limits.max_markdown_depth => s.text.clone(),
            (Some(s), _) => markdown(&decoded, &base).unwrap_or_else(|| s.text.clone()),
            (None, ContentKind::Text) => decoded.clone(),
            _ => String::new(),
        });
    }
    if want(Format::Links) {
        out.links = Some(match &scan {
            Some(s) => absolute_links(&s.hrefs, &base),
            None => Vec::new(),
        });
    }
    if want(Format::Html) {
        let (html, cut) = match kind {
            ContentKind::Html => cap_at_char_boundary(&decoded, limits.max_html_bytes),
            _ => (String::new(), false),
        };
        out.html = Some(html);
        out.html_truncated = cut;
    }
    out
}

fn cap_at_char_boundary(s: &str, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s.to_owned(), false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_owned(), true)
}

/// Parses `html` in slices, and stops feeding the parser once `budget` is spent. html5ever
/// is quadratic on some inputs (40,000 nested `<div>`s take seconds; a 5 MiB page can hold a
/// million), and a parse cannot be cancelled from outside, so the bound has to be here.
/// Returns the document (of the part parsed) and whether the whole page was parsed.
fn parse_within(html: &str, budget: Duration) -> (Html, bool) {
    const SLICE: usize = 16 * 1024;
    let started = Instant::now();
    let mut parser =
        html5ever::parse_document(HtmlTreeSink::new(Html::new_document()), Default::default());
    let mut rest = html;
    while !rest.is_empty() {
        if started.elapsed() > budget {
            return (parser.finish(), false);
        }
        let mut end = rest.len().min(SLICE);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        parser.process(StrTendril::from_slice(&rest[..end]));
        rest = &rest[end..];
    }
    (parser.finish(), true)
}

fn is_http(url: &Url) -> bool {
    matches!(url.scheme(), "http" | "https")
}

/// Everything one walk of the document collects.
#[derive(Default)]
struct Scan {
    title: Option<String>,
    description: Option<String>,
    canonical: Option<String>,
    language: Option<String>,
    og: OpenGraph,
    base_href: Option<String>,
    /// Raw `href`s of `<a>` and `<area>`, in document order.
    hrefs: Vec<String>,
    text: String,
    max_depth: usize,
}

/// Subtrees that are not readable text. `template` holds inert content, `noscript` is for
/// browsers without scripts (we parse as one with them, so it is raw markup), `head` is
/// metadata, and `svg`/`iframe` hold drawings and fallback content.
const NOT_TEXT: &[&str] = &[
    "head", "script", "style", "noscript", "template", "svg", "iframe",
];

/// Elements that start a new line of text.
const BLOCKS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "br",
    "caption",
    "dd",
    "details",
    "dialog",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hgroup",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "tr",
    "ul",
];

const HTML_NS: &str = "http://www.w3.org/1999/xhtml";

impl Scan {
    fn of(doc: &Html, want_text: bool) -> Self {
        let mut scan = Scan::default();
        let mut lines: Vec<String> = Vec::new();
        let mut line = String::new();
        let (mut depth, mut template_depth, mut skip_depth) = (0usize, 0usize, 0usize);

        for edge in doc.tree.root().traverse() {
            match edge {
                Edge::Open(node) => match node.value() {
                    Node::Element(el) => {
                        depth += 1;
                        scan.max_depth = scan.max_depth.max(depth);
                        let name = el.name();
                        if template_depth > 0 || name == "template" {
                            template_depth += 1;
                        }
                        if skip_depth > 0 || NOT_TEXT.contains(&name) {
                            skip_depth += 1;
                        }
                        if template_depth == 0 {
                            scan.element(el, node);
                        }
                        if skip_depth == 0 && want_text {
                            if BLOCKS.contains(&name) {
                                end_line(&mut lines, &mut line);
                            } else if name == "td" || name == "th" {
                                line.push(' ');
                            }
                        }
                    }
                    Node::Text(t) if skip_depth == 0 && want_text => line.push_str(t),
                    _ => {}
                },
                Edge::Close(node) => {
                    if let Node::Element(el) = node.value() {
                        depth -= 1;
                        template_depth = template_depth.saturating_sub(1);
                        if skip_depth > 0 {
                            skip_depth -= 1;
                        } else if want_text && BLOCKS.contains(&el.name()) {
                            end_line(&mut lines, &mut line);
                        }
                    }
                }
            }
        }
        end_line(&mut lines, &mut line);
        scan.text = lines.join("\n");
        scan
    }

    fn element(&mut self, el: &scraper::node::Element, node: ego_tree::NodeRef<'_, Node>) {
        let attr = |name: &str| el.attr(name).map(str::trim).filter(|v| !v.is_empty());
        let first = |slot: &mut Option<String>, value: Option<&str>| {
            if slot.is_none() {
                *slot = value.map(str::to_owned);
            }
        };
        match el.name() {
            "html" => first(&mut self.language, attr("lang")),
            "title" if &*el.name.ns == HTML_NS && self.title.is_none() => {
                let text = ElementRef::wrap(node)
                    .map(|e| collapse_whitespace(&e.text().collect::<String>()))
                    .filter(|t| !t.is_empty());
                self.title = text;
            }
            "base" => first(&mut self.base_href, attr("href")),
            "a" | "area" => {
                if let Some(href) = el.attr("href") {
                    self.hrefs.push(href.to_owned());
                }
            }
            "link" => {
                let canonical = el.attr("rel").is_some_and(|rel| {
                    rel.split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("canonical"))
                });
                if canonical {
                    first(&mut self.canonical, attr("href"));
                }
            }
            "meta" => {
                let content = attr("content");
                let key = el
                    .attr("property")
                    .or_else(|| el.attr("name"))
                    .map(|k| k.trim().to_ascii_lowercase());
                let og = &mut self.og;
                match key.as_deref() {
                    Some("description") => first(&mut self.description, content),
                    Some("og:title") => first(&mut og.title, content),
                    Some("og:description") => first(&mut og.description, content),
                    Some("og:image") | Some("og:image:url") => first(&mut og.image, content),
                    Some("og:type") => first(&mut og.kind, content),
                    Some("og:url") => first(&mut og.url, content),
                    Some("og:site_name") => first(&mut og.site_name, content),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

fn end_line(lines: &mut Vec<String>, line: &mut String) {
    let collapsed = collapse_whitespace(line);
    if !collapsed.is_empty() {
        lines.push(collapsed);
    }
    line.clear();
}

fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn metadata(page: &Fetched, scan: Option<&Scan>, base: &Url) -> Metadata {
    let absolute = |v: &Option<String>| {
        v.as_deref().map(|raw| {
            base.join(raw)
                .map(String::from)
                .unwrap_or_else(|_| raw.to_owned())
        })
    };
    let mut m = Metadata {
        url: page.url.to_string(),
        status_code: page.status,
        content_type: page.content_type.clone(),
        truncated: page.truncated,
        ..Metadata::default()
    };
    if let Some(s) = scan {
        m.title = s.title.clone();
        m.description = s.description.clone();
        m.canonical = absolute(&s.canonical);
        m.language = s.language.clone();
        m.open_graph = OpenGraph {
            image: absolute(&s.og.image),
            url: absolute(&s.og.url),
            ..s.og.clone()
        };
    }
    m
}

fn absolute_links(hrefs: &[String], base: &Url) -> Vec<String> {
    let mut seen = HashSet::new();
    hrefs
        .iter()
        .filter_map(|href| {
            let mut url = base.join(href.trim()).ok().filter(is_http)?;
            url.set_fragment(None);
            Some(String::from(url))
        })
        .filter(|u| seen.insert(u.clone()))
        .collect()
}

/// A link target for Markdown: absolute, and with the parentheses that would end a
/// Markdown link percent-encoded (the same URL to any server).
fn markdown_target(base: &Url, raw: &str, schemes: &[&str]) -> Option<String> {
    let url = base.join(raw.trim()).ok()?;
    schemes
        .contains(&url.scheme())
        .then(|| url.as_str().replace('(', "%28").replace(')', "%29"))
}

fn attr_value(element: &Element, name: &str) -> Option<String> {
    element
        .attrs
        .iter()
        .find(|a| &*a.name.local == name)
        .map(|a| a.value.to_string())
}

/// htmd with absolute links and images, and without the parts that are not content.
/// `None` if htmd failed or panicked.
fn markdown(html: &str, base: &Url) -> Option<String> {
    let link_base = base.clone();
    let anchor = move |handlers: &dyn Handlers, element: Element| -> Option<HandlerResult> {
        let content = handlers.walk_children(element.node).content;
        let target = attr_value(&element, "href").and_then(|href| {
            markdown_target(&link_base, &href, &["http", "https", "mailto", "tel"])
        });
        let inner = content.trim();
        Some(match target {
            Some(t) if !inner.is_empty() => {
                let lead = if content.starts_with(char::is_whitespace) {
                    " "
                } else {
                    ""
                };
                let trail = if content.ends_with(char::is_whitespace) {
                    " "
                } else {
                    ""
                };
                format!("{lead}[{inner}]({t}){trail}").into()
            }
            _ => content.into(),
        })
    };
    let image_base = base.clone();
    let image = move |_: &dyn Handlers, element: Element| -> Option<HandlerResult> {
        // data: images would put kilobytes of base64 into the text: http(s) only.
        let src = attr_value(&element, "src")
            .and_then(|src| markdown_target(&image_base, &src, &["http", "https"]))?;
        let alt = attr_value(&element, "alt")
            .map(|a| collapse_whitespace(&a).replace(['[', ']'], ""))
            .unwrap_or_default();
        Some(format!("![{alt}]({src})").into())
    };
    let converter = HtmlToMarkdown::builder()
        .skip_tags(NOT_TEXT.to_vec())
        .add_handler(vec!["a"], anchor)
        .add_handler(vec!["img"], image)
        .build();
    catch_unwind(AssertUnwindSafe(|| converter.convert(html)))
        .ok()?
        .ok()
}

#[cfg(test)]
mod tests;
