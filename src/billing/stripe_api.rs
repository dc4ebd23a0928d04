//! The two Stripe API calls keymeter makes: create a customer, create a Checkout Session.
//!
//! Plain form-encoded HTTPS with reqwest rather than async-stripe: two calls do not justify
//! an RC client whose resource crates add minutes to every build on small CI machines, and
//! the base URL (`STRIPE_API_BASE`) must point at a local server in tests, which a plain
//! client does trivially. Every call carries an `Idempotency-Key`, so a retried request can
//! never create a second customer or session.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::Error;

#[derive(Clone)]
pub struct StripeApi {
    http: reqwest::Client,
    base: String,
    secret: SecretString,
}

#[derive(Debug, Deserialize)]
pub struct Created {
    pub id: String,
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Deserialize)]
struct StripeErrorBody {
    error: StripeErrorDetail,
}

#[derive(Deserialize)]
struct StripeErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

impl StripeApi {
    pub fn new(base: &str, secret: SecretString) -> anyhow::Result<StripeApi> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("keymeter/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(StripeApi {
            http,
            base: base.to_owned(),
            secret,
        })
    }

    async fn post(
        &self,
        path: &str,
        idempotency_key: &str,
        form: &[(String, String)],
    ) -> Result<Created, Error> {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.secret.expose_secret())
            .header("Idempotency-Key", idempotency_key)
            .form(form)
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, path, "Stripe API unreachable");
                Error::PaymentProviderUnavailable {
                    detail: "The payment provider could not be reached; retry shortly.",
                }
            })?;
        let status = res.status();
        let bytes = res
            .bytes()
            .await
            .map_err(|_| Error::PaymentProviderUnavailable {
                detail: "The payment provider's answer was cut off; retry shortly.",
            })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Error::Internal(anyhow::anyhow!("unexpected Stripe answer to {path}: {e}"))
            });
        }
        let (kind, message) = serde_json::from_slice::<StripeErrorBody>(&bytes)
            .map(|b| (b.error.kind, b.error.message))
            .unwrap_or((None, None));
        tracing::warn!(status = status.as_u16(), kind = ?kind, message = ?message, path, "Stripe refused a request");
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Error::PaymentProviderUnavailable {
                detail: "The payment provider is unavailable; retry shortly.",
            });
        }
        Err(Error::Internal(anyhow::anyhow!(
            "Stripe refused {path} with {status}: {}",
            message.unwrap_or_default()
        )))
    }

    pub async fn create_customer(&self, email: &str, account_id: &str) -> Result<Created, Error> {
        let form = vec![
            ("email".to_owned(), email.to_owned()),
            ("metadata[account_id]".to_owned(), account_id.to_owned()),
        ];
        self.post(
            "/v1/customers",
            &format!("keymeter-customer-{account_id}"),
            &form,
        )
        .await
    }

    pub async fn create_checkout_session(
        &self,
        idempotency_key: &str,
        form: &[(String, String)],
    ) -> Result<Created, Error> {
        self.post("/v1/checkout/sessions", idempotency_key, form)
            .await
    }
}
