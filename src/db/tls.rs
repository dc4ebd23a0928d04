//! TLS to PostgreSQL with rustls: `sslmode` from `DATABASE_URL` as libpq reads it, and the
//! certificate checks each mode promises.
//!
//! | `sslmode`          | encrypted                  | chain checked                     | host name checked |
//! |--------------------|----------------------------|-----------------------------------|-------------------|
//! | `disable`          | never                      | –                                 | –                 |
//! | `prefer` (default) | when the server offers TLS | no                                | no                |
//! | `require`          | always                     | only with `KEYMETER_DB_CA_FILE`   | no                |
//! | `verify-ca`        | always                     | yes                               | no                |
//! | `verify-full`      | always                     | yes                               | yes               |
//!
//! `prefer` and `require` stop a passive eavesdropper, not an active man in the middle; the
//! `verify-*` modes stop both. `require` with a CA file checks the chain, as libpq does when
//! it finds a root certificate: an operator who names a CA expects it to be used.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require` and leaves the certificate to
//! the connector, so the two `verify-*` values are read here and handed to tokio-postgres as
//! `require` (TLS or no connection), with the verifier their mode asks for.
//!
//! Trust roots: `KEYMETER_DB_CA_FILE` (PEM) when set — a private CA, or a cloud provider's
//! bundle such as RDS's — else the Mozilla roots compiled in by webpki-roots. Compiled-in
//! rather than the system store: the same answer on every machine, in a slim image without
//! `ca-certificates`, and it is already in the build through reqwest. Services whose server
//! certificates chain to a public CA then verify with no setting at all.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values keymeter honours (`allow` is refused: tokio-postgres cannot try
/// plaintext first and TLS second, and no one should want that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// Why a connection string was refused. Never carries the string: it may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("not a valid PostgreSQL connection string (expected postgres://user[:password]@host[:port]/database)")]
    Invalid,
    #[error("sslmode {0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
}

/// Parses a connection string (URL or `key=value` form) into tokio-postgres's config and
/// the `sslmode` it asks for, `prefer` when it names none (libpq's default).
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, SslMode), UrlError> {
    let found = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        find_in_url(url)
    } else {
        find_in_key_values(url)
    };
    let mut rewritten = None;
    if let Some((value, range)) = &found {
        let mode = SslMode::parse(value).ok_or_else(|| UrlError::SslMode(value.clone()))?;
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            let mut s = url.to_owned();
            s.replace_range(range.clone(), "require");
            rewritten = Some((s, mode));
        }
    }
    match rewritten {
        Some((s, mode)) => {
            let cfg = tokio_postgres::Config::from_str(&s).map_err(|_| UrlError::Invalid)?;
            Ok((cfg, mode))
        }
        None => {
            let cfg = tokio_postgres::Config::from_str(url).map_err(|_| UrlError::Invalid)?;
            let mode = match cfg.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Require => SslMode::Require,
                _ => SslMode::Prefer,
            };
            Ok((cfg, mode))
        }
    }
}

/// The last `sslmode` in a URL's query (the one libpq would use): its decoded value and the
/// byte range of its raw value.
fn find_in_url(url: &str) -> Option<(String, std::ops::Range<usize>)> {
    let q = url.find('?')? + 1;
    let mut found = None;
    let mut start = q;
    for pair in url[q..].split('&') {
        if let Some((key, raw)) = pair.split_once('=') {
            if key == "sslmode" {
                let value = url::form_urlencoded::parse(format!("v={raw}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let from = start + key.len() + 1;
                found = Some((value, from..from + raw.len()));
            }
        }
        start += pair.len() + 1;
    }
    found
}

/// The last `sslmode` in a `key = value` connection string (values may be single-quoted,
/// with backslash escapes): its value and the byte range of its raw value.
fn find_in_key_values(s: &str) -> Option<(String, std::ops::Range<usize>)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut found = None;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return found;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        i = skip_ws(i);
        if i >= b.len() || b[i] != b'=' {
            return found; // malformed: tokio-postgres will say so
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let mut value = String::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i] as char);
                i += 1;
            }
            i += 1; // the closing quote
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i] as char);
                i += 1;
            }
        }
        let end = i.min(b.len());
        if key == "sslmode" {
            found = Some((value, value_start..end));
        }
    }
}

