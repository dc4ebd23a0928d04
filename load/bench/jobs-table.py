"""The table of load/bench/jobs-bench.sh: reads OUT_DIR/jobs-bench-<label>-<scenario>.json
(one k6 run each) and .commits (the database commits that run caused), prints one markdown
table: rows = scenarios, columns = base, new, raw fetch, new/base, the goal of issue 14.

Why a separate step: each scenario is its own k6 run (so the commits per scenario can be read
between them), so no single k6 summary sees all the figures.
"""

import json
import os
import re
import statistics

OUT = os.environ["OUT_DIR"]
VUS = os.environ.get("VUS", "16")


def load_one(path):
    with open(path) as f:
        row = json.load(f)["row"]
    try:
        with open(path[: -len(".json")] + ".commits") as f:
            commits = int(f.read().strip())
        row["per_job"] = commits / row["requests"] if row["requests"] else None
    except (FileNotFoundError, ValueError):
        row["per_job"] = None
    return row


def load(label, scenario):
    """The figures of LABEL (base, new, raw) in SCENARIO: with several rounds, the median of
    each figure over them (the lowest check rate)."""
    pat = re.compile(rf"^jobs-bench-{label}\.r(\d+)-{scenario}\.json$")
    rows = [load_one(f"{OUT}/{n}") for n in sorted(os.listdir(OUT)) if pat.match(n)]
    if not rows:
        return None
    out = {}
    for k in ("requests", "rps", "p50", "p90", "p95", "p99", "max", "per_job"):
        xs = [r[k] for r in rows if r.get(k) is not None]
        out[k] = statistics.median(xs) if xs else None
    rates = [r["checks_rate"] for r in rows if r.get("checks_rate") is not None]
    out["checks_rate"] = min(rates) if rates else None
    return out


def ms(x):
    return "n/a" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def flag(r):
    # Fewer than 99 % of the answers were the expected one: the figure is not a job figure.
    rate = r.get("checks_rate")
    return "" if rate is None or rate >= 0.99 else f" **checks {rate * 100:.1f} %**"


def lat(r):
    return "—" if r is None else f"p50 {ms(r['p50'])} · p99 {ms(r['p99'])} ms{flag(r)}"


def thr(r):
    if r is None:
        return "—"
    return f"{r['rps']:,.0f}/s · p50 {ms(r['p50'])} · p99 {ms(r['p99'])} ms{flag(r)}"


def per_job(r):
    if r is None or r.get("per_job") is None:
        return "—"
    return f"{r['per_job']:.2f}"


def ratio(a, b, key, what):
    if a is None or b is None or not a.get(key) or b.get(key) is None:
        return "—"
    return f"{b[key] / a[key]:.2f}× {what}"


def ok(cond):
    return "✓" if cond else "✗"


base = {s: load("base", s) for s in ["health_1vu", "health", "scrape_1vu", "scrape_accounts", "scrape_one", "breaker_1vu", "breaker"]}
new = {s: load("new", s) for s in base}
raw1, raw = load("raw", "raw_1vu"), load("raw", "raw")


def goal_1(r):
    if r is None or raw1 is None:
        return "—"
    d = r["p50"] - raw1["p50"]
    return f"{ok(d <= 3)} +{d:.2f} ms (≤ 3)"


def goal_rate(r, rate, p99=None):
    if r is None:
        return "—"
    good = r["rps"] >= rate and (p99 is None or r["p99"] < p99)
    return f"{ok(good)} (≥ {rate:,}/s{'' if p99 is None else f', p99 < {p99} ms'})"


def goal(col_rows, fn):
    # The goal checked for each binary present: new first, since that is what it is about.
    parts = [f"{label}: {fn(r)}" for label, r in col_rows if r is not None]
    return "; ".join(parts) or "—"


rows = [
    ("1 client, 1 account (p50, p99)", lat(base["scrape_1vu"]), lat(new["scrape_1vu"]), lat(raw1),
     ratio(base["scrape_1vu"], new["scrape_1vu"], "p50", "p50"),
     goal([("new", new["scrape_1vu"]), ("base", base["scrape_1vu"])], goal_1)),
    (f"{VUS} clients, 16 accounts", thr(base["scrape_accounts"]), thr(new["scrape_accounts"]), thr(raw),
     ratio(base["scrape_accounts"], new["scrape_accounts"], "rps", "jobs/s"),
     goal([("new", new["scrape_accounts"]), ("base", base["scrape_accounts"])], lambda r: goal_rate(r, 1500, 50))),
    (f"{VUS} clients, 1 account", thr(base["scrape_one"]), thr(new["scrape_one"]), thr(raw),
     ratio(base["scrape_one"], new["scrape_one"], "rps", "jobs/s"),
     goal([("new", new["scrape_one"]), ("base", base["scrape_one"])], lambda r: goal_rate(r, 1000))),
    ("transactions per job, reads included (1 client / 16 accounts / 1 account)",
     " / ".join(per_job(base[s]) for s in ["scrape_1vu", "scrape_accounts", "scrape_one"]),
     " / ".join(per_job(new[s]) for s in ["scrape_1vu", "scrape_accounts", "scrape_one"]),
     "—", "—", "pg_stat_database commit+rollback; durable commits: jobs-profile.sh"),
    ("/health/live, 1 VU", lat(base["health_1vu"]), lat(new["health_1vu"]), "—",
     ratio(base["health_1vu"], new["health_1vu"], "p50", "p50"), "reference"),
    (f"/health/live, {VUS} VUs", thr(base["health"]), thr(new["health"]), "—",
     ratio(base["health"], new["health"], "rps", "req/s"), "reference"),
]
try:
    with open(f"{OUT}/jobs-bench-fsync.txt") as f:
        fsync_ms = float(f.read().strip()) / 1000
    rows.append(("disk flush (pg_test_fsync, fdatasync 8 kB)", "—", "—", f"{fsync_ms:.2f} ms", "—",
                 f"2 flushes in series = {2 * fsync_ms:.1f} ms of the 1-client latency"))
except (FileNotFoundError, ValueError):
    pass
if base["breaker_1vu"] or new["breaker_1vu"]:
    rows.append(("open breaker 503, 1 VU", lat(base["breaker_1vu"]), lat(new["breaker_1vu"]), "—",
                 ratio(base["breaker_1vu"], new["breaker_1vu"], "p50", "p50"), "unchanged answer"))
    rows.append((f"open breaker 503, {VUS} VUs", thr(base["breaker"]), thr(new["breaker"]), "—",
                 ratio(base["breaker"], new["breaker"], "rps", "req/s"), "unchanged answer"))

rounds = int(os.environ.get("ROUNDS", "1"))
print()
print(f"jobs-bench: {os.environ.get('DURATION')} per scenario; base = {os.environ.get('BASE_NAME')}, new = this tree"
      + (f"; each figure the median of {rounds} interleaved rounds" if rounds > 1 else ""))
try:
    with open(f"{OUT}/jobs-bench-loads.txt") as f:
        print("load average at the start of each part: " + "; ".join(line.strip() for line in f))
except FileNotFoundError:
    pass
print()
print("| scenario | base | new | raw fetch | new/base | goal (issue 14) |")
print("|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
