//! The console's stylesheet and script, compiled into the binary and served under names
//! that carry a digest of their content (`console.3f2a….css`): a page always names the
//! version it was built with, so the files can be cached for a year and a new release is
//! never mixed with an old cached file. No CDN, no build step.

use std::sync::OnceLock;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use sha2::{Digest, Sha256};

use super::{ConsoleError, Result};

const CSS: &str = include_str!("../../assets/console/console.css");
const JS: &str = include_str!("../../assets/console/console.js");

struct Asset {
    name: String,
    body: &'static str,
    content_type: &'static str,
}

fn named(stem: &str, ext: &str, body: &'static str, content_type: &'static str) -> Asset {
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    Asset {
        name: format!("{stem}.{}.{ext}", &digest[..12]),
        body,
        content_type,
    }
}

fn all() -> &'static [Asset; 2] {
    static ALL: OnceLock<[Asset; 2]> = OnceLock::new();
    ALL.get_or_init(|| {
        [
            named("console", "css", CSS, "text/css; charset=utf-8"),
            named("console", "js", JS, "text/javascript; charset=utf-8"),
        ]
    })
}

/// The stylesheet's path, as pages link it.
pub fn css_path() -> String {
    format!("{}/assets/{}", super::BASE, all()[0].name)
}

/// The script's path, as pages load it.
pub fn js_path() -> String {
    format!("{}/assets/{}", super::BASE, all()[1].name)
}

/// `GET /console/assets/{name}`: only the current names exist; a stale name is a 404, not
/// the new content under an old name.
pub async fn serve(name: web::Path<String>) -> Result<HttpResponse> {
    let asset = all()
        .iter()
        .find(|a| a.name == *name)
        .ok_or(ConsoleError::NotFound)?;
    Ok(HttpResponse::Ok()
        .content_type(asset.content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .body(asset.body))
}
