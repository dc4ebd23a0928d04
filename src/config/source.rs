//! Where variables come from, and the small parsers every concern shares.
//!
//! Each parser takes the variable's name so that its error names it: the one-line
//! `VAR: problem` an operator sees is built here, never by the caller.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use super::ConfigError;

/// Where variables come from: the process environment in production, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Some(v),
            _ => None,
        }
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    }
}

pub(super) fn parsed<T: FromStr>(
    src: &dyn Source,
    var: &'static str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    match src.get(var) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse::<T>()
            .map_err(|_| ConfigError::new(var, format!("invalid value {raw:?}, expected {what}"))),
    }
}

pub(super) fn positive<T: FromStr + PartialOrd + Default + Copy>(
    src: &dyn Source,
    var: &'static str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    let v = parsed(src, var, default, what)?;
    if v <= T::default() {
        return Err(ConfigError::new(
            var,
            format!("must be greater than 0 ({what})"),
        ));
    }
    Ok(v)
}

pub(super) fn millis(
    src: &dyn Source,
    var: &'static str,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    positive(src, var, default_ms, "a whole number of milliseconds").map(Duration::from_millis)
}

pub(super) fn secs(
    src: &dyn Source,
    var: &'static str,
    default_s: u64,
) -> Result<Duration, ConfigError> {
    positive(src, var, default_s, "a whole number of seconds").map(Duration::from_secs)
}

pub(super) fn boolean(
    src: &dyn Source,
    var: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match src.get(var).map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) => match v.as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::new(
                var,
                format!("invalid value {v:?}, expected true or false"),
            )),
        },
    }
}

/// A comma-separated list: entries trimmed, empty ones dropped.
pub(super) fn list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// A variable map for the unit tests.
#[cfg(test)]
pub(super) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
