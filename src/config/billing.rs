//! Stripe billing: the keys, the credit packs and plans on sale, and the webhook route's
//! body limit. In production a half-configured billing stops start-up rather than taking
//! payments it cannot verify.

use secrecy::SecretString;

use super::source::{list, positive, Source};
use super::{ConfigError, Environment};

/// A credit pack: one Stripe price buys a fixed number of credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    pub name: String,
    pub price_id: String,
    pub credits: i64,
}

/// A plan: a recurring Stripe price that puts the account on a tier and grants credits each
/// paid period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub price_id: String,
    pub tier: String,
    pub monthly_credits: i64,
}

#[derive(Debug, Clone)]
pub struct BillingSettings {
    pub secret_key: Option<SecretString>,
    /// Several during a rotation: a delivery signed with any of them is accepted.
    pub webhook_secrets: Vec<SecretString>,
    pub api_base: String,
    pub packs: Vec<Pack>,
    pub plans: Vec<Plan>,
}

impl BillingSettings {
    pub fn enabled(&self) -> bool {
        self.secret_key.is_some() || !self.webhook_secrets.is_empty()
    }

    pub fn pack(&self, name: &str) -> Option<&Pack> {
        self.packs.iter().find(|p| p.name == name)
    }

    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }

    pub fn plan_by_price(&self, price_id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.price_id == price_id)
    }

    /// The pack a Stripe price sells: how a session keymeter did not record is fulfilled.
    pub fn pack_by_price(&self, price_id: &str) -> Option<&Pack> {
        self.packs.iter().find(|p| p.price_id == price_id)
    }
}

/// The billing settings and the webhook route's body limit (`KEYMETER_WEBHOOK_BODY_LIMIT`).
pub(super) fn parse(
    src: &dyn Source,
    env: Environment,
) -> Result<(BillingSettings, usize), ConfigError> {
    let billing = BillingSettings {
        secret_key: src.get("STRIPE_SECRET_KEY").map(SecretString::from),
        webhook_secrets: src
            .get("STRIPE_WEBHOOK_SECRET")
            .map(|v| list(&v).map(|s| SecretString::from(s.to_owned())).collect())
            .unwrap_or_default(),
        api_base: src
            .get("STRIPE_API_BASE")
            .unwrap_or_else(|| "https://api.stripe.com".to_owned())
            .trim_end_matches('/')
            .to_owned(),
        packs: parse_packs(src)?,
        plans: parse_plans(src)?,
    };
    if !(billing.api_base.starts_with("https://") || billing.api_base.starts_with("http://")) {
        return Err(ConfigError::new(
            "STRIPE_API_BASE",
            "must be an http(s) URL",
        ));
    }
    let billing_configured =
        billing.enabled() || !billing.packs.is_empty() || !billing.plans.is_empty();
    if env.is_production() && billing_configured {
        if billing.secret_key.is_none() {
            return Err(ConfigError::new(
                "STRIPE_SECRET_KEY",
                "is required in production when billing is configured",
            ));
        }
        if billing.webhook_secrets.is_empty() {
            return Err(ConfigError::new(
                "STRIPE_WEBHOOK_SECRET",
                "is required in production when billing is configured",
            ));
        }
        if billing.api_base.starts_with("http://") {
            return Err(ConfigError::new(
                "STRIPE_API_BASE",
                "must be https in production",
            ));
        }
    }
    let webhook_body_limit = positive(
        src,
        "KEYMETER_WEBHOOK_BODY_LIMIT",
        1024 * 1024usize,
        "a size in bytes",
    )?;
    Ok((billing, webhook_body_limit))
}

fn item_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The entries of a `name:price_id:…,…` list: each split into `shape`'s field count, with a
/// valid name and a non-empty price id, neither listed twice. `build` turns the fields into
/// the item (`None` for a bad value).
fn price_list<T>(
    src: &dyn Source,
    var: &'static str,
    shape: &str,
    build: impl Fn(&[&str]) -> Option<T>,
) -> Result<Vec<(String, String, T)>, ConfigError> {
    let Some(raw) = src.get(var) else {
        return Ok(Vec::new());
    };
    let arity = shape.split(':').count();
    let mut out: Vec<(String, String, T)> = Vec::new();
    for item in list(&raw) {
        let parts: Vec<&str> = item.split(':').map(str::trim).collect();
        let bad = || ConfigError::new(var, format!("invalid entry {item:?}, expected {shape}"));
        if parts.len() != arity || !item_name_ok(parts[0]) || parts[1].is_empty() {
            return Err(bad());
        }
        let built = build(&parts).ok_or_else(bad)?;
        if out.iter().any(|(n, p, _)| n == parts[0] || p == parts[1]) {
            return Err(ConfigError::new(
                var,
                format!("{:?} or its price is listed twice", parts[0]),
            ));
        }
        out.push((parts[0].to_owned(), parts[1].to_owned(), built));
    }
    Ok(out)
}

fn parse_packs(src: &dyn Source) -> Result<Vec<Pack>, ConfigError> {
    let entries = price_list(src, "KEYMETER_CREDIT_PACKS", "name:price_id:credits", |f| {
        f[2].parse::<i64>().ok().filter(|c| *c > 0)
    })?;
    Ok(entries
        .into_iter()
        .map(|(name, price_id, credits)| Pack {
            name,
            price_id,
            credits,
        })
        .collect())
}

fn parse_plans(src: &dyn Source) -> Result<Vec<Plan>, ConfigError> {
    let entries = price_list(
        src,
        "KEYMETER_PLANS",
        "name:price_id:tier:monthly_credits",
        |f| {
            let credits = f[3].parse::<i64>().ok().filter(|c| *c >= 0)?;
            item_name_ok(f[2]).then(|| (f[2].to_owned(), credits))
        },
    )?;
    Ok(entries
        .into_iter()
        .map(|(name, price_id, (tier, monthly_credits))| Plan {
            name,
            price_id,
            tier,
            monthly_credits,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;

    #[test]
    fn packs_and_plans_parse_and_bad_entries_are_named() {
        let c = Config::from_source(&vars(&[
            (
                "KEYMETER_CREDIT_PACKS",
                "small:price_1:100, large:price_2:1200",
            ),
            ("KEYMETER_PLANS", "pro:price_3:pro:5000"),
        ]))
        .unwrap();
        assert_eq!(c.billing.pack("large").unwrap().credits, 1200);
        assert_eq!(c.billing.plan_by_price("price_3").unwrap().tier, "pro");
        let e =
            Config::from_source(&vars(&[("KEYMETER_CREDIT_PACKS", "small:price_1")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_CREDIT_PACKS");
        let e =
            Config::from_source(&vars(&[("KEYMETER_PLANS", "pro:price_3:pro:lots")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_PLANS");
        let e = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("STRIPE_SECRET_KEY", "sk_live_x"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "STRIPE_WEBHOOK_SECRET");
    }

    #[test]
    fn a_pack_or_price_listed_twice_is_refused() {
        let e = Config::from_source(&vars(&[(
            "KEYMETER_CREDIT_PACKS",
            "small:price_1:100,small:price_2:200",
        )]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_CREDIT_PACKS");
        assert!(e.problem.contains("listed twice"), "{e}");
    }
}
