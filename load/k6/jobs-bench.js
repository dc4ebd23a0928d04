// The job benchmark of issue 5: load/bench/jobs-bench.sh (load/run.sh jobs-bench.js underneath).
//
// 1. The overhead of a job over the raw fetch of the same page: `raw` (k6 GETs
//    UPSTREAM_URL/page itself) vs `scrape` (POST /v1/scrape {url: UPSTREAM_URL/page,
//    formats: [metadata]}: authenticate, reserve the credit and queue the job in one
//    transaction, a worker claims it, fetches the page, extracts the metadata, records the
//    result, and the waiting request answers), same VUs, same duration, one after the other.
// 2. The open-breaker answer time: setup opens the circuit breaker of host `localhost` (the
//    same upstream under another name, so 127.0.0.1 stays healthy) by scraping
//    UPSTREAM_ALT_URL/status/503 until keymeter answers 503 upstream_unavailable; then
//    `breaker` POSTs /v1/scrape for UPSTREAM_ALT_URL/page and gets that 503 (nothing charged,
//    nothing queued). run.sh starts the server for this script with a one-hour open period,
//    so no half-open probe lands inside the measurement.
// References in the same run: `health` (GET /health/live: the HTTP stack alone) and `account`
// (GET /v1/account: HTTP + cached key verification + one SELECT). The `*_1vu` scenarios repeat
// health, raw, scrape, account and breaker with one VU: latency without queueing behind other
// VUs, the closest k6 gets to the server-side time over loopback.
//
// Environment: BASE_URL, API_KEY, UPSTREAM_URL, UPSTREAM_ALT_URL (run.sh), VUS (16), DURATION
// (per scenario, 10s), OUT_DIR.

import http from 'k6/http';
import { check } from 'k6';
import {
  API_KEY, BASE_URL, TREND_STATS, count, failedThresholds, fmt, int, latencyRow, latencyTable,
  requireLoopback, seconds,
} from './lib.js';

const UPSTREAM = __ENV.UPSTREAM_URL || '';
const ALT = __ENV.UPSTREAM_ALT_URL || '';
const VUS = int('VUS', 16);
const DURATION = __ENV.DURATION || '10s';
const GAP_S = 2;

requireLoopback('BASE_URL', BASE_URL);
requireLoopback('UPSTREAM_URL', UPSTREAM);
requireLoopback('UPSTREAM_ALT_URL', ALT);
const durationS = seconds(DURATION);

const ORDER = [
  ['health', VUS], ['raw', VUS], ['scrape', VUS], ['breaker', VUS], ['account', VUS],
  ['health_1vu', 1], ['raw_1vu', 1], ['scrape_1vu', 1], ['account_1vu', 1], ['breaker_1vu', 1],
];
const scenarios = {};
ORDER.forEach(([name, vus], i) => {
  scenarios[name] = {
    executor: 'constant-vus',
    exec: name.replace('_1vu', ''),
    vus,
    duration: DURATION,
    startTime: `${i * (durationS + GAP_S)}s`,
    gracefulStop: `${GAP_S}s`,
  };
});

export const options = {
  scenarios,
  setupTimeout: '60s',
  thresholds: Object.fromEntries(
    ORDER.flatMap(([s]) => [
      [`http_req_duration{scenario:${s}}`, ['p(95)<1000']],
      [`checks{scenario:${s}}`, ['rate>0.99']],
      [`http_reqs{scenario:${s}}`, ['count>0']],
    ]),
  ),
  summaryTrendStats: TREND_STATS,
};
http.setResponseCallback(http.expectedStatuses(200, 503));

