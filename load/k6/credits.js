// Many VUs spending one small balance at once: load/run.sh credits.js
//
// setup creates one internal-tier account with BALANCE credits (admin API). Then VUS virtual
// users share BALANCE + EXTRA iterations of POST /v1/credits/charge {amount: 1} on that one
// account, as fast as they can (shared-iterations: the total is fixed, so the outcome is
// exact whatever the speed). Exactly BALANCE charges must succeed (201) and EXTRA be refused
// (402 insufficient_credits); nothing else may happen. teardown checks through the API that
// the balance is 0 and that the ledger (grant + charges) sums to it, one `charge` row per 201.
// load/run.sh then checks balance = sum(delta) in SQL for every account of the run.
//
// Environment: BASE_URL and ADMIN_TOKEN (run.sh sets them), BALANCE (1000), EXTRA (500),
// VUS (32), DURATION (the most the iterations may take, 60s), P95_MS (100), OUT_DIR.

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import {
  BASE_URL, TREND_STATS, bearer, count, createAccounts, failedThresholds, getJson, int, latencyRow,
  latencyTable, listAll, num, requireLoopback,
} from './lib.js';

const BALANCE = int('BALANCE', 1000);
const EXTRA = int('EXTRA', 500);
const VUS = int('VUS', 32);
const DURATION = __ENV.DURATION || '60s';
const P95_MS = num('P95_MS', 100);

requireLoopback('BASE_URL', BASE_URL);

const charged = new Counter('charged_201');
const refused = new Counter('refused_402');
const other = new Counter('unexpected_status');
const ledgerChecks = new Rate('ledger_checks');

export const options = {
  scenarios: {
    charge: { executor: 'shared-iterations', vus: VUS, iterations: BALANCE + EXTRA, maxDuration: DURATION },
  },
  setupTimeout: '60s',
  thresholds: {
    charged_201: [`count==${BALANCE}`],
    refused_402: [`count==${EXTRA}`],
    unexpected_status: ['count==0'],
    'http_req_duration{name:charge}': [`p(95)<${P95_MS}`],
    ledger_checks: ['rate==1'],
    checks: ['rate==1'],
  },
  summaryTrendStats: TREND_STATS,
};

// 402 is an answer this script expects (half the point of it).
http.setResponseCallback(http.expectedStatuses(200, 201, 402));

export function setup() {
  const [account] = createAccounts(1, 'internal', BALANCE);
  const a = getJson(account.key, '/v1/account');
  if (a.credit_balance !== BALANCE) throw new Error(`new account has ${a.credit_balance} credits, not ${BALANCE}`);
  return { key: account.key };
}

export default function (data) {
  const r = http.post(`${BASE_URL}/v1/credits/charge`, '{"amount":1}', Object.assign(bearer(data.key), { tags: { name: 'charge' } }));
  if (r.status === 201) {
    charged.add(1);
    check(r, { '201: a charge of 1, balance_after >= 0': (x) => x.json('delta') === -1 && x.json('balance_after') >= 0 });
  } else if (r.status === 402) {
    refused.add(1);
    check(r, { '402: insufficient_credits problem, balance 0': (x) => x.json('type') === 'insufficient_credits' && x.json('balance') === 0 });
  } else {
    other.add(1);
    console.warn(`POST /v1/credits/charge answered ${r.status}: ${String(r.body).slice(0, 300)}`);
  }
}

function expect(name, ok, detail) {
  ledgerChecks.add(ok);
  console.log(`ledger check ${ok ? 'ok  ' : 'FAIL'} ${name}: ${detail}`);
}

export function teardown(data) {
  const a = getJson(data.key, '/v1/account');
  const ledger = listAll(data.key, '/v1/credits/ledger');
  const sum = ledger.reduce((s, m) => s + m.delta, 0);
  const charges = ledger.filter((m) => m.kind === 'charge');
  expect('balance is exactly 0', a.credit_balance === 0, `balance ${a.credit_balance}`);
  expect('the ledger sums to the balance', sum === a.credit_balance, `sum(delta) ${sum} over ${ledger.length} rows, balance ${a.credit_balance}`);
  expect('one charge row per 201', charges.length === BALANCE && charges.every((m) => m.delta === -1),
    `${charges.length} charge rows, ${BALANCE} expected`);
  const sorted = ledger.slice().sort((x, y) => x.id - y.id);
  let running = 0;
  let chained = true;
  for (const m of sorted) {
    running += m.delta;
    if (m.balance_after !== running || m.balance_after < 0) chained = false;
  }
  expect('balance_after of each row = running sum, never negative', chained, `${sorted.length} rows in id order`);
}

export function handleSummary(data) {
  const failed = failedThresholds(data);
  const row = latencyRow(data, 'charge', 'http_req_duration{name:charge}', null, undefined);
  const it = data.metrics.iterations ? data.metrics.iterations.values : {};
  const lines = latencyTable(`credits.js — ${VUS} VUs, ${BALANCE + EXTRA} charges of 1 against one account holding ${BALANCE}`, [row]);
  lines.unshift('');
  lines.push('');
  lines.push(`201 charged: ${count(data, 'charged_201')} (want ${BALANCE}); 402 refused: ${count(data, 'refused_402')} (want ${EXTRA}); ` +
    `anything else: ${count(data, 'unexpected_status')}; ${fmtRate(it.rate)} charges/s`);
  const lc = data.metrics.ledger_checks ? data.metrics.ledger_checks.values : {};
  lines.push(`ledger checks: ${lc.passes || 0} passed, ${lc.fails || 0} failed`);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/credits-summary.json`] = JSON.stringify({ balance: BALANCE, extra: EXTRA, vus: VUS, charged: count(data, 'charged_201'), refused: count(data, 'refused_402'), unexpected: count(data, 'unexpected_status'), latency: row, thresholds_failed: failed }, null, 2);
  }
  return out;
}

const fmtRate = (r) => (r === undefined ? 'n/a' : r.toFixed(0));
