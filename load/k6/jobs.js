// Scrape jobs under load, against the local upstream: load/run.sh jobs.js
//
// Two scenarios at once, for DURATION:
//   sync  — POST /v1/scrape, answered with the finished job;
//   async — POST /v1/jobs (202), then GET /v1/jobs/{id} every POLL_MS until it ends; a share
//           of them with a webhook_url (the upstream's /hook receiver counts deliveries).
// Targets, drawn per request: UPSTREAM_URL/page (a usable answer: charged), with a share of
// SLOW_SHARE /slow/{TIMEOUT_MS + 1000} (past the job's timeout_ms: 504 job_timeout,
// refunded) and FAIL_SHARE /status/500 (502 upstream_failed, refunded).
//
// Circuit breakers: every target is on host 127.0.0.1, and consecutive failures open the
// host's breaker (5 by default). load/run.sh starts the server for this script with
// KEYMETER_BREAKER_FAILURES=1000000, so the run measures charges and refunds, not an open
// breaker; the other rule (success rate under 50 % over 30 s) cannot trip with at most
// ~20 % failures. Should a breaker open anyway, its 503 upstream_unavailable is accepted and
// counted (jobs_breaker_503), since it is not charged, or is refunded, and the ledger check
// below covers it either way.
//
// teardown waits for every job to end, then checks, through the API only:
//   - GET /v1/account: balance == initial - (charged - refunded), with charged/refunded
//     from GET /v1/usage and, separately, summed from GET /v1/credits/ledger;
//   - every job charged exactly once (one `charge` ledger row per job, for its cost);
//   - GET /v1/jobs?status=succeeded: each charged and not refunded;
//     GET /v1/jobs?status=failed: each charged and refunded (one `refund` row per failed job);
//   - the webhook receiver got a delivery for every finished job that asked for one.
// Each check is a sample of the `ledger_checks` rate, whose threshold is rate == 1.
//
// Environment: BASE_URL, API_KEY, UPSTREAM_URL (run.sh sets them), DURATION (15s), VUS
// (16: three quarters sync, the rest async), TIMEOUT_MS (1000), SLOW_SHARE (0.1),
// FAIL_SHARE (0.1), WEBHOOK_SHARE (0.5 of async jobs), POLL_MS (100), P95_MS (p95 of
// successful sync jobs, 250), OUT_DIR.

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import {
  API_KEY, BASE_URL, TREND_STATS, bearer, count, failedThresholds, fmt, getJson, int, latencyRow,
  latencyTable, listAll, num, requireLoopback, seconds,
} from './lib.js';

const UPSTREAM = __ENV.UPSTREAM_URL || '';
const DURATION = __ENV.DURATION || '15s';
const VUS = int('VUS', 16);
const SYNC_VUS = Math.max(1, Math.ceil((VUS * 3) / 4));
const ASYNC_VUS = Math.max(1, VUS - SYNC_VUS);
const TIMEOUT_MS = int('TIMEOUT_MS', 1000);
const SLOW_SHARE = num('SLOW_SHARE', 0.1);
const FAIL_SHARE = num('FAIL_SHARE', 0.1);
const WEBHOOK_SHARE = num('WEBHOOK_SHARE', 0.5);
const POLL_MS = int('POLL_MS', 100);
const P95_MS = num('P95_MS', 250);
const FORMATS = ['metadata', 'links'];

requireLoopback('BASE_URL', BASE_URL);
requireLoopback('UPSTREAM_URL', UPSTREAM);
const durationS = seconds(DURATION);

const OUTCOME_METRICS = {
  succeeded: 'jobs_succeeded',
  timeout: 'jobs_timeout_refunded',
  failed: 'jobs_upstream_failed_refunded',
  breaker: 'jobs_breaker_503',
  unexpected: 'jobs_unexpected',
};
const outcomes = Object.fromEntries(Object.entries(OUTCOME_METRICS).map(([k, name]) => [k, new Counter(name)]));
const expected = new Rate('jobs_expected_outcome');
const asyncJobMs = new Trend('async_job_ms', true);
const ledgerChecks = new Rate('ledger_checks');
const webhookJobs = new Counter('jobs_with_webhook');

