// A burst of signed Stripe webhook deliveries with duplicates: load/run.sh webhooks.js
//
// setup: one internal-tier account with 0 credits (admin API), then EVENTS Checkout Sessions
// for the pack `load` bought through keymeter (POST /v1/billing/checkout): keymeter creates
// them at "Stripe" — the upstream's stub, STRIPE_API_BASE=<upstream>/stripe, set by run.sh —
// and records each in billing_checkouts, exactly as in production. The pack is worth
// PACK_CREDITS credits (run.sh configures KEYMETER_CREDIT_PACKS=load:price_load:<credits>).
//
// The burst: one `checkout.session.completed` event per session, built from Stripe's own
// fixtures (tests/fixtures/stripe/, the tests' copy: event.json around checkout.session.json, with the
// fields an event needs changed: ids, type, created, payment_status, client_reference_id,
// metadata), each delivered DUPLICATES times at once (one http.batch: concurrent requests
// with the same event id), plus one copy with a wrong signature. Each delivery is signed
// the way Stripe signs: `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>`,
// with the STRIPE_WEBHOOK_SECRET the server was started with.
//
// Expected: every correctly signed delivery answers 200 (the first applies the event, the
// duplicates change nothing), every wrongly signed one 400 invalid_signature; at the end the
// balance is EVENTS × PACK_CREDITS exactly, with one `purchase` ledger row per event.
//
// Environment: BASE_URL, ADMIN_TOKEN, STRIPE_WEBHOOK_SECRET, PACK_CREDITS, FIXTURES_DIR
// (run.sh sets them), EVENTS (200), DUPLICATES (4), VUS (16), DURATION (the most the burst
// may take, 60s), P95_MS (200), OUT_DIR.

import http from 'k6/http';
import crypto from 'k6/crypto';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate } from 'k6/metrics';
import {
  BASE_URL, TREND_STATS, bearer, count, createAccounts, failedThresholds, getJson, int, latencyRow,
  latencyTable, listAll, num, requireLoopback,
} from './lib.js';

const EVENTS = int('EVENTS', 200);
const DUPLICATES = int('DUPLICATES', 4);
const VUS = int('VUS', 16);
const DURATION = __ENV.DURATION || '60s';
const P95_MS = num('P95_MS', 200);
const PACK_CREDITS = int('PACK_CREDITS', 100);
const SECRET = __ENV.STRIPE_WEBHOOK_SECRET || '';
const FIXTURES = __ENV.FIXTURES_DIR || '';

requireLoopback('BASE_URL', BASE_URL);
if (!SECRET) throw new Error('STRIPE_WEBHOOK_SECRET is not set (run through load/run.sh)');
if (!FIXTURES) throw new Error('FIXTURES_DIR is not set (run through load/run.sh)');
// open() works in the init context only: read Stripe's shapes once.
const EVENT_FIXTURE = JSON.parse(open(`${FIXTURES}/event.json`));
const SESSION_FIXTURE = JSON.parse(open(`${FIXTURES}/checkout.session.json`));

const ok200 = new Counter('deliveries_200');
const refused400 = new Counter('bad_signature_400');
const other = new Counter('unexpected_status');
const ledgerChecks = new Rate('ledger_checks');

export const options = {
  scenarios: {
    burst: { executor: 'shared-iterations', vus: VUS, iterations: EVENTS, maxDuration: DURATION },
  },
  setupTimeout: '120s',
  thresholds: {
    deliveries_200: [`count==${EVENTS * DUPLICATES}`],
    bad_signature_400: [`count==${EVENTS}`],
    unexpected_status: ['count==0'],
    'http_req_duration{name:webhook}': [`p(95)<${P95_MS}`],
    'http_req_duration{name:webhook_bad_signature}': [`p(95)<${P95_MS}`],
    ledger_checks: ['rate==1'],
    checks: ['rate==1'],
  },
  summaryTrendStats: TREND_STATS,
};

http.setResponseCallback(http.expectedStatuses(200, 201, 400));

export function setup() {
  const [account] = createAccounts(1, 'internal', 0);
  const sessions = [];
  for (let i = 0; i < EVENTS; i += 20) {
    const reqs = [];
    for (let j = i; j < Math.min(EVENTS, i + 20); j++) {
      reqs.push(['POST', `${BASE_URL}/v1/billing/checkout`,
        JSON.stringify({ pack: 'load', success_url: 'https://example.com/ok', cancel_url: 'https://example.com/cancel' }),
        Object.assign(bearer(account.key), { tags: { name: 'setup' } })]);
    }
    for (const r of http.batch(reqs)) {
      if (r.status !== 201) throw new Error(`POST /v1/billing/checkout answered ${r.status}: ${r.body}`);
      sessions.push(r.json('id'));
    }
  }
  const billing = getJson(account.key, '/v1/billing');
  return { key: account.key, account: account.id, customer: billing.stripe_customer, sessions, runId: `${Date.now()}` };
}

