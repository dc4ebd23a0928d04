// Cost of authentication under load: load/run.sh auth.js
//
// Two scenarios, one after the other (never at once: they would share the 2 cores):
//   health  — GET /health/live, no key: the HTTP stack alone, the ceiling;
//   account — GET /v1/account with a cached key: HTTP stack + key verification (cache hit)
//             + one SELECT of the account row.
// Same VUs and duration for both. The end-of-test summary prints each scenario's
// requests/second and p95, and account/health (the share of the ceiling an authenticated
// route keeps; target >= 0.7).
//
// Environment (run.sh sets the first two): BASE_URL, API_KEY, DURATION (per scenario,
// default 15s), VUS (default 32), P95_MS (p95 threshold per scenario, default 50),
// OUT_DIR (where to write auth-summary.json; optional).

import http from 'k6/http';
import { check } from 'k6';
import { API_KEY, BASE_URL, requireLoopback, seconds } from './lib.js';

const DURATION = __ENV.DURATION || '15s';
const VUS = parseInt(__ENV.VUS || '32', 10);
const P95_MS = parseFloat(__ENV.P95_MS || '50');
const GAP = '3s'; // between the two scenarios: lets the first one's last requests drain
const RATIO_TARGET = 0.7;

requireLoopback('BASE_URL', BASE_URL);

const durationS = seconds(DURATION);
const gapS = seconds(GAP);

const SCENARIOS = ['health', 'account'];

export const options = {
  scenarios: {
    health: {
      executor: 'constant-vus',
      exec: 'health',
      vus: VUS,
      duration: DURATION,
      gracefulStop: GAP,
    },
    account: {
      executor: 'constant-vus',
      exec: 'account',
      vus: VUS,
      duration: DURATION,
      gracefulStop: GAP,
      startTime: `${durationS + gapS}s`,
    },
  },
  // Per-scenario sub-metrics (k6 tags every sample with its scenario). Listing them here is
  // also what puts them into handleSummary's data.
  thresholds: Object.fromEntries(
    SCENARIOS.flatMap((s) => [
      [`http_req_failed{scenario:${s}}`, ['rate<0.01']],
      [`http_req_duration{scenario:${s}}`, [`p(95)<${P95_MS}`]],
      [`checks{scenario:${s}}`, ['rate>0.99']],
      [`http_reqs{scenario:${s}}`, ['count>0']],
    ]),
  ),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

const authHeaders = { headers: { Authorization: `Bearer ${API_KEY}` } };

export function health() {
  const res = http.get(`${BASE_URL}/health/live`);
  check(res, { 'health: 200': (r) => r.status === 200 });
}

export function account() {
  const res = http.get(`${BASE_URL}/v1/account`, authHeaders);
  check(res, {
    'account: 200': (r) => r.status === 200,
    'account: is an account': (r) => r.status === 200 && r.json('object') === 'account',
  });
}

export function setup() {
  if (!API_KEY) {
    throw new Error('API_KEY is not set (run through load/run.sh, which creates one)');
  }
  // Warms the key cache, and fails fast on a wrong key instead of 15 s of 401s.
  const res = http.get(`${BASE_URL}/v1/account`, authHeaders);
  if (res.status !== 200) {
    throw new Error(`GET /v1/account with the key answered ${res.status}: ${res.body}`);
  }
}

function metric(data, name) {
  return data.metrics[name] ? data.metrics[name].values : undefined;
}

function thresholdsOk(data) {
  const failed = [];
  for (const [name, m] of Object.entries(data.metrics)) {
    for (const [expr, t] of Object.entries(m.thresholds || {})) {
      if (!t.ok) failed.push(`${name}: ${expr}`);
    }
  }
  return failed;
}

const fmt = (x, digits = 1) => (x === undefined || Number.isNaN(x) ? 'n/a' : x.toFixed(digits));

export function handleSummary(data) {
  const per = {};
  for (const s of SCENARIOS) {
    const reqs = metric(data, `http_reqs{scenario:${s}}`) || {};
    const dur = metric(data, `http_req_duration{scenario:${s}}`) || {};
    const failed = metric(data, `http_req_failed{scenario:${s}}`) || {};
    const checks = metric(data, `checks{scenario:${s}}`) || {};
    per[s] = {
      requests: reqs.count || 0,
      // Over the scenario's own duration; k6's http_reqs rate divides by the whole run.
      rps: (reqs.count || 0) / durationS,
      p50_ms: dur.med,
      p90_ms: dur['p(90)'],
      p95_ms: dur['p(95)'],
      p99_ms: dur['p(99)'],
      max_ms: dur.max,
      failed_rate: failed.rate,
      checks_rate: checks.rate,
    };
  }
  const ratio = per.health.rps > 0 ? per.account.rps / per.health.rps : NaN;
  const failedThresholds = thresholdsOk(data);
  const result = {
    vus: VUS,
    duration_s: durationS,
    p95_threshold_ms: P95_MS,
    scenarios: per,
    ratio_account_to_health: ratio,
    ratio_target: RATIO_TARGET,
    ratio_met: ratio >= RATIO_TARGET,
    thresholds_failed: failedThresholds,
  };

  const lines = [
    '',
    `auth.js — ${VUS} VUs, ${DURATION} per scenario, one scenario after the other`,
    '',
    'scenario    requests        req/s    p50 ms    p90 ms    p95 ms    p99 ms    max ms   failed',
  ];
  for (const s of SCENARIOS) {
    const p = per[s];
    lines.push(
      [
        s.padEnd(9),
        String(p.requests).padStart(10),
        fmt(p.rps).padStart(12),
        fmt(p.p50_ms, 2).padStart(9),
        fmt(p.p90_ms, 2).padStart(9),
        fmt(p.p95_ms, 2).padStart(9),
        fmt(p.p99_ms, 2).padStart(9),
        fmt(p.max_ms, 2).padStart(9),
        `${fmt((p.failed_rate || 0) * 100, 2)}%`.padStart(8),
      ].join(' '),
    );
  }
  lines.push('');
  lines.push(
    `account/health throughput ratio: ${fmt(ratio, 3)} ` +
      `(target >= ${RATIO_TARGET}: ${ratio >= RATIO_TARGET ? 'met' : 'NOT met'})`,
  );
  lines.push(
    failedThresholds.length === 0
      ? `thresholds: all passed (errors < 1%, checks > 99%, p95 < ${P95_MS} ms per scenario)`
      : `thresholds FAILED: ${failedThresholds.join('; ')}`,
  );
  lines.push('');

  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/auth-summary.json`] = JSON.stringify(result, null, 2);
  }
  return out;
}
