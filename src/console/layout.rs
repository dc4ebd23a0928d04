//! The page shell every console page shares: the document head (the hashed stylesheet and
//! script, no inline code), the navigation with the current page marked for screen readers,
//! the sign-out form, and the message area at the top.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::Owner;
use super::BASE;

/// The pages in the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Keys,
    Usage,
    Jobs,
    Billing,
    Settings,
    /// A page outside the navigation (login, errors).
    None,
}

const NAV: [(Nav, &str, &str); 6] = [
    (Nav::Overview, "/", "Overview"),
    (Nav::Keys, "/keys", "Keys"),
    (Nav::Usage, "/usage", "Usage"),
    (Nav::Jobs, "/jobs", "Jobs"),
    (Nav::Billing, "/billing", "Billing"),
    (Nav::Settings, "/settings", "Settings"),
];

/// A message at the top of a page.
pub enum Notice {
    Ok(String),
    Error(String),
}

pub fn notices(list: &[Notice]) -> Markup {
    html! {
        @for n in list {
            @match n {
                Notice::Ok(m) => p.notice.ok role="status" { (m) },
                Notice::Error(m) => p.notice.error role="alert" { (m) },
            }
        }
    }
}

/// A secret shown once (a new API key, a webhook signing secret): in a read-only field the
/// script gives a copy button (without it, the field is there to select and copy by hand),
/// with the warning that it will not be shown again. `id` names the field; `what` is the
/// secret in the warning ("key", "secret").
pub fn secret_once(id: &str, title: &str, what: &str, value: &str, after: Markup) -> Markup {
    let title_id = format!("{id}-title");
    html! {
        div.secret-box role="region" aria-labelledby=(title_id) {
            h2 id=(title_id) { (title) }
            p.warn { strong { "Copy it now: you will not see this " (what) " again." }
                " keymeter keeps only what it needs to check it, not the " (what) " itself." }
            div.copy-row {
                label.visually-hidden for=(id) { (title) }
                input id=(id) type="text" readonly value=(value) spellcheck="false" autocomplete="off";
                button.js-only type="button" data-copy=(id) { "Copy" }
            }
            (after)
        }
    }
}

/// A whole page. `owner` is `None` on the pages shown signed out.
pub fn page(title: &str, owner: Option<&Owner>, nav: Nav, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · keymeter" }
                link rel="stylesheet" href=(assets::css_path());
                script src=(assets::js_path()) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href={(BASE) "/"} { "keymeter" }
                    @if let Some(o) = owner {
                        nav aria-label="Console" {
                            ul {
                                @for (n, path, label) in NAV {
                                    li {
                                        @if n == nav {
                                            a href={(BASE) (path)} aria-current="page" { (label) }
                                        } @else {
                                            a href={(BASE) (path)} { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.signout method="post" action={(BASE) "/logout"} {
                            input type="hidden" name="csrf" value=(o.csrf());
                            span.who { (o.account.email) }
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main #main {
                    (body)
                }
                footer.foot {
                    p.muted {
                        "Times are shown in your browser's time zone ("
                        noscript { "UTC without JavaScript" }
                        span.js-only { "local" }
                        "). API reference: " a href="/docs" { "/docs" } "."
                    }
                }
            }
        }
    }
}

/// A rendered page as a response.
/// A confirmation, as its own page (works without JavaScript): `message`, then a form that
/// POSTs to `action` with the session's CSRF token, and a way back to `cancel`.
pub struct Confirm<'a> {
    pub title: &'a str,
    pub heading: Markup,
    pub message: Markup,
    pub action: String,
    pub button: &'a str,
    pub cancel: String,
    pub nav: Nav,
}

pub fn confirm_page(owner: &Owner, c: Confirm<'_>) -> HttpResponse {
    let body = html! {
        section.card.narrow {
            h1 { (c.heading) }
            p { (c.message) }
            form method="post" action=(c.action) {
                input type="hidden" name="csrf" value=(owner.csrf());
                button.danger type="submit" { (c.button) }
                " "
                a.button.secondary href=(c.cancel) { "Cancel" }
            }
        }
    };
    respond(StatusCode::OK, page(c.title, Some(owner), c.nav, body))
}

pub fn respond(status: StatusCode, markup: Markup) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(markup.into_string())
}

/// The console's own error pages (404, 403, 500…): plain, with a way back.
pub fn error_page(status: StatusCode, title: &str, detail: &str) -> HttpResponse {
    respond(
        status,
        page(
            title,
            None,
            Nav::None,
            html! {
                section.card.narrow {
                    h1 { (title) }
                    p { (detail) }
                    p.muted { "Error " (status.as_u16()) "." }
                    p { a.button href={(BASE) "/"} { "Back to the console" } }
                }
            },
        ),
    )
}