// A checkout.session.completed event for session `id`, from Stripe's fixtures.
function event(data, n) {
  const created = Math.floor(Date.now() / 1000);
  const s = JSON.parse(JSON.stringify(SESSION_FIXTURE));
  s.id = data.sessions[n];
  s.mode = 'payment';
  s.status = 'complete';
  s.payment_status = 'paid';
  s.client_reference_id = data.account;
  s.customer = data.customer;
  s.metadata = { account_id: data.account, pack: 'load' };
  s.payment_intent = `pi_load_${data.runId}_${n}`;
  s.created = created;
  s.url = null;
  const e = JSON.parse(JSON.stringify(EVENT_FIXTURE));
  e.id = `evt_load_${data.runId}_${n}`;
  e.type = 'checkout.session.completed';
  e.created = created;
  e.data = { object: s };
  return e;
}

function signed(body, secret) {
  const t = Math.floor(Date.now() / 1000);
  return `t=${t},v1=${crypto.hmac('sha256', secret, `${t}.${body}`, 'hex')}`;
}

export default function (data) {
  const n = exec.scenario.iterationInTest;
  const body = JSON.stringify(event(data, n));
  const deliver = (sig, name) => ['POST', `${BASE_URL}/v1/billing/webhook`, body,
    { headers: { 'Content-Type': 'application/json', 'Stripe-Signature': sig }, tags: { name } }];
  const reqs = [];
  for (let d = 0; d < DUPLICATES; d++) reqs.push(deliver(signed(body, SECRET), 'webhook'));
  reqs.push(deliver(signed(body, `${SECRET}_wrong`), 'webhook_bad_signature'));
  const res = http.batch(reqs);
  res.forEach((r, i) => {
    const bad = i === DUPLICATES;
    if (!bad && r.status === 200) ok200.add(1);
    else if (bad && r.status === 400) {
      refused400.add(1);
      check(r, { '400: invalid_signature problem': (x) => x.json('type') === 'invalid_signature' });
    } else {
      other.add(1);
      console.warn(`delivery ${i} of event ${n} answered ${r.status}: ${String(r.body).slice(0, 300)}`);
    }
  });
}

function expect(name, ok, detail) {
  ledgerChecks.add(ok);
  console.log(`ledger check ${ok ? 'ok  ' : 'FAIL'} ${name}: ${detail}`);
}

export function teardown(data) {
  const a = getJson(data.key, '/v1/account');
  const purchases = listAll(data.key, '/v1/credits/ledger?kind=purchase');
  const all = listAll(data.key, '/v1/credits/ledger');
  const want = EVENTS * PACK_CREDITS;
  expect('balance == distinct events × pack credits', a.credit_balance === want, `balance ${a.credit_balance}, want ${EVENTS} × ${PACK_CREDITS} = ${want}`);
  const perEvent = {};
  for (const m of purchases) perEvent[m.stripe_event_id] = (perEvent[m.stripe_event_id] || 0) + 1;
  const distinct = Object.keys(perEvent).length;
  expect('one purchase row per distinct event', purchases.length === EVENTS && distinct === EVENTS && purchases.every((m) => m.delta === PACK_CREDITS),
    `${purchases.length} purchase rows for ${distinct} distinct event ids, ${EVENTS} events sent`);
  const sum = all.reduce((s, m) => s + m.delta, 0);
  expect('the ledger sums to the balance', sum === a.credit_balance, `sum(delta) ${sum}, balance ${a.credit_balance}`);
}

export function handleSummary(data) {
  const failed = failedThresholds(data);
  const rows = [
    latencyRow(data, 'signed (200)', 'http_req_duration{name:webhook}', null, undefined),
    latencyRow(data, 'bad signature (400)', 'http_req_duration{name:webhook_bad_signature}', null, undefined),
  ];
  const lines = latencyTable(`webhooks.js — ${VUS} VUs, ${EVENTS} events × ${DUPLICATES} concurrent deliveries + 1 badly signed each`, rows);
  lines.unshift('');
  lines.push('');
  lines.push(`200: ${count(data, 'deliveries_200')} (want ${EVENTS * DUPLICATES}); 400: ${count(data, 'bad_signature_400')} (want ${EVENTS}); ` +
    `anything else: ${count(data, 'unexpected_status')}`);
  const lc = data.metrics.ledger_checks ? data.metrics.ledger_checks.values : {};
  lines.push(`ledger checks: ${lc.passes || 0} passed, ${lc.fails || 0} failed`);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/webhooks-summary.json`] = JSON.stringify({ events: EVENTS, duplicates: DUPLICATES, rows, thresholds_failed: failed }, null, 2);
  }
  return out;
}
