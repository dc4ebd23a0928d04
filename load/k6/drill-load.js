// The load under the fault drills (load/drills/pg-restart.sh, load/drills/sigterm.sh): a mix
// of requests, each logged with its start and end time so the drill can line them up with
// the moment it broke something. Not a benchmark: requests are paced (PACE_MS) so the
// machine has room for the fault itself.
//
// One log line per request on the console (the drills send it to a file with
// --console-output):  REQ <t0 ms> <t1 ms> <status> <kind> <problem type|-> <k6 error code|->
// Status 0 means no HTTP response at all (refused, reset, timed out).
// With ACKS=1, every charge answered 201 also logs  ACK <t0 ms> <t1 ms> <ledger id> <account id>
// (load/drills/restore.sh checks that the charges acknowledged before a backup are in it).
//
// Environment: BASE_URL, UPSTREAM_URL (run by the drills), KEYS (comma-separated API keys,
// default API_KEY), MIX (comma-separated kinds, default account,charge), DURATION (20s),
// VUS (8), PACE_MS (10), REQ_TIMEOUT (30s), SCRAPE_MS (500: how slow the page of a sync
// scrape is), JOB_SHORT_MS (1000) and JOB_LONG_MS (8000): how slow the pages of async jobs are.
//
// Kinds: account (GET /v1/account), charge (POST /v1/credits/charge {amount: 1}), scrape
// (POST /v1/scrape of UPSTREAM_URL/slow/SCRAPE_MS), job_short / job_long (POST /v1/jobs of
// UPSTREAM_URL/slow/JOB_*_MS with timeout_ms 60000: still running when the fault comes).

import http from 'k6/http';
import { sleep } from 'k6';
import { API_KEY, BASE_URL, int, requireLoopback } from './lib.js';

const KEYS = (__ENV.KEYS || API_KEY).split(',').filter((k) => k);
const MIX = (__ENV.MIX || 'account,charge').split(',');
const UPSTREAM = __ENV.UPSTREAM_URL || '';
const PACE_MS = int('PACE_MS', 10);
const REQ_TIMEOUT = __ENV.REQ_TIMEOUT || '30s';
const SCRAPE_MS = int('SCRAPE_MS', 500);
const JOB_SHORT_MS = int('JOB_SHORT_MS', 1000);
const JOB_LONG_MS = int('JOB_LONG_MS', 8000);
const ACKS = __ENV.ACKS === '1';

requireLoopback('BASE_URL', BASE_URL);
if (KEYS.length === 0) throw new Error('KEYS (or API_KEY) is not set');
if (MIX.some((k) => k.startsWith('job') || k === 'scrape')) requireLoopback('UPSTREAM_URL', UPSTREAM);

export const options = {
  scenarios: { drill: { executor: 'constant-vus', vus: int('VUS', 8), duration: __ENV.DURATION || '20s', gracefulStop: '35s' } },
  // The drills judge the requests from the log; k6's own pass/fail is not the verdict.
  thresholds: {},
  summaryTrendStats: ['med', 'p(95)', 'p(99)', 'max', 'count'],
};
// Failures are what a drill provokes; do not count them as k6 request failures.
http.setResponseCallback(http.expectedStatuses({ min: 100, max: 599 }));

function request(kind, key) {
  const params = { headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' }, timeout: REQ_TIMEOUT, tags: { kind } };
  switch (kind) {
    case 'account':
      return http.get(`${BASE_URL}/v1/account`, params);
    case 'charge':
      return http.post(`${BASE_URL}/v1/credits/charge`, '{"amount":1}', params);
    case 'scrape':
      return http.post(`${BASE_URL}/v1/scrape`, JSON.stringify({ url: `${UPSTREAM}/slow/${SCRAPE_MS}`, timeout_ms: 60000 }), params);
    case 'job_short':
      return http.post(`${BASE_URL}/v1/jobs`, JSON.stringify({ url: `${UPSTREAM}/slow/${JOB_SHORT_MS}`, timeout_ms: 60000 }), params);
    case 'job_long':
      return http.post(`${BASE_URL}/v1/jobs`, JSON.stringify({ url: `${UPSTREAM}/slow/${JOB_LONG_MS}`, timeout_ms: 60000 }), params);
    default:
      throw new Error(`unknown kind ${kind}`);
  }
}

export default function () {
  const kind = MIX[Math.floor(Math.random() * MIX.length)];
  const key = KEYS[Math.floor(Math.random() * KEYS.length)];
  const t0 = Date.now();
  const r = request(kind, key);
  const t1 = Date.now();
  let type = '-';
  if (r.status >= 400) {
    try {
      type = r.json('type') || '-';
    } catch (_) {
      type = 'not-json';
    }
    const ct = r.headers['Content-Type'] || '';
    if (type !== 'not-json' && !ct.startsWith('application/problem+json')) type = `${type}(ct:${ct || 'none'})`;
  }
  console.log(`REQ ${t0} ${t1} ${r.status} ${kind} ${type} ${r.error_code || '-'}`);
  if (ACKS && kind === 'charge' && r.status === 201) {
    let id = '-';
    let account = '-';
    try {
      id = r.json('id');
      account = r.json('account_id');
    } catch (_) {
      // logged as '-': the drill counts it as an acknowledgement it cannot check
    }
    console.log(`ACK ${t0} ${t1} ${id} ${account}`);
  }
  if (PACE_MS > 0) sleep(PACE_MS / 1000);
}

export function handleSummary() {
  return {};
}
