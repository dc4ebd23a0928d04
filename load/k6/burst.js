// A burst of jobs for one account on idle workers: load/run.sh burst.js
//
// ROUNDS times: JOBS async jobs (POST /v1/jobs of UPSTREAM_URL/slow/SLOW_MS) queued at once
// for one account of tier TIER (default business: 50 concurrent jobs, so its claims go
// through the per-account claim lock that keeps that limit exact; the unlimited internal
// tier skips it), on a server with 16 idle job workers (the default KEYMETER_JOB_WORKERS). Each job should be claimed within milliseconds; the script
// reads every job's `timings.queued_ms` once they have ended and reports the waits.
// A worker that gave up on a claim collision used to sleep until the poll (1 s) while a job
// stayed queued: the threshold (the longest wait under MAX_WAIT_MS, 500) catches that.
//
// Environment: BASE_URL, ADMIN_TOKEN, UPSTREAM_URL (run.sh), TIER (business), ROUNDS (10),
// JOBS (16), SLOW_MS (1000), MAX_WAIT_MS (500), OUT_DIR. The tier's request limit must allow
// about 2 × JOBS requests a second (business: 1200 a minute, bursts of 200).

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import {
  BASE_URL, TREND_STATS, bearer, count, createAccounts, failedThresholds, fmt, int, num, requireLoopback, values,
} from './lib.js';

const UPSTREAM = __ENV.UPSTREAM_URL || '';
const TIER = __ENV.TIER || 'business';
const ROUNDS = int('ROUNDS', 10);
const JOBS = int('JOBS', 16);
const SLOW_MS = int('SLOW_MS', 1000);
const MAX_WAIT_MS = num('MAX_WAIT_MS', 500);
requireLoopback('BASE_URL', BASE_URL);
requireLoopback('UPSTREAM_URL', UPSTREAM);

const wait = new Trend('queue_wait_ms');
const worst = new Trend('round_max_queue_wait_ms');
const stalled = new Counter('rounds_over_limit');

export const options = {
  scenarios: { burst: { executor: 'per-vu-iterations', vus: 1, iterations: ROUNDS, maxDuration: `${ROUNDS * (SLOW_MS / 1000 + 12)}s` } },
  thresholds: {
    queue_wait_ms: [`max<${MAX_WAIT_MS}`],
    rounds_over_limit: ['count==0'],
    checks: ['rate==1'],
  },
  summaryTrendStats: TREND_STATS,
};

export function setup() {
  const [account] = createAccounts(1, TIER, 1000000);
  return { key: account.key };
}

export default function (data) {
  const auth = bearer(data.key);
  const body = JSON.stringify({ url: `${UPSTREAM}/slow/${SLOW_MS}`, timeout_ms: 30000 });
  const reqs = Array.from({ length: JOBS }, () => ['POST', `${BASE_URL}/v1/jobs`, body, auth]);
  const res = http.batch(reqs);
  const ids = res.map((r) => (r.status === 202 ? r.json('id') : null));
  if (!check(ids, { 'every job queued (202)': (x) => x.every((id) => id) })) {
    console.warn(`POST /v1/jobs answered ${res.map((r) => r.status).join(' ')}`);
    return;
  }
  sleep(SLOW_MS / 1000);
  // Poll only the jobs still running, gently: the tier's request limit counts these too.
  const deadline = Date.now() + SLOW_MS + 10000;
  const jobs = ids.map(() => null);
  while (Date.now() < deadline && jobs.some((j) => !j)) {
    ids.forEach((id, i) => {
      if (jobs[i]) return;
      const r = http.get(`${BASE_URL}/v1/jobs/${id}`, auth);
      if (r.status === 200 && (r.json('status') === 'succeeded' || r.json('status') === 'failed')) jobs[i] = r.json();
    });
    if (jobs.some((j) => !j)) sleep(0.5);
  }
  if (!check(jobs, { 'every job succeeded': (x) => x.every((j) => j && j.status === 'succeeded') })) {
    console.warn(`jobs ended as ${jobs.map((j) => (j ? j.status : 'unknown')).join(' ')}`);
    return;
  }
  let max = 0;
  for (const j of jobs) {
    wait.add(j.timings.queued_ms);
    max = Math.max(max, j.timings.queued_ms);
  }
  worst.add(max);
  stalled.add(max >= MAX_WAIT_MS ? 1 : 0);
  sleep(1); // lets the tier's request budget refill between rounds
}

export function handleSummary(data) {
  const w = values(data, 'queue_wait_ms');
  const r = values(data, 'round_max_queue_wait_ms');
  const failed = failedThresholds(data);
  const lines = [
    '',
    `burst.js — ${ROUNDS} rounds of ${JOBS} jobs queued at once for one ${TIER}-tier account (pages of ${SLOW_MS} ms)`,
    `queue wait per job: p50 ${fmt(w.med, 0)} ms, p95 ${fmt(w['p(95)'], 0)} ms, max ${fmt(w.max, 0)} ms (threshold: max < ${MAX_WAIT_MS} ms)`,
    `longest wait per round: p50 ${fmt(r.med, 0)} ms, max ${fmt(r.max, 0)} ms; rounds with a wait of ${MAX_WAIT_MS} ms or more: ${count(data, 'rounds_over_limit')} of ${ROUNDS}`,
    failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`,
    '',
  ];
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) out[`${__ENV.OUT_DIR}/burst-summary.json`] = JSON.stringify({ tier: TIER, rounds: ROUNDS, jobs: JOBS, queue_wait_ms: w, round_max: r, thresholds_failed: failed }, null, 2);
  return out;
}