const auth = { headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' } };
const PAGE_BODY = JSON.stringify({ url: `${UPSTREAM}/page`, formats: ['metadata'] });
const OPEN_BODY = JSON.stringify({ url: `${ALT}/page`, formats: ['metadata'] });

export function health() {
  check(http.get(`${BASE_URL}/health/live`), { 'health: 200': (r) => r.status === 200 });
}

export function raw() {
  check(http.get(`${UPSTREAM}/page`), { 'raw: 200': (r) => r.status === 200 && r.body.length > 9000 });
}

export function scrape() {
  const r = http.post(`${BASE_URL}/v1/scrape`, PAGE_BODY, auth);
  check(r, { 'scrape: 200, succeeded, title extracted': (x) => x.status === 200 && x.json('result.metadata.title') === 'Load test page' });
}

export function breaker() {
  const r = http.post(`${BASE_URL}/v1/scrape`, OPEN_BODY, auth);
  check(r, { 'breaker: 503 upstream_unavailable, no job': (x) => x.status === 503 && x.json('type') === 'upstream_unavailable' && x.json('job_id') === undefined });
}

export function account() {
  check(http.get(`${BASE_URL}/v1/account`, auth), { 'account: 200': (r) => r.status === 200 });
}

export function setup() {
  if (!API_KEY) throw new Error('API_KEY is not set (run through load/run.sh)');
  const body = JSON.stringify({ url: `${ALT}/status/503`, formats: ['metadata'], timeout_ms: 2000 });
  for (let i = 1; i <= 40; i++) {
    const r = http.post(`${BASE_URL}/v1/scrape`, body, auth);
    if (r.status === 503 && r.json('type') === 'upstream_unavailable' && r.json('job_id') === undefined) {
      console.log(`breaker for localhost open after ${i} scrapes of /status/503`);
      const page = http.post(`${BASE_URL}/v1/scrape`, PAGE_BODY, auth);
      if (page.status !== 200) throw new Error(`127.0.0.1's page should still scrape, got ${page.status}: ${page.body}`);
      return { opened_after: i };
    }
  }
  throw new Error('the breaker for localhost did not open after 40 failing scrapes');
}

export function handleSummary(data) {
  const row = (s) => latencyRow(data, s, `http_req_duration{scenario:${s}}`, `http_reqs{scenario:${s}}`, durationS);
  const rows = ORDER.map(([s]) => row(s));
  const by = Object.fromEntries(rows.map((r) => [r.label, r]));
  const failed = failedThresholds(data);
  const lines = latencyTable(`jobs-bench.js — ${DURATION} per scenario, ${VUS} VUs (the *_1vu rows: 1 VU), one scenario after the other`, rows);
  lines.unshift('');
  lines.push('');
  lines.push(`job overhead over the raw fetch (${VUS} VUs): p50 +${fmt(by.scrape.p50 - by.raw.p50, 2)} ms (${fmt(by.scrape.p50 / by.raw.p50, 1)}×), ` +
    `p95 +${fmt(by.scrape.p95 - by.raw.p95, 2)} ms (${fmt(by.scrape.p95 / by.raw.p95, 1)}×); ` +
    `throughput ${fmt(by.scrape.rps, 0)} vs ${fmt(by.raw.rps, 0)} req/s (${fmt(by.scrape.rps / by.raw.rps, 3)})`);
  lines.push(`job overhead over the raw fetch (1 VU): p50 +${fmt(by.scrape_1vu.p50 - by.raw_1vu.p50, 2)} ms (${fmt(by.scrape_1vu.p50 / by.raw_1vu.p50, 1)}×), ` +
    `p95 +${fmt(by.scrape_1vu.p95 - by.raw_1vu.p95, 2)} ms; throughput ${fmt(by.scrape_1vu.rps, 0)} vs ${fmt(by.raw_1vu.rps, 0)} req/s`);
  lines.push(`open-breaker answer, 1 VU: p50 ${fmt(by.breaker_1vu.p50, 3)} / p95 ${fmt(by.breaker_1vu.p95, 3)} / p99 ${fmt(by.breaker_1vu.p99, 3)} ms; ` +
    `floor /health/live p50 ${fmt(by.health_1vu.p50, 3)} ms, cached-key GET /v1/account p50 ${fmt(by.account_1vu.p50, 3)} ms; ` +
    `breaker − health p50 ${fmt((by.breaker_1vu.p50 - by.health_1vu.p50) * 1000, 0)} µs`);
  lines.push(`open-breaker answer, ${VUS} VUs: p50 ${fmt(by.breaker.p50, 3)} / p95 ${fmt(by.breaker.p95, 3)} / p99 ${fmt(by.breaker.p99, 3)} ms, ` +
    `${fmt(by.breaker.rps, 0)} req/s (health ${fmt(by.health.rps, 0)} req/s)`);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/jobs-bench-summary.json`] = JSON.stringify({ vus: VUS, duration_s: durationS, rows, checks: count(data, 'checks'), thresholds_failed: failed }, null, 2);
  }
  return out;
}
