// Mixed load at a steady rate for a long time: run by load/drills/soak.sh (which samples the
// server's RSS meanwhile). Every scenario is a constant arrival rate, so the server sees the
// same work per second from the first minute to the last:
//   auth    — GET /v1/account with the cached key                         (AUTH_RPS, 200/s)
//   charge  — POST /v1/credits/charge {amount: 1}, every other one with a fresh
//             Idempotency-Key                                             (CHARGE_RPS, 100/s)
//   scrape  — sync POST /v1/scrape of UPSTREAM_URL/page                   (SCRAPE_RPS, 10/s)
//   job     — async POST /v1/jobs of UPSTREAM_URL/page with a webhook_url (JOB_RPS, 5/s)
//   badkey  — GET /v1/account with a made-up key id each time (401; fills the negative
//             cache, the per-IP failure limiter)                          (BADKEY_RPS, 5/s)
// Thresholds: errors < 1 % and p95 < P95_MS (default 250) per scenario.
//
// Environment: BASE_URL, API_KEY, UPSTREAM_URL (set by the drill), DURATION (10m), the rates.

import http from 'k6/http';
import { check } from 'k6';
import {
  API_KEY, BASE_URL, TREND_STATS, failedThresholds, fmt, int, latencyRow, latencyTable, num, randomChars, requireLoopback,
  seconds, withChecksum,
} from './lib.js';

const UPSTREAM = __ENV.UPSTREAM_URL || '';
const DURATION = __ENV.DURATION || '10m';
const P95_MS = num('P95_MS', 250);
requireLoopback('BASE_URL', BASE_URL);
requireLoopback('UPSTREAM_URL', UPSTREAM);
const durationS = seconds(DURATION);

const RATES = {
  auth: int('AUTH_RPS', 200),
  charge: int('CHARGE_RPS', 100),
  scrape: int('SCRAPE_RPS', 10),
  job: int('JOB_RPS', 5),
  badkey: int('BADKEY_RPS', 5),
};
const scenarios = {};
for (const [name, rate] of Object.entries(RATES)) {
  if (rate <= 0) continue;
  scenarios[name] = {
    executor: 'constant-arrival-rate',
    exec: name,
    rate,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: Math.max(2, Math.ceil(rate / 20)),
    maxVUs: Math.max(10, rate),
  };
}

export const options = {
  scenarios,
  thresholds: Object.fromEntries(
    Object.keys(scenarios).flatMap((s) => [
      [`http_req_failed{scenario:${s}}`, ['rate<0.01']],
      [`http_req_duration{scenario:${s}}`, [`p(95)<${P95_MS}`]],
      [`http_reqs{scenario:${s}}`, ['count>0']],
    ]).concat([['checks', ['rate>0.99']]]),
  ),
  summaryTrendStats: TREND_STATS,
};
http.setResponseCallback(http.expectedStatuses(200, 201, 202, 401));

const KEYED = { headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' } };

export function auth() {
  check(http.get(`${BASE_URL}/v1/account`, KEYED), { 'auth: 200': (r) => r.status === 200 });
}

export function charge() {
  const params = Math.random() < 0.5
    ? { headers: Object.assign({ 'Idempotency-Key': `soak-${randomChars(20)}` }, KEYED.headers) }
    : KEYED;
  check(http.post(`${BASE_URL}/v1/credits/charge`, '{"amount":1}', params), { 'charge: 201': (r) => r.status === 201 });
}

export function scrape() {
  const r = http.post(`${BASE_URL}/v1/scrape`, JSON.stringify({ url: `${UPSTREAM}/page` }), KEYED);
  check(r, { 'scrape: 200': (x) => x.status === 200 });
}

export function job() {
  const r = http.post(`${BASE_URL}/v1/jobs`, JSON.stringify({ url: `${UPSTREAM}/page`, webhook_url: `${UPSTREAM}/hook` }), KEYED);
  check(r, { 'job: 202': (x) => x.status === 202 });
}

export function badkey() {
  // Checksum-valid, so they get past the format check to the cache and the database.
  const key = withChecksum(`km_live_${randomChars(12)}_${randomChars(43)}`);
  const r = http.get(`${BASE_URL}/v1/account`, { headers: { Authorization: `Bearer ${key}` } });
  check(r, { 'badkey: 401': (x) => x.status === 401 });
}

export function handleSummary(data) {
  const rows = Object.keys(scenarios).map((s) => latencyRow(data, s, `http_req_duration{scenario:${s}}`, `http_reqs{scenario:${s}}`, durationS));
  const failed = failedThresholds(data);
  const lines = latencyTable(`soak.js — ${DURATION} at ${Object.entries(RATES).map(([k, v]) => `${k} ${v}/s`).join(', ')}`, rows);
  lines.unshift('');
  lines.push('');
  lines.push(failed.length === 0 ? `thresholds: all passed (errors < 1%, p95 < ${fmt(P95_MS, 0)} ms per scenario)` : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) out[`${__ENV.OUT_DIR}/soak-summary.json`] = JSON.stringify({ rows, rates: RATES, thresholds_failed: failed }, null, 2);
  return out;
}