export const options = {
  scenarios: {
    sync: { executor: 'constant-vus', exec: 'syncJob', vus: SYNC_VUS, duration: DURATION, gracefulStop: `${Math.ceil(TIMEOUT_MS / 1000) + 5}s` },
    async: { executor: 'constant-vus', exec: 'asyncJob', vus: ASYNC_VUS, duration: DURATION, gracefulStop: `${Math.ceil(TIMEOUT_MS / 1000) + 5}s` },
  },
  setupTimeout: '60s',
  teardownTimeout: '180s',
  // 502 and 504 are outcomes this script asks for (refunded failures), 503 a tolerated one.
  thresholds: {
    'http_req_failed{scenario:sync}': ['rate<0.01'],
    'http_req_failed{scenario:async}': ['rate<0.01'],
    'http_req_duration{scenario:sync,kind:page}': [`p(95)<${P95_MS}`],
    'http_req_duration{scenario:sync,kind:fail}': [`p(95)<${P95_MS}`],
    // A timed-out job answers at its deadline: timeout_ms from the request, plus what
    // the server needs to record it.
    'http_req_duration{scenario:sync,kind:slow}': [`p(95)<${TIMEOUT_MS + 2500}`],
    'http_req_duration{scenario:async,name:create}': [`p(95)<${P95_MS}`],
    async_job_ms: [`p(95)<${TIMEOUT_MS + 3000}`],
    jobs_expected_outcome: ['rate>0.99'],
    jobs_unexpected: ['count==0'],
    ledger_checks: ['rate==1'],
    checks: ['rate>0.99'],
    'http_reqs{scenario:sync}': ['count>0'],
    'http_reqs{scenario:async,name:create}': ['count>0'],
  },
  summaryTrendStats: TREND_STATS,
};

http.setResponseCallback(http.expectedStatuses(200, 202, 502, 503, 504));

function target() {
  const r = Math.random();
  if (r < SLOW_SHARE) return { kind: 'slow', url: `${UPSTREAM}/slow/${TIMEOUT_MS + 1000}` };
  if (r < SLOW_SHARE + FAIL_SHARE) return { kind: 'fail', url: `${UPSTREAM}/status/500` };
  return { kind: 'page', url: `${UPSTREAM}/page` };
}

const auth = bearer(API_KEY);
const problemType = (r) => {
  try {
    return r.json('type');
  } catch (_) {
    return undefined;
  }
};

// What a finished job must look like for its target.
function jobMatches(kind, job) {
  if (!job) return false;
  if (kind === 'page') {
    return job.status === 'succeeded' && job.charged === true && job.refunded === false &&
      job.result && job.result.metadata && job.result.metadata.title === 'Load test page';
  }
  const reason = job.error && job.error.reason;
  const want = kind === 'slow' ? reason === 'timeout' : reason !== 'timeout' && reason !== undefined;
  return job.status === 'failed' && job.charged === true && job.refunded === true && want;
}

function record(kind, outcome) {
  outcomes[outcome].add(1, { kind });
  const ok = outcome === 'breaker' ||
    (kind === 'page' && outcome === 'succeeded') ||
    (kind === 'slow' && outcome === 'timeout') ||
    (kind === 'fail' && outcome === 'failed');
  expected.add(ok, { kind });
  if (!ok) console.warn(`unexpected outcome for a ${kind} target: ${outcome}`);
}

export function syncJob() {
  const t = target();
  const r = http.post(`${BASE_URL}/v1/scrape`, JSON.stringify({ url: t.url, formats: FORMATS, timeout_ms: TIMEOUT_MS }),
    Object.assign({}, auth, { tags: { kind: t.kind, name: 'scrape' } }));
  const type = problemType(r);
  if (r.status === 503 && type === 'upstream_unavailable') {
    record(t.kind, 'breaker');
    check(r, { 'sync 503: not charged, or refunded': (x) => x.json('job_id') === undefined || x.json('refunded') === true });
    return;
  }
  if (r.status === 200) {
    const ok = check(r, { 'sync 200: the succeeded job, charged, with its metadata': (x) => jobMatches(t.kind, x.json()) });
    record(t.kind, ok ? 'succeeded' : 'unexpected');
  } else if (r.status === 504 && type === 'job_timeout') {
    check(r, { 'sync 504: job_timeout, refunded': (x) => x.json('refunded') === true && !!x.json('job_id') });
    record(t.kind, 'timeout');
  } else if (r.status === 502 && type === 'upstream_failed') {
    check(r, { 'sync 502: upstream_failed, refunded': (x) => x.json('refunded') === true && x.json('upstream_status') === 500 });
    record(t.kind, 'failed');
  } else {
    console.warn(`POST /v1/scrape (${t.kind}) answered ${r.status}: ${String(r.body).slice(0, 300)}`);
    record(t.kind, 'unexpected');
  }
}

