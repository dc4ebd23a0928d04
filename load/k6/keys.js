// Key verification against a large api_keys table: run by load/bench/keys.sh, which seeds the table
// with filler keys by SQL (1,000, then 1,000,000) and runs this script once per size.
//
// setup creates COLD_KEYS + HOT_KEYS real keys for one account through the admin API
// (POST /admin/accounts/{id}/keys). Then, one after the other, on GET /v1/account:
//   hot  — VUS virtual users for DURATION on the HOT_KEYS keys (used once in setup, so
//          cached): every request is a cache hit, the reference for the cold figures;
//   cold — each of the COLD_KEYS keys used exactly once (shared-iterations, same VUs): every
//          request is a key-cache miss, i.e. one indexed SELECT by key id in the table of
//          this size, then the cache insert.
// The account lookup after verification is the same in both, so the difference between the
// two is the cost of the miss.
//
// Environment: BASE_URL, ADMIN_TOKEN (set by run.sh/keys.sh), TABLE_KEYS (rows in api_keys,
// for the report), PHASE (a label, e.g. 1000), COLD_KEYS (500), HOT_KEYS (10), VUS (16),
// DURATION (hot scenario, 10s), COLD_MAX_S (the most the cold
// scenario may take, 60), P95_MS (50), OUT_DIR.

import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import {
  ADMIN_TOKEN, BASE_URL, TREND_STATS, createAccounts, failedThresholds, int, latencyRow, latencyTable,
  num, requireLoopback, seconds,
} from './lib.js';

const PHASE = __ENV.PHASE || 'keys';
const TABLE_KEYS = __ENV.TABLE_KEYS || 'unknown';
const COLD_KEYS = int('COLD_KEYS', 500);
const HOT_KEYS = int('HOT_KEYS', 10);
const VUS = int('VUS', 16);
const DURATION = __ENV.DURATION || '10s';
const P95_MS = num('P95_MS', 50);
const GAP = 2;
const durationS = seconds(DURATION);
const COLD_MAX_S = int('COLD_MAX_S', 60);

requireLoopback('BASE_URL', BASE_URL);

export const options = {
  scenarios: {
    hot: { executor: 'constant-vus', exec: 'hot', vus: VUS, duration: DURATION, gracefulStop: `${GAP}s` },
    cold: { executor: 'shared-iterations', exec: 'cold', vus: VUS, iterations: COLD_KEYS, maxDuration: `${COLD_MAX_S}s`, startTime: `${durationS + GAP}s` },
  },
  setupTimeout: '300s',
  thresholds: {
    'http_req_failed{scenario:cold}': ['rate<0.01'],
    'http_req_failed{scenario:hot}': ['rate<0.01'],
    'http_req_duration{scenario:cold}': [`p(95)<${P95_MS}`],
    'http_req_duration{scenario:hot}': [`p(95)<${P95_MS}`],
    'http_reqs{scenario:cold}': [`count==${COLD_KEYS}`],
    checks: ['rate>0.99'],
  },
  summaryTrendStats: TREND_STATS,
};

function adminPost(path, body) {
  return ['POST', `${BASE_URL}${path}`, JSON.stringify(body),
    { headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${ADMIN_TOKEN}` }, tags: { name: 'setup' } }];
}

export function setup() {
  const [account] = createAccounts(1, 'internal', 0);
  const keys = [];
  const total = COLD_KEYS + HOT_KEYS;
  for (let i = 0; i < total; i += 50) {
    const reqs = [];
    for (let j = i; j < Math.min(total, i + 50); j++) {
      reqs.push(adminPost(`/admin/accounts/${account.id}/keys`, { name: `load-${j}`, scopes: ['read'] }));
    }
    for (const r of http.batch(reqs)) {
      if (r.status !== 201) throw new Error(`key creation failed: ${r.status} ${r.body}`);
      keys.push(r.json('key') || r.json('api_key'));
    }
  }
  const hot = keys.slice(COLD_KEYS);
  for (const k of hot) {
    const r = http.get(`${BASE_URL}/v1/account`, { headers: { Authorization: `Bearer ${k}` }, tags: { name: 'setup' } });
    if (r.status !== 200) throw new Error(`a new key answered ${r.status}: ${r.body}`);
  }
  return { cold: keys.slice(0, COLD_KEYS), hot };
}

function get(key) {
  const r = http.get(`${BASE_URL}/v1/account`, { headers: { Authorization: `Bearer ${key}` } });
  check(r, { 'GET /v1/account: 200': (x) => x.status === 200 });
}

export function cold(data) {
  get(data.cold[exec.scenario.iterationInTest]);
}

export function hot(data) {
  get(data.hot[Math.floor(Math.random() * data.hot.length)]);
}

export function handleSummary(data) {
  const failed = failedThresholds(data);
  const coldRow = latencyRow(data, 'cold (cache miss)', 'http_req_duration{scenario:cold}', null, undefined);
  const hotRow = latencyRow(data, 'hot (cache hit)', 'http_req_duration{scenario:hot}', null, durationS);
  const lines = latencyTable(`keys.js [${PHASE}] — api_keys holds ${TABLE_KEYS} rows; ${VUS} VUs × ${DURATION} on ${HOT_KEYS} cached keys (hot), then ${COLD_KEYS} first uses (cold)`, [coldRow, hotRow]);
  lines.unshift('');
  lines.push('');
  lines.push(`miss − hit: p50 ${(coldRow.p50 - hotRow.p50).toFixed(2)} ms, p95 ${(coldRow.p95 - hotRow.p95).toFixed(2)} ms`);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/keys-${PHASE}.json`] = JSON.stringify({ phase: PHASE, table_keys: TABLE_KEYS, vus: VUS, cold: coldRow, hot: hotRow, thresholds_failed: failed }, null, 2);
  }
  return out;
}
