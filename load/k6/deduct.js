// Deductions through HTTP, with k6: many VUs charging 1 credit per request with
// POST /v1/credits/charge. ACCOUNTS=1000 spreads them over 1000 internal-tier accounts
// (created in setup through the admin API); ACCOUNTS=1 is the hot-account case. Run it with
// `load/run.sh deduct.js`; load/bench/deduct.sh measures the same with wrk, next to the bare
// single-statement UPDATE (pgbench) in the same run.
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, createAccounts, seconds } from './lib.js';

const N = parseInt(__ENV.ACCOUNTS || '1000', 10);
const DURATION = __ENV.DURATION || '15s';
const VUS = parseInt(__ENV.VUS || '32', 10);
const charges = new Counter('charges');

export const options = {
  setupTimeout: '180s',
  scenarios: { charge: { executor: 'constant-vus', vus: VUS, duration: DURATION } },
  thresholds: { 'http_req_failed{name:charge}': ['rate<0.01'], 'http_req_duration{name:charge}': ['p(95)<1000'], 'checks': ['rate>0.99'] },
};

export function setup() {
  return { keys: createAccounts(N, 'internal', 1000000000).map((a) => a.key) };
}

export default function (data) {
  const key = data.keys[Math.floor(Math.random() * data.keys.length)];
  const r = http.post(`${BASE_URL}/v1/credits/charge`, '{"amount":1}', {
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${key}` },
    tags: { name: 'charge' },
  });
  if (check(r, { 'charged (201)': (x) => x.status === 201 })) charges.add(1);
}

export function handleSummary(data) {
  const n = data.metrics.charges ? data.metrics.charges.values.count : 0;
  const rps = n / seconds(DURATION);
  const p95 = data.metrics['http_req_duration{name:charge}']
    ? data.metrics['http_req_duration{name:charge}'].values['p(95)'] : data.metrics.http_req_duration.values['p(95)'];
  const line = `deduct.js: accounts=${N} vus=${VUS} duration=${DURATION} charges=${n} rate=${rps.toFixed(1)}/s p95=${p95.toFixed(2)}ms\n`;
  return { stdout: line, [`${__ENV.OUT_DIR || '.'}/deduct-${N}.txt`]: line };
}
