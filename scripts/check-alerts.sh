#!/usr/bin/env bash
# Checks the monitoring kit in deploy/ (run by .ci/run):
#   1. `promtool check rules` and `promtool check config` on deploy/prometheus/;
#   2. `promtool test rules deploy/prometheus/tests.yml`: each alert fed synthetic series;
#   3. every alert has a runbook_url naming a section of docs/runbook.md that exists;
#   4. deploy/grafana/keymeter.json parses, and every metric the rules and the dashboard
#      query is one keymeter exports (a name registered in src/metrics/), a recording rule,
#      or Prometheus's own `up`; and every exported name is in the README's metrics table.
#
# promtool: the one on PATH, or PROMTOOL=/path, or else Debian's `prometheus` package,
# fetched with `apt-get download` and unpacked (not installed: installing would start a
# Prometheus server) into the tools cache.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

tools_dir=${KEYMETER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keymeter/tools}

find_promtool() {
    if [ -n "${PROMTOOL:-}" ]; then echo "$PROMTOOL"; return 0; fi
    if command -v promtool >/dev/null; then command -v promtool; return 0; fi
    local dir=$tools_dir/prometheus-deb
    local bin=$dir/usr/bin/promtool
    if [ ! -x "$bin" ]; then
        command -v apt-get >/dev/null || { log "no promtool and no apt-get: set PROMTOOL=/path/to/promtool"; return 1; }
        log "promtool not found; fetching Debian's prometheus package into $dir"
        local tmp
        tmp=$(mktemp -d)
        # apt's download sandbox user must be able to write there.
        chmod 777 "$tmp"
        if ! (cd "$tmp" && timeout 300 apt-get download -qq prometheus >&2); then
            log "apt-get download failed; updating the package lists once"
            as_root apt-get update -qq >&2
            (cd "$tmp" && timeout 300 apt-get download -qq prometheus >&2)
        fi
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$dir"
        rm -rf "$tmp"
    fi
    [ -x "$bin" ] || { log "$bin is missing after unpacking"; return 1; }
    echo "$bin"
}

PROMTOOL=$(find_promtool)
log "using $("$PROMTOOL" --version 2>&1 | head -n1)"

log "promtool check rules"
"$PROMTOOL" check rules deploy/prometheus/keymeter.rules.yml
log "promtool check config"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml
log "promtool test rules"
(cd deploy/prometheus && "$PROMTOOL" test rules tests.yml)

log "runbook links, dashboard and metric names"
python3 - <<'PY'
import json, re, sys

errors = []

# Names keymeter exports: the string literals that name a family in src/metrics/.
src = "".join(open(f"src/metrics/{f}").read() for f in ("mod.rs", "jobs.rs", "collectors.rs"))
exported = set(re.findall(r'"(keymeter_[a-z0-9_]+)"', src))
histograms = {"keymeter_http_request_duration_seconds", "keymeter_job_duration_seconds"}
assert histograms <= exported, "the histograms were renamed: update this check"
queryable = set(exported) | {"up"}
for h in histograms:
    queryable |= {h + "_bucket", h + "_sum", h + "_count"}

rules_text = open("deploy/prometheus/keymeter.rules.yml").read()
recorded = set(re.findall(r"^\s*- record:\s*(\S+)", rules_text, re.M))
queryable |= recorded

# The README's metrics table must list every exported name.
readme = open("README.md").read()
for name in sorted(exported):
    if f"`{name}`" not in readme:
        errors.append(f"README.md's metrics table does not list {name}")

FUNCTIONS = set("""
sum min max avg count stddev stdvar topk bottomk quantile count_values group by without on
ignoring group_left group_right and or unless bool offset rate irate increase delta idelta
deriv predict_linear histogram_quantile absent absent_over_time vector scalar clamp clamp_min
clamp_max abs ceil floor round exp ln log2 log10 sqrt time timestamp label_replace label_join
sort sort_desc changes resets avg_over_time min_over_time max_over_time sum_over_time
count_over_time last_over_time quantile_over_time stddev_over_time present_over_time
humanize humanizePercentage humanizeDuration inf nan
""".split())

def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)                       # Grafana variables
    names = set()
    for tok in re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if tok not in FUNCTIONS:
            names.add(tok)
    return names

def check_expr(where, expr):
    names = metric_names(expr)
    if not names:
        errors.append(f"{where}: no metric in {expr!r}")
    for n in sorted(names - queryable):
        errors.append(f"{where}: {n} is neither a keymeter metric nor a recording rule")

# Rules: every expression's metrics exist; every alert links an existing runbook section.
runbook = open("docs/runbook.md").read()
def anchor(heading):
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")
anchors = {anchor(h) for h in re.findall(r"^#{1,6}\s+(.*)$", runbook, re.M)}

blocks = re.split(r"\n\s*- (?=alert:|record:)", rules_text)
alerts = 0
for b in blocks[1:]:
    kind, name = re.match(r"(alert|record):\s*(\S+)", b).groups()
    m = re.search(r"expr:\s*(\|\n((?:\s{10,}.*\n?)+)|(.*))", b)
    expr = (m.group(2) or m.group(3) or "").strip()
    check_expr(f"rule {name}", expr)
    if kind == "alert":
        alerts += 1
        url = re.search(r"runbook_url:\s*(\S+)", b)
        if not url:
            errors.append(f"alert {name} has no runbook_url")
            continue
        path, _, frag = url.group(1).partition("#")
        if path != "docs/runbook.md" or frag not in anchors:
            errors.append(f"alert {name}: runbook_url {url.group(1)} names no section of docs/runbook.md")
        if frag != name.lower():
            errors.append(f"alert {name}: its runbook section should be '## {name}'")
        tested = open("deploy/prometheus/tests.yml").read()
        if f"alertname: {name}\n" not in tested:
            errors.append(f"alert {name} has no unit test in deploy/prometheus/tests.yml")

# The dashboard: valid JSON, every panel query and template query over known metrics.
dash = json.load(open("deploy/grafana/keymeter.json"))
exprs = 0
def walk(panels):
    global exprs
    for p in panels:
        for t in p.get("targets", []):
            if "expr" in t:
                exprs += 1
                check_expr(f"dashboard panel {p.get('title')!r}", t["expr"])
        walk(p.get("panels", []))
walk(dash.get("panels", []))
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    m = re.match(r"label_values\((\w+)", q or "")
    if v.get("type") == "query":
        if not m or m.group(1) not in queryable:
            errors.append(f"dashboard variable {v.get('name')}: unknown metric in {q!r}")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{alerts} alerts, each with a runbook section and a unit test; {exprs} dashboard queries; "
      f"{len(exported)} exported metric names, all in the README")
PY
