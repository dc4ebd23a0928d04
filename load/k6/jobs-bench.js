// One scenario of the job benchmark (issue 14): load/bench/jobs-bench.sh runs this script once
// per scenario and per server, and prints the table; it is not meant to be run alone (it can:
// SCENARIO=scrape_1vu load/run.sh jobs-bench.js, with the internal tier's key).
//
// Why one k6 run per scenario: jobs-bench.sh reads the database's counters
// (pg_stat_database.xact_commit) before and after each one, so commits per job are
// measured per scenario, and the servers of the two binaries are measured one after the other
// with the same scenarios.
//
// Scenarios (SCENARIO):
//   raw_1vu, raw        GET UPSTREAM_URL/page straight from k6 (1 VU, VUS VUs): the floor.
//   health_1vu, health  GET /health/live (1 VU, VUS VUs): the HTTP stack alone.
//   scrape_1vu          POST /v1/scrape {url: UPSTREAM_URL/page, formats: [metadata]},
//                       1 VU, the first key of API_KEYS.
//   scrape_accounts     the same with VUS VUs, VU n on key n mod len(API_KEYS): one client
//                       per account.
//   scrape_one          the same with VUS VUs, all on the first key: one account.
//   breaker_1vu, breaker  POST /v1/scrape for UPSTREAM_ALT_URL/page while its host's breaker
//                       is open (setup opens it): the 503 answer time.
//
// Environment: BASE_URL, UPSTREAM_URL, UPSTREAM_ALT_URL, API_KEYS (comma-separated; API_KEY
// when unset), SCENARIO, VUS (16), DURATION (10s), LABEL (names the summary file), OUT_DIR.

import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import {
  API_KEY, BASE_URL, TREND_STATS, count, failedThresholds, fmt, int, latencyRow, latencyTable,
  requireLoopback, seconds, values,
} from './lib.js';

const UPSTREAM = __ENV.UPSTREAM_URL || '';
const ALT = __ENV.UPSTREAM_ALT_URL || '';
const VUS = int('VUS', 16);
const DURATION = __ENV.DURATION || '10s';
const SCENARIO = __ENV.SCENARIO || 'scrape_1vu';
const LABEL = __ENV.LABEL || 'run';
const KEYS = (__ENV.API_KEYS || API_KEY).split(',').filter((k) => k !== '');

// name -> [function, VUs]
const SCENARIOS = {
  raw_1vu: ['raw', 1],
  raw: ['raw', VUS],
  health_1vu: ['health', 1],
  health: ['health', VUS],
  scrape_1vu: ['scrapeOne', 1],
  scrape_accounts: ['scrapeSpread', VUS],
  scrape_one: ['scrapeOne', VUS],
  breaker_1vu: ['breaker', 1],
  breaker: ['breaker', VUS],
};
if (!SCENARIOS[SCENARIO]) throw new Error(`SCENARIO must be one of ${Object.keys(SCENARIOS).join(', ')}, got ${SCENARIO}`);
const [FN, N_VUS] = SCENARIOS[SCENARIO];
const NEEDS_SERVER = FN !== 'raw';

requireLoopback('UPSTREAM_URL', UPSTREAM);
if (NEEDS_SERVER) requireLoopback('BASE_URL', BASE_URL);
if (FN === 'breaker') requireLoopback('UPSTREAM_ALT_URL', ALT);
if (FN.startsWith('scrape') && KEYS.length === 0) throw new Error('API_KEYS is not set');
const durationS = seconds(DURATION);

export const options = {
  scenarios: {
    [SCENARIO]: { executor: 'constant-vus', exec: FN, vus: N_VUS, duration: DURATION, gracefulStop: '5s' },
  },
  setupTimeout: '60s',
  thresholds: {
    [`http_req_duration{scenario:${SCENARIO}}`]: ['p(95)<2000'],
    [`checks{scenario:${SCENARIO}}`]: ['rate>0.99'],
    [`http_reqs{scenario:${SCENARIO}}`]: ['count>0'],
  },
  summaryTrendStats: TREND_STATS,
};
http.setResponseCallback(http.expectedStatuses(200, 503));

const headers = (key) => ({ headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' } });
const PAGE_BODY = JSON.stringify({ url: `${UPSTREAM}/page`, formats: ['metadata'] });
const OPEN_BODY = JSON.stringify({ url: `${ALT}/page`, formats: ['metadata'] });
const scraped = (x) => x.status === 200 && x.json('result.metadata.title') === 'Load test page';

export function health() {
  check(http.get(`${BASE_URL}/health/live`), { 'health: 200': (r) => r.status === 200 });
}

export function raw() {
  check(http.get(`${UPSTREAM}/page`), { 'raw: 200': (r) => r.status === 200 && r.body.length > 9000 });
}

const ONE = headers(KEYS[0] || '');
export function scrapeOne() {
  check(http.post(`${BASE_URL}/v1/scrape`, PAGE_BODY, ONE), { 'scrape: 200, title extracted': scraped });
}

// A VU keeps its account for the whole run: VU ids of one scenario are 1..VUS.
let mine = null;
export function scrapeSpread() {
  if (mine === null) mine = headers(KEYS[(exec.vu.idInTest - 1) % KEYS.length]);
  check(http.post(`${BASE_URL}/v1/scrape`, PAGE_BODY, mine), { 'scrape: 200, title extracted': scraped });
}

export function breaker() {
  const r = http.post(`${BASE_URL}/v1/scrape`, OPEN_BODY, ONE);
  check(r, { 'breaker: 503 upstream_unavailable, no job': (x) => x.status === 503 && x.json('type') === 'upstream_unavailable' && x.json('job_id') === undefined });
}

export function setup() {
  if (FN !== 'breaker') return {};
  // Open the breaker of host `localhost` (the same upstream under another name, so
  // 127.0.0.1 stays healthy) by scraping its /status/503 until keymeter answers 503.
  const body = JSON.stringify({ url: `${ALT}/status/503`, formats: ['metadata'], timeout_ms: 2000 });
  for (let i = 1; i <= 40; i++) {
    const r = http.post(`${BASE_URL}/v1/scrape`, body, ONE);
    if (r.status === 503 && r.json('type') === 'upstream_unavailable' && r.json('job_id') === undefined) {
      return { opened_after: i };
    }
  }
  throw new Error('the breaker for localhost did not open after 40 failing scrapes');
}

export function handleSummary(data) {
  const row = latencyRow(data, SCENARIO, `http_req_duration{scenario:${SCENARIO}}`, `http_reqs{scenario:${SCENARIO}}`, durationS);
  row.vus = N_VUS;
  row.checks_rate = values(data, `checks{scenario:${SCENARIO}}`).rate;
  const failed = failedThresholds(data);
  const lines = latencyTable(`${LABEL} ${SCENARIO}: ${DURATION}, ${N_VUS} VU(s), checks ${fmt((row.checks_rate || 0) * 100, 2)} % ok`, [row]);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/jobs-bench-${LABEL}-${SCENARIO}.json`] = JSON.stringify(
      { label: LABEL, scenario: SCENARIO, duration_s: durationS, row, checks: count(data, 'checks'), thresholds_failed: failed }, null, 2);
  }
  return out;
}
