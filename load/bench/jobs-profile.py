"""The report of load/bench/jobs-profile.sh: per sync job, the statements PostgreSQL ran for
the profiled database (its log with log_min_duration_statement = 0), the round trips they
took, the commits, and the job's phases from the jobs table.

Round trips: tokio-postgres prepares a statement (Parse/Describe/Sync: one round trip, a
`parse` line) before binding and executing it (Bind/Execute/Sync: one round trip, `bind` and
`execute` lines), unless it reuses a prepared statement (no `parse` line). BEGIN and COMMIT
go as simple queries (`statement:` lines), one round trip each.
"""

import json
import os
import re
from collections import defaultdict

OUT = os.environ["OUT_DIR"]
DB = os.environ["DB_NAME"]
JOBS = int(os.environ["JOBS"])
COMMITS = int(os.environ["COMMITS"])

LINE = re.compile(r"^(\S+ \S+) \S+ \[(\d+)\] \S*@(\S+) LOG:  duration: ([0-9.]+) ms  (parse|bind|execute|statement)( [^:]*)?: (.*)$")

stmts = defaultdict(lambda: {"parse": 0, "bind": 0, "execute": 0, "statement": 0, "ms": 0.0})
total_ms = 0.0
kinds = defaultdict(int)
current = None
with open(f"{OUT}/jobs-profile.pglog", errors="replace") as f:
    for raw in f:
        m = LINE.match(raw.rstrip("\n"))
        if m:
            current = None
            if m.group(3) != DB:
                continue
            kind, text = m.group(5), m.group(7)
            key = " ".join(text.split())[:150]
            stmts[key][kind] += 1
            stmts[key]["ms"] += float(m.group(4))
            kinds[kind] += 1
            total_ms += float(m.group(4))
            current = key
        # continuation lines of a multi-line statement and DETAIL lines are skipped

per = lambda n: n / JOBS if JOBS else float("nan")


def timeline():
    """With one client, jobs follow one another: the log's timestamps (statement ends, ms)
    give each job's steps. Returns the mean of each gap over the jobs, in ms."""
    from datetime import datetime

    events = []  # (t, pid, kind, text)
    with open(f"{OUT}/jobs-profile.pglog", errors="replace") as f:
        for raw in f:
            m = LINE.match(raw.rstrip("\n"))
            if not m or m.group(3) != DB or m.group(5) == "parse" or m.group(5) == "bind":
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1000
            events.append((t, m.group(2), m.group(5), m.group(7)))
    txs = []  # (start, end, kind) per committed transaction
    open_tx = {}
    for t, pid, kind, text in events:
        if text.startswith("START TRANSACTION") or text.startswith("BEGIN"):
            open_tx[pid] = [t, None]
        elif pid in open_tx and text.startswith("WITH acct AS"):
            open_tx[pid][1] = "submit"
        elif pid in open_tx and text.startswith("UPDATE jobs SET status = 'running'"):
            open_tx[pid][1] = "claim"
        elif pid in open_tx and text.startswith("UPDATE jobs SET status = $2"):
            open_tx[pid][1] = "finish"
        elif text.startswith("COMMIT") and pid in open_tx:
            start, k = open_tx.pop(pid)
            if k:
                txs.append((start, t, k))
        elif text.startswith("ROLLBACK"):
            open_tx.pop(pid, None)
    gets = [t for t, _, kind, text in events if kind == "execute" and text.startswith("SELECT j.id, j.account_id, j.status")]
    gaps = defaultdict(list)
    for i, (s0, s1, k) in enumerate(txs):
        if k != "submit" or i + 2 >= len(txs) or txs[i + 1][2] != "claim" or txs[i + 2][2] != "finish":
            continue
        c0, c1, _ = txs[i + 1]
        f0, f1, _ = txs[i + 2]
        nxt = next((t for t, _, kk in txs[i + 3:] if kk == "submit"), None)
        after = [g for g in gets if g > f1]
        gaps["submit tx (START → COMMIT done)"].append(s1 - s0)
        gaps["submit done → claim START (wake-up)"].append(c0 - s1)
        gaps["claim tx"].append(c1 - c0)
        gaps["claim done → finish START (fetch, extract)"].append(f0 - c1)
        gaps["finish tx"].append(f1 - f0)
        if after:
            gaps["finish done → waiter's read (wake-up)"].append(after[0] - f1)
        if nxt is not None and after:
            gaps["waiter's read → next submit START (answer, client, next request)"].append(nxt - after[0])
    return gaps
print()
print(f"jobs-profile: {JOBS} jobs; database {DB}")
print(f"commits + rollbacks (pg_stat_database): {COMMITS} = {per(COMMITS):.2f} per job")
begins = sum(v["statement"] for k, v in stmts.items() if k.upper().startswith("BEGIN"))
commits = sum(v["statement"] for k, v in stmts.items() if k.upper().startswith("COMMIT"))
print(f"explicit transactions (BEGIN … COMMIT): {begins} = {per(begins):.2f} per job ({commits} COMMIT)")
rt = kinds["parse"] + kinds["execute"] + kinds["statement"]
print(f"round trips: {rt} = {per(rt):.2f} per job "
      f"(parse {per(kinds['parse']):.2f}, bind+execute {per(kinds['execute']):.2f}, simple {per(kinds['statement']):.2f})")
print(f"server-side statement time: {total_ms:.1f} ms = {per(total_ms):.3f} ms per job (parse+bind+execute+simple, as logged)")
print()
print("per job   parse  exec  simple  ms/job   statement")
for key, v in sorted(stmts.items(), key=lambda kv: -kv[1]["ms"]):
    n = v["execute"] + v["statement"]
    if n == 0 and v["parse"] == 0:
        continue
    print(f"{per(n):7.2f} {per(v['parse']):6.2f} {per(v['execute']):5.2f} {per(v['statement']):6.2f} {per(v['ms']):8.3f}   {key}")

phases = []
try:
    with open(f"{OUT}/jobs-profile.phases") as f:
        for line in f:
            a, b = line.split()
            phases.append((float(a), float(b)))
except FileNotFoundError:
    pass


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


if phases:
    q = [a for a, _ in phases]
    r = [b for _, b in phases]
    print()
    print(f"phases from the jobs table ({len(phases)} finished jobs), ms: "
          f"queued→running p50 {pct(q, 50):.2f} p99 {pct(q, 99):.2f}; "
          f"running→finished p50 {pct(r, 50):.2f} p99 {pct(r, 99):.2f}")
if os.environ.get("VUS", "1") == "1":
    gaps = timeline()
    if gaps:
        print()
        print("one job after another (1 client; log timestamps are statement ends, 1 ms resolution, means over the jobs):")
        for k, v in gaps.items():
            print(f"  {sum(v) / len(v):7.2f} ms  {k}  (n={len(v)})")
for name in os.listdir(OUT):
    if name.startswith("jobs-bench-profile-") and name.endswith(".json"):
        with open(f"{OUT}/{name}") as f:
            row = json.load(f)["row"]
        print(f"k6 ({row['label']}, with the statement log on): {row['rps']:.0f} jobs/s, p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms")
print()