export function asyncJob() {
  const t = target();
  const body = { url: t.url, formats: FORMATS, timeout_ms: TIMEOUT_MS };
  const withHook = Math.random() < WEBHOOK_SHARE;
  if (withHook) body.webhook_url = `${UPSTREAM}/hook`;
  const started = Date.now();
  const r = http.post(`${BASE_URL}/v1/jobs`, JSON.stringify(body), Object.assign({}, auth, { tags: { kind: t.kind, name: 'create' } }));
  if (r.status === 503 && problemType(r) === 'upstream_unavailable') {
    record(t.kind, 'breaker');
    return;
  }
  if (!check(r, { 'async: 202 with a Location': (x) => x.status === 202 && x.headers.Location === `/v1/jobs/${x.json('id')}` })) {
    console.warn(`POST /v1/jobs answered ${r.status}: ${String(r.body).slice(0, 300)}`);
    record(t.kind, 'unexpected');
    return;
  }
  if (withHook) webhookJobs.add(1);
  const loc = r.headers.Location;
  const deadline = started + TIMEOUT_MS + 5000;
  let job = null;
  while (Date.now() < deadline) {
    sleep(POLL_MS / 1000);
    const g = http.get(`${BASE_URL}${loc}`, Object.assign({}, auth, { tags: { name: 'poll' } }));
    if (g.status !== 200) continue;
    const j = g.json();
    if (j.status === 'succeeded' || j.status === 'failed' || j.status === 'cancelled') {
      job = j;
      break;
    }
  }
  if (!job) {
    console.warn(`job ${loc} (${t.kind}) did not end within ${TIMEOUT_MS + 5000} ms`);
    record(t.kind, 'unexpected');
    return;
  }
  asyncJobMs.add(Date.now() - started, { kind: t.kind });
  if (!jobMatches(t.kind, job)) {
    if (job.status === 'failed' && job.error && job.error.reason === 'circuit_open' && job.refunded) {
      record(t.kind, 'breaker');
      return;
    }
    console.warn(`job ${loc} (${t.kind}) ended as ${JSON.stringify({ status: job.status, error: job.error, charged: job.charged, refunded: job.refunded })}`);
    record(t.kind, 'unexpected');
    return;
  }
  record(t.kind, job.status === 'succeeded' ? 'succeeded' : t.kind === 'slow' ? 'timeout' : 'failed');
}

export function setup() {
  if (!API_KEY) throw new Error('API_KEY is not set (run through load/run.sh, which creates one)');
  const up = http.get(`${UPSTREAM}/page`);
  if (up.status !== 200) throw new Error(`the upstream ${UPSTREAM}/page answered ${up.status}`);
  const account = getJson(API_KEY, '/v1/account');
  const hooks = http.get(`${UPSTREAM}/stats`).json('hook_deliveries');
  return { initial: account.credit_balance, hooksBefore: hooks };
}

function expect(name, ok, detail) {
  ledgerChecks.add(ok, { check: name });
  console.log(`ledger check ${ok ? 'ok  ' : 'FAIL'} ${name}: ${detail}`);
  return ok;
}

