// Verification timing by outcome: load/drills/timing.sh (load/run.sh timing.js underneath).
//
// GET /v1/account with five kinds of key, interleaved in random order within every iteration
// (so drifts in machine load hit all kinds alike):
//   right        — the account's real key (cached): verification succeeds, the handler runs;
//   wrong_secret — the real key id with one secret character changed and a valid checksum:
//                  the cached record's digest does not match → 401;
//   unknown_id   — a fixed made-up key id (valid checksum): after its first miss the cache
//                  holds "no such key" for a few seconds, and a dummy digest is compared → 401;
//   unknown_fresh — a new made-up id on every request: a cache miss and one SELECT each → 401;
//   bad_checksum — the real key with its checksum broken: refused before the cache → 401.
// The claim under test: wrong_secret and unknown_id take the same time (the digest compare is
// constant-time and an unknown id compares against a dummy digest), so a caller cannot tell a
// wrong secret from an unknown id by the clock. Verdict: PASS when their medians differ by at
// most TOLERANCE_US microseconds (default 50); p95s are reported next to them.
// unknown_fresh is slower by a database round trip; that tells whether an id is in the cache,
// and key ids are public by design (they are the primary key of api_keys and safe to log;
// only the secret is confidential), so it is reported, not judged.
//
// Environment: BASE_URL, API_KEY (run.sh), VUS (2), DURATION (20s), TOLERANCE_US (50), OUT_DIR.
// load/run.sh raises KEYMETER_AUTH_FAILURES_PER_MINUTE for this script: the per-IP throttle
// on failed authentications would otherwise answer 429 after 20 of them.

import http from 'k6/http';
import { check } from 'k6';
import {
  API_KEY, BASE_URL, TREND_STATS, checksum, failedThresholds, fmt, int, latencyRow, latencyTable, num, randomChars,
  requireLoopback, seconds, withChecksum,
} from './lib.js';

const VUS = int('VUS', 2);
const DURATION = __ENV.DURATION || '20s';
const TOLERANCE_US = num('TOLERANCE_US', 50);
const KINDS = ['right', 'wrong_secret', 'unknown_id', 'unknown_fresh', 'bad_checksum'];

requireLoopback('BASE_URL', BASE_URL);
const durationS = seconds(DURATION);

export const options = {
  scenarios: { timing: { executor: 'constant-vus', vus: VUS, duration: DURATION } },
  thresholds: Object.fromEntries(
    KINDS.map((k) => [`http_req_duration{kind:${k}}`, ['p(95)<100']]).concat([
      ['checks', ['rate==1']],
    ]),
  ),
  summaryTrendStats: TREND_STATS,
};
http.setResponseCallback(http.expectedStatuses(200, 401));

function keysFor(real) {
  const body = real.slice(0, 64);
  if (real.length !== 70 || checksum(body) !== real.slice(64)) {
    throw new Error('API_KEY does not have the documented shape (or this CRC-32 is wrong)');
  }
  const id = real.slice(8, 20);
  const secret = real.slice(21, 64);
  const flipped = (secret[0] === 'a' ? 'b' : 'a') + secret.slice(1);
  const bad = real.slice(0, 64) + (real[64] === '0' ? '1' : '0') + real.slice(65);
  return {
    right: real,
    wrong_secret: withChecksum(`km_live_${id}_${flipped}`),
    unknown_id: withChecksum(`km_live_${randomChars(12)}_${randomChars(43)}`),
    bad_checksum: bad,
  };
}

export function setup() {
  if (!API_KEY) throw new Error('API_KEY is not set (run through load/run.sh)');
  const keys = keysFor(API_KEY);
  for (const k of ['right', 'wrong_secret', 'unknown_id', 'bad_checksum']) {
    const r = http.get(`${BASE_URL}/v1/account`, { headers: { Authorization: `Bearer ${keys[k]}` }, tags: { name: 'setup' } });
    const want = k === 'right' ? 200 : 401;
    if (r.status !== want) throw new Error(`${k} key answered ${r.status}, expected ${want}: ${r.body}`);
  }
  return keys;
}

export default function (keys) {
  const order = KINDS.slice();
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  for (const kind of order) {
    const key = kind === 'unknown_fresh' ? withChecksum(`km_live_${randomChars(12)}_${randomChars(43)}`) : keys[kind];
    const r = http.get(`${BASE_URL}/v1/account`, { headers: { Authorization: `Bearer ${key}` }, tags: { kind } });
    const want = kind === 'right' ? 200 : 401;
    check(r, { [`${kind}: ${want}`]: (x) => x.status === want && (want === 200 || x.json('type') === 'invalid_api_key') });
  }
}

export function handleSummary(data) {
  const rows = KINDS.map((k) => latencyRow(data, k, `http_req_duration{kind:${k}}`, null, durationS));
  const by = Object.fromEntries(rows.map((r) => [r.label, r]));
  const diff = (a, b, p) => (by[a][p] - by[b][p]) * 1000; // µs
  const d50 = diff('unknown_id', 'wrong_secret', 'p50');
  const d95 = diff('unknown_id', 'wrong_secret', 'p95');
  const pass = Math.abs(d50) <= TOLERANCE_US;
  const failed = failedThresholds(data);
  const lines = latencyTable(`timing.js — ${VUS} VUs, ${DURATION}, the five kinds interleaved`, rows);
  lines.unshift('');
  lines.push('');
  lines.push(`unknown_id − wrong_secret: p50 ${fmt(d50, 1)} µs, p95 ${fmt(d95, 1)} µs`);
  lines.push(`wrong_secret − right:      p50 ${fmt(diff('wrong_secret', 'right', 'p50'), 1)} µs (right also runs the handler)`);
  lines.push(`unknown_fresh − unknown_id: p50 ${fmt(diff('unknown_fresh', 'unknown_id', 'p50'), 1)} µs (a cache miss: one SELECT)`);
  lines.push(`bad_checksum − wrong_secret: p50 ${fmt(diff('bad_checksum', 'wrong_secret', 'p50'), 1)} µs (refused before the cache)`);
  lines.push(`VERDICT timing: ${pass ? 'PASS' : 'FAIL'} — unknown key id vs wrong secret, medians ${fmt(by.unknown_id.p50 * 1000, 0)} µs vs ` +
    `${fmt(by.wrong_secret.p50 * 1000, 0)} µs, |difference| ${fmt(Math.abs(d50), 1)} µs (tolerance ${TOLERANCE_US} µs)`);
  lines.push(failed.length === 0 ? 'thresholds: all passed' : `thresholds FAILED: ${failed.join('; ')}`);
  lines.push('');
  const out = { stdout: lines.join('\n') };
  if (__ENV.OUT_DIR) {
    out[`${__ENV.OUT_DIR}/timing-summary.json`] = JSON.stringify({ rows, unknown_minus_wrong_us: { p50: d50, p95: d95 }, tolerance_us: TOLERANCE_US, pass, thresholds_failed: failed }, null, 2);
  }
  return out;
}