/// Reads the PEM certificates in `path` into a root store; at least one must be there.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{} holds no usable CA certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    // ring, not aws-lc-rs: it is the provider already in the build (through reqwest).
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client for `mode`.
pub fn client_config(mode: SslMode, ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let provider = provider();
    let roots = || -> Result<Arc<RootCertStore>, String> {
        Ok(Arc::new(match ca_file {
            Some(p) => load_ca_file(p)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        }))
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let algs = provider.signature_verification_algorithms;
    let config = match (mode, ca_file) {
        (SslMode::VerifyFull, _) => {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots()?, provider)
                .build()
                .map_err(|e| format!("TLS setup: {e}"))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: roots()?,
                algs,
            }))
            .with_no_client_auth(),
        (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly { algs }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// `verify-ca`: the server's certificate must chain to a trusted root and be in date, but
/// may name any host — for servers reached by an address their certificate does not list.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `prefer` and `require` (without a CA): encryption against eavesdroppers, any
/// certificate accepted — libpq's meaning of these modes. The handshake signatures are
/// still checked against the certificate presented, so the session keys are the server's.
#[derive(Debug)]
struct EncryptOnly {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The TLS connector every keymeter connection uses, for `mode`.
pub fn connector(mode: SslMode, ca_file: Option<&Path>) -> Result<MakeRustlsConnect, String> {
    Ok(MakeRustlsConnect::new(client_config(mode, ca_file)?))
}

/// The rustls error in a connection error's chain, if the failure was TLS's: a refused
/// certificate, a failed handshake.
pub fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        // io::Error's `source()` skips the error it wraps; look at that one too.
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(r);
            }
        }
        cur = err.source();
    }
    None
}

/// One line for an operator: what TLS refused and which setting decides it.
pub fn describe_failure(e: &rustls::Error, mode: SslMode, ca_file: Option<&PathBuf>) -> String {
    let trust = match ca_file {
        Some(p) => format!("KEYMETER_DB_CA_FILE={}", p.display()),
        None => "the public roots (KEYMETER_DB_CA_FILE is unset)".to_owned(),
    };
    match e {
        rustls::Error::InvalidCertificate(_) => format!(
            "TLS: the server's certificate was refused ({e}); sslmode={} checks it against {trust}",
            mode.as_str()
        ),
        other => format!(
            "TLS handshake failed with sslmode={}: {other}",
            mode.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_is_read_from_a_url_and_the_verifying_ones_reach_tokio_postgres_as_require() {
        for (mode, expect, pg) in [
            ("disable", SslMode::Disable, "Disable"),
            ("prefer", SslMode::Prefer, "Prefer"),
            ("require", SslMode::Require, "Require"),
            ("verify-ca", SslMode::VerifyCa, "Require"),
            ("verify-full", SslMode::VerifyFull, "Require"),
        ] {
            let url = format!("postgres://u:p@db.example.com:6543/app?application_name=x&sslmode={mode}&connect_timeout=3");
            let (cfg, m) = parse_url(&url).expect(mode);
            assert_eq!(m, expect, "{mode}");
            assert_eq!(format!("{:?}", cfg.get_ssl_mode()), pg, "{mode}");
            assert_eq!(cfg.get_dbname(), Some("app"));
            assert_eq!(cfg.get_application_name(), Some("x"));
            assert_eq!(cfg.get_ports(), &[6543]);
        }
    }

    #[test]
    fn key_value_strings_and_quoted_values_are_read_too() {
        let (cfg, m) =
            parse_url("host=db.example.com user=u sslmode = 'verify-full' dbname=app").unwrap();
        assert_eq!(m, SslMode::VerifyFull);
        assert_eq!(cfg.get_dbname(), Some("app"));
        let (_, m) = parse_url("host=db sslmode=verify-ca user=u").unwrap();
        assert_eq!(m, SslMode::VerifyCa);
        let (_, m) = parse_url("host=db user=u").unwrap();
        assert_eq!(m, SslMode::Prefer, "libpq's default");
    }

    #[test]
    fn an_unknown_mode_is_named_without_the_rest_of_the_url() {
        let err = parse_url("postgres://u:hunter2@h/db?sslmode=verify_full").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"verify_full\""), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(matches!(
            parse_url("host=h sslmode=allow").unwrap_err(),
            UrlError::SslMode(_)
        ));
        assert!(matches!(
            parse_url("postgres://h:notaport/db").unwrap_err(),
            UrlError::Invalid
        ));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("km-ca-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(load_ca_file(&empty).unwrap_err().contains("no usable CA"));
        assert!(load_ca_file(&dir.join("missing.pem"))
            .unwrap_err()
            .contains("cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