export function teardown(data) {
  // Every job ends by its own deadline; give stragglers (and their refunds) time to land.
  const until = Date.now() + TIMEOUT_MS + 30000;
  let pending = -1;
  while (Date.now() < until) {
    pending = getJson(API_KEY, '/v1/jobs?status=queued&limit=100').data.length +
      getJson(API_KEY, '/v1/jobs?status=running&limit=100').data.length;
    if (pending === 0) break;
    sleep(0.5);
  }
  expect('no job left queued or running', pending === 0, `${pending} pending`);

  const account = getJson(API_KEY, '/v1/account');
  const usage = getJson(API_KEY, '/v1/usage?granularity=hour&from=' + encodeURIComponent(new Date(Date.now() - 2 * 3600e3).toISOString()));
  const charges = listAll(API_KEY, '/v1/credits/ledger?kind=charge');
  const refunds = listAll(API_KEY, '/v1/credits/ledger?kind=refund');
  const succeeded = listAll(API_KEY, '/v1/jobs?status=succeeded');
  const failed = listAll(API_KEY, '/v1/jobs?status=failed');
  const cancelled = listAll(API_KEY, '/v1/jobs?status=cancelled');
  const jobs = succeeded.concat(failed, cancelled);

  const charged = -charges.reduce((s, m) => s + m.delta, 0);
  const refunded = refunds.reduce((s, m) => s + m.delta, 0);
  const balance = account.credit_balance;
  expect('balance == initial - (charged - refunded)', balance === data.initial - (charged - refunded),
    `balance ${balance}, initial ${data.initial}, charged ${charged}, refunded ${refunded}`);
  expect('GET /v1/usage agrees with the ledger', usage.total.charged === charged && usage.total.refunded === refunded,
    `usage charged ${usage.total.charged} refunded ${usage.total.refunded}; ledger ${charged} / ${refunded}`);

  const chargesByJob = {};
  for (const m of charges) {
    if (m.job_id) chargesByJob[m.job_id] = (chargesByJob[m.job_id] || 0) + 1;
  }
  const refundsByJob = {};
  for (const m of refunds) {
    if (m.job_id) refundsByJob[m.job_id] = (refundsByJob[m.job_id] || 0) + 1;
  }
  const jobCost = jobs.reduce((s, j) => s + j.cost, 0);
  const onceEach = jobs.every((j) => chargesByJob[j.id] === 1);
  expect('every job charged exactly once, for its cost', onceEach && charges.length === jobs.length && charged === jobCost,
    `${jobs.length} jobs costing ${jobCost}; ${charges.length} charge rows totalling ${charged}`);
  const badSucceeded = succeeded.filter((j) => !j.charged || j.refunded || refundsByJob[j.id]);
  expect('every succeeded job charged, not refunded', badSucceeded.length === 0,
    `${succeeded.length} succeeded, ${badSucceeded.length} wrong`);
  const badFailed = failed.filter((j) => !j.charged || !j.refunded || refundsByJob[j.id] !== 1);
  const failedCost = failed.concat(cancelled).reduce((s, j) => s + j.cost, 0);
  expect('every failed job refunded exactly once', badFailed.length === 0 && refunds.length === failed.length + cancelled.length && refunded === failedCost,
    `${failed.length} failed (${cancelled.length} cancelled), ${badFailed.length} wrong; ${refunds.length} refund rows totalling ${refunded}, failed jobs cost ${failedCost}`);

  // Webhooks are delivered by a background sender; allow it a few seconds.
  const wantHooks = jobs.filter((j) => j.webhook_url).length;
  let got = 0;
  const hookDeadline = Date.now() + 15000;
  while (Date.now() < hookDeadline) {
    got = http.get(`${UPSTREAM}/stats`).json('hook_deliveries') - data.hooksBefore;
    if (got >= wantHooks) break;
    sleep(0.5);
  }
  expect('a webhook delivery for every finished job that asked for one', got >= wantHooks,
    `${wantHooks} jobs with a webhook_url, ${got} deliveries received`);
  console.log(`jobs in the API: ${succeeded.length} succeeded, ${failed.length} failed, ${cancelled.length} cancelled`);
}

export function handleSummary(data) {
  const rows = [
    latencyRow(data, 'sync page (200)', 'http_req_duration{scenario:sync,kind:page}', null, durationS),
    latencyRow(data, 'sync fail (502)', 'http_req_duration{scenario:sync,kind:fail}', null, durationS),
    latencyRow(data, 'sync slow (504)', 'http_req_duration{scenario:sync,kind:slow}', null, durationS),
    latencyRow(data, 'async create (202)', 'http_req_duration{scenario:async,name:create}', null, durationS),
    latencyRow(data, 'async end-to-end', 'async_job_ms', null, durationS),
  ];
  const failed = failedThresholds(data);
  const lines = latencyTable(`jobs.js — ${SYNC_VUS} sync + ${ASYNC_VUS} async VUs, ${DURATION}, timeout_ms ${TIMEOUT_MS}, ` +
    `targets: ${fmt((1 - SLOW_SHARE - FAIL_SHARE) * 100, 0)}% page, ${fmt(SLOW_SHARE * 100, 0)}% slow, ${fmt(FAIL_SHARE * 100, 0)}% 500`, rows);
  lines.unshift('');
  lines.push('');
  lines.push(`outcomes: succeeded ${count(data, 'jobs_succeeded')}, timed out + refunded ${count(data, 'jobs_timeout_refunded')}, ` +
    `upstream failed + refunded ${count(data, 'jobs_upstream_failed_refunded')}, breaker 503 ${count(data, 'jobs_breaker_503')}, ` +
    `unexpected ${count(data, 'jobs_unexpected')}`);
  const lc = data.metrics.ledger_checks ? data.metrics.ledger_checks.values : {};
  lines.push(`ledger checks: ${lc.passes || 0} passed, ${lc.fails || 0} failed (see the "ledger check" lines above)`);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/jobs-summary.json`] = JSON.stringify({ rows, outcomes: Object.fromEntries(Object.entries(OUTCOME_METRICS).map(([k, name]) => [k, count(data, name)])), thresholds_failed: failed }, null, 2);
  }
  return out;
}
