//! The auto-recharge signal a charge raises, on the hot path at the price of a comparison.
//!
//! Billing arms an account by writing its threshold into `accounts.recharge_below` (NULL
//! when auto-recharge is off) and holds it back with `accounts.recharge_after` (cool-down,
//! monthly cap, a recharge in flight). The charge statements already update that row, so
//! they test `balance_after < recharge_below AND recharge_after <= now()` in the same
//! statement — no extra query per charge — and, only when it holds, `pg_notify` the
//! account and the triggering ledger row on [`CHANNEL`]. PostgreSQL delivers a NOTIFY only
//! when its transaction commits, so the recharge starts after the charge committed, on
//! every instance's LISTEN connection (one of them wins the claim in `billing`), never on
//! the charge's response path.

/// The LISTEN/NOTIFY channel; the payload is `<account id>:<ledger entry id>`.
pub const CHANNEL: &str = "keymeter_recharge";

/// The test, as an expression over the updated `accounts` row (in a RETURNING list).
pub const ARMED: &str = "credit_balance < recharge_below AND recharge_after <= now()";

/// Notifies for each `(account, balance_after)` pair the charge rows just written in this
/// transaction (a group commit's crossing accounts), naming the ledger row that crossed.
/// Sent in the batch's transaction, so it is delivered at its commit.
pub const NOTIFY_CROSSINGS: &str =
    "SELECT pg_notify('keymeter_recharge', l.account_id::text || ':' || l.id::text)
       FROM unnest($1::uuid[], $2::bigint[]) AS c(a, b)
       JOIN LATERAL (SELECT account_id, id FROM credit_ledger
                      WHERE account_id = c.a AND kind = 'charge' AND balance_after = c.b
                      ORDER BY id DESC LIMIT 1) l ON true";

/// Parses a notification's payload.
pub fn parse(payload: &str) -> Option<(uuid::Uuid, i64)> {
    let (a, l) = payload.split_once(':')?;
    Some((a.parse().ok()?, l.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn payloads_round_trip() {
        let a = uuid::Uuid::new_v4();
        assert_eq!(super::parse(&format!("{a}:42")), Some((a, 42)));
        assert_eq!(super::parse("nope"), None);
        assert_eq!(super::parse(&format!("{a}:x")), None);
    }
}
