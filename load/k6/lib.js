// Helpers shared by the k6 scripts of load/k6/ (imported, never run by itself).

import http from 'k6/http';

export const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
export const API_KEY = __ENV.API_KEY || '';
export const ADMIN_TOKEN = __ENV.ADMIN_TOKEN || __ENV.KEYMETER_ADMIN_TOKEN || '';

const LOOPBACK = /^https?:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?(\/|$)/;

// Load goes to this machine only: a mistyped URL must not load someone else's server.
export function requireLoopback(name, url) {
  if (!LOOPBACK.test(url || '')) {
    throw new Error(`${name} must point at this machine (loopback), got ${url}`);
  }
}

// "1m30s" -> 90; k6-style durations (h, m, s, ms).
export function seconds(d) {
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  const unit = { h: 3600, m: 60, s: 1, ms: 0.001 };
  let total = 0;
  let matched = '';
  let m;
  while ((m = re.exec(d)) !== null) {
    total += parseFloat(m[1]) * unit[m[2]];
    matched += m[0];
  }
  if (matched !== d || total <= 0) {
    throw new Error(`a duration must look like 15s, 1m or 1m30s, got ${d}`);
  }
  return total;
}

export const int = (name, def) => {
  const v = parseInt(__ENV[name] || String(def), 10);
  if (Number.isNaN(v)) throw new Error(`${name} must be a whole number, got ${__ENV[name]}`);
  return v;
};
export const num = (name, def) => {
  const v = parseFloat(__ENV[name] || String(def));
  if (Number.isNaN(v)) throw new Error(`${name} must be a number, got ${__ENV[name]}`);
  return v;
};

export const fmt = (x, digits = 1) =>
  x === undefined || x === null || Number.isNaN(x) ? 'n/a' : Number(x).toFixed(digits);

export function bearer(key, extra = {}) {
  return { headers: Object.assign({ Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' }, extra) };
}

// Accounts through the admin API (POST /admin/accounts), `n` at a time in parallel.
export function createAccounts(n, tier, credits, batch = 50) {
  if (!ADMIN_TOKEN) throw new Error('ADMIN_TOKEN is not set (run through load/run.sh)');
  const out = [];
  for (let i = 0; i < n; i += batch) {
    const reqs = [];
    for (let j = i; j < Math.min(n, i + batch); j++) {
      reqs.push([
        'POST',
        `${BASE_URL}/admin/accounts`,
        JSON.stringify({ email: `load-${j}-${Date.now()}-${Math.floor(Math.random() * 1e9)}@example.com`, tier, credits }),
        { headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${ADMIN_TOKEN}` }, tags: { name: 'setup' } },
      ]);
    }
    for (const r of http.batch(reqs)) {
      if (r.status !== 201) throw new Error(`account creation failed: ${r.status} ${r.body}`);
      out.push({ id: r.json('account_id'), key: r.json('api_key') });
    }
  }
  return out;
}

// Every row of a cursor-paginated list (`{data, has_more, next_cursor}`), up to `max` pages.
export function listAll(key, path, max = 1000) {
  const rows = [];
  let cursor = null;
  for (let page = 0; page < max; page++) {
    const sep = path.includes('?') ? '&' : '?';
    const url = `${BASE_URL}${path}${sep}limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
    const r = http.get(url, Object.assign(bearer(key), { tags: { name: 'teardown' } }));
    if (r.status !== 200) throw new Error(`GET ${path} answered ${r.status}: ${r.body}`);
    const body = r.json();
    rows.push(...body.data);
    if (!body.has_more) return rows;
    cursor = body.next_cursor;
  }
  throw new Error(`GET ${path}: more than ${max} pages`);
}

export function getJson(key, path) {
  const r = http.get(`${BASE_URL}${path}`, Object.assign(bearer(key), { tags: { name: 'teardown' } }));
  if (r.status !== 200) throw new Error(`GET ${path} answered ${r.status}: ${r.body}`);
  return r.json();
}

// The thresholds that failed, as "metric: expression" strings.
export function failedThresholds(data) {
  const failed = [];
  for (const [name, m] of Object.entries(data.metrics)) {
    for (const [expr, t] of Object.entries(m.thresholds || {})) {
      if (!t.ok) failed.push(`${name}: ${expr}`);
    }
  }
  return failed;
}

export function values(data, name) {
  return data.metrics[name] ? data.metrics[name].values : {};
}

export const count = (data, name) => values(data, name).count || 0;

// One table line per row: [label, requests, req/s, p50, p90, p95, p99, max, failed %].
export function latencyTable(title, rows) {
  const lines = [
    title,
    '',
    'case                 requests        req/s    p50 ms    p90 ms    p95 ms    p99 ms    max ms',
  ];
  for (const r of rows) {
    lines.push(
      [
        r.label.padEnd(18),
        String(r.requests).padStart(10),
        fmt(r.rps).padStart(12),
        fmt(r.p50, 2).padStart(9),
        fmt(r.p90, 2).padStart(9),
        fmt(r.p95, 2).padStart(9),
        fmt(r.p99, 2).padStart(9),
        fmt(r.max, 2).padStart(9),
      ].join(' '),
    );
  }
  return lines;
}

// A latency row from a trend sub-metric and a count sub-metric, over `durationS` seconds.
export function latencyRow(data, label, trend, counter, durationS) {
  const d = values(data, trend);
  const n = counter ? count(data, counter) : d.count || 0;
  return { label, requests: n, rps: durationS ? n / durationS : undefined, p50: d.med, p90: d['p(90)'], p95: d['p(95)'], p99: d['p(99)'], max: d.max, avg: d.avg };
}

export const TREND_STATS = ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];

// --- the key format (src/auth/api_key.rs): km_live_<12 id>_<43 secret><6 checksum>, base62;
// the checksum is the CRC-32 (IEEE) of everything before it, in 6 base62 digits -------------
const ALPHABET = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
const CRC_TABLE = (() => {
  const t = [];
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t.push(c >>> 0);
  }
  return t;
})();
export function crc32(s) {
  let c = 0xffffffff;
  for (let i = 0; i < s.length; i++) c = CRC_TABLE[(c ^ s.charCodeAt(i)) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
export function checksum(body) {
  let v = crc32(body);
  let out = '';
  for (let i = 0; i < 6; i++) {
    out = ALPHABET[v % 62] + out;
    v = Math.floor(v / 62);
  }
  return out;
}
export const randomChars = (n) => Array.from({ length: n }, () => ALPHABET[Math.floor(Math.random() * 62)]).join('');
export const withChecksum = (body) => body + checksum(body);
