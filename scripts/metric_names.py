#!/usr/bin/env python3
"""The Prometheus metrics the deployment files refer to, and the ones the Rust services export.

    scripts/metric_names.py                  every metric base name the Grafana dashboards and the alert
                                             rules use (histograms without _bucket/_sum/_count), one a line
    scripts/metric_names.py --json           the same with, from the Rust sources: kind, labels, roles
    scripts/metric_names.py --exported       every metric the Rust sources record, one a line
    scripts/metric_names.py --live URL...    fetches each /metrics URL (a running router, targets, ...) and
                                             fails (exit 1) naming every referenced specd_* metric none of
                                             them serves; --ignore NAME (repeatable) leaves out metrics
                                             that only an event records (see --json: "event_only")

A metric appears on /metrics only once recorded: run some traffic before --live. Which role serves a
metric is in "roles" (router, target, drafter, trainer), read from where the Rust code records it.
Used as a library by scripts/check_deploy_files.py (the static checks). Standard library only, plus
PyYAML for the alert rules.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = [ROOT / "deploy" / "prometheus" / "alerts.yaml"]
RUST_DIRS = [ROOT / "crates", ROOT / "services"]

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Metrics Prometheus itself makes, not the services.
PROMETHEUS_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels a scrape or a Kubernetes service discovery attaches to every series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint", "node"}
# Metrics recorded only on an event a healthy cluster under plain traffic may never see.
EVENT_ONLY = {
    "specd_request_errors_total",
    "specd_fallbacks_total",
    "specd_prefills_cancelled_total",
    "specd_worker_idle_streams_closed_total",
    "specd_trainer_rollbacks_total",
    "specd_trainer_publishes_total",
    "specd_trainer_yielded_total",
    "specd_trainer_weight_fetches_total",
    "specd_drafter_swaps_total",
    "specd_drafter_swap_seconds",
    "specd_drafter_version",
    "specd_trainer_gate_acceptance",
    "specd_trainer_evaluations_total",
    "specd_trainer_loss",
    "specd_trainer_step_seconds",
    "specd_trainer_steps_total",
    "specd_trainer_positions_total",
    "specd_trainer_live_version",
}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
    "bool", "inf", "nan", "atan2", "start", "end",
}


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---- PromQL ---------------------------------------------------------------------------------------

class Query:
    """What one PromQL expression refers to."""

    def __init__(self, expr: str, where: str):
        self.expr = expr
        self.where = where
        # (metric as written, labels its own matchers use)
        self.selectors: list[tuple[str, set[str]]] = []
        self.grouping: set[str] = set()
        # metrics that rate()/irate()/increase()/resets()/delta() take directly
        self.rated: set[str] = set()
        self.parse()

    def parse(self) -> None:
        e = self.expr
        for m in re.finditer(r"\b(rate|irate|increase|resets)\s*\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", e):
            self.rated.add(m.group(2))
        for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
            self.grouping |= {x.strip() for x in m.group(1).split(",") if x.strip()}
        # Selector matchers, then everything inside braces, brackets and strings goes.
        for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", e):
            labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
            if m.group(1) and m.group(1) not in PROMQL_KEYWORDS:
                self.selectors.append((m.group(1), labels))
            elif labels:
                self.selectors.append(("", labels))
        rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)
        rest = re.sub(r"\{[^}]*\}", " ", rest)
        rest = re.sub(r"\[[^\]]*\]", " ", rest)
        rest = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
        rest = re.sub(r"\$\{?\w+\}?", " ", rest)
        written = {s for s, _ in self.selectors if s}
        for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", rest):
            name, call = m.group(1), m.group(2)
            if call or name in PROMQL_KEYWORDS or name in written:
                continue
            if re.fullmatch(r"\d+[smhdwy]", name):
                continue
            self.selectors.append((name, set()))

    @property
    def metrics(self) -> set[str]:
        return {s for s, _ in self.selectors if s}


def dashboard_queries(path: Path) -> list[Query]:
    d = json.loads(path.read_text())
    out: list[Query] = []

    def walk(panels, trail):
        for p in panels or []:
            title = p.get("title", "?")
            for t in p.get("targets", []) or []:
                if t.get("expr"):
                    out.append(Query(t["expr"], f"{path.name}: panel {title!r} {t.get('refId', '')}"))
            walk(p.get("panels"), trail + [title])

    walk(d.get("panels"), [])
    for a in (d.get("annotations") or {}).get("list", []):
        if a.get("expr"):
            out.append(Query(a["expr"], f"{path.name}: annotation {a.get('name')!r}"))
    for v in (d.get("templating") or {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and isinstance(q, str):
            m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", q)
            if m:
                out.append(Query(f"group by ({m.group(2)}) ({m.group(1)})", f"{path.name}: variable {v.get('name')!r}"))
            else:
                out.append(Query(q, f"{path.name}: variable {v.get('name')!r}"))
    return out


def _rules_without_yaml(text: str) -> dict:
    """The alert/record names and exprs of a rules file, for a Python without PyYAML: `expr: ...` on one
    line or as a `|` block, as alerts.yaml writes them."""
    rules, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"\s*-\s*(alert|record):\s*(\S+)", lines[i])
        if m:
            rules.append({m.group(1): m.group(2)})
        m = re.match(r"(\s*)expr:\s*(.*)$", lines[i])
        if m and rules:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in ("|", ">", "|-", ">-"):
                block = []
                while i + 1 < len(lines) and (not lines[i + 1].strip() or
                                              len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                    i += 1
                    block.append(lines[i].strip())
                rest = " ".join(block)
            rules[-1]["expr"] = rest.strip("'\"") if rest[:1] in "'\"" else rest
        i += 1
    return {"groups": [{"name": "rules", "rules": rules}]}


def rule_queries(path: Path) -> list[Query]:
    try:
        import yaml  # PyYAML
        doc = yaml.safe_load(path.read_text()) or {}
    except ImportError:
        doc = _rules_without_yaml(path.read_text())
    out = []
    for g in doc.get("groups", []) or []:
        for r in g.get("rules", []) or []:
            name = r.get("alert") or r.get("record") or "?"
            out.append(Query(str(r.get("expr", "")), f"{path.name}: {g.get('name')}/{name}"))
    return out


def referenced(dashboards=None, rules=None) -> list[Query]:
    qs: list[Query] = []
    for d in DASHBOARDS if dashboards is None else dashboards:
        qs += dashboard_queries(Path(d))
    for r in RULES if rules is None else rules:
        qs += rule_queries(Path(r))
    return qs


# ---- the Rust sources -----------------------------------------------------------------------------

def _strip_test_modules(text: str) -> str:
    m = re.search(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod\s+\w+\s*\{", text)
    return text[: m.start()] if m else text


def _call_args(text: str, start: int) -> str:
    """The text of a macro call's arguments, from the `(` at `start` to its matching `)`."""
    depth = 0
    i = start
    in_str = False
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return text[start + 1 :]


def _roles(path: Path) -> set[str]:
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("services/router/"):
        return {"router"}
    if rel.startswith("services/trainer/"):
        return {"trainer"}
    if rel.startswith("services/worker/"):
        name = path.name
        if name in ("target.rs", "samples.rs"):
            return {"target"}
        if name in ("drafter.rs", "swap.rs"):
            return {"drafter"}
        return {"target", "drafter"}
    return set()


def rust_metrics(dirs=None) -> dict:
    """name -> {"kind": counter|gauge|histogram|None, "labels": set, "files": set, "roles": set}, from
    every `metrics::counter!/gauge!/histogram!` call and `describe_*!` in the non-test Rust sources, plus
    every other "specd_..." string literal (a name passed through a variable)."""
    found: dict[str, dict] = {}

    def entry(name):
        return found.setdefault(name, {"kind": None, "labels": set(), "files": set(), "roles": set()})

    for d in RUST_DIRS if dirs is None else dirs:
        for f in sorted(Path(d).rglob("*.rs")):
            if "tests" in f.relative_to(d).parts[:-1] and f.parent.name == "tests":
                continue
            text = _strip_test_modules(f.read_text(errors="replace"))
            rel = f.relative_to(ROOT).as_posix()
            for m in re.finditer(r"\b(?:metrics::)?(describe_)?(counter|gauge|histogram)!\s*\(", text):
                args = _call_args(text, m.end() - 1)
                lit = re.match(r'\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', args)
                if not lit:
                    continue
                e = entry(lit.group(1))
                e["kind"] = e["kind"] or m.group(2)
                e["files"].add(rel)
                if not m.group(1):
                    e["roles"] |= _roles(f)
                    e["labels"] |= set(re.findall(r'"([a-zA-Z_][a-zA-Z0-9_]*)"\s*=>', args))
            for m in re.finditer(r'"(specd_[a-z0-9_]+)"', text):
                name = m.group(1)
                if name == "specd_descriptor":
                    continue
                e = entry(name)
                e["files"].add(rel)
                if not e["roles"]:
                    e["roles"] |= _roles(f)
    return found


def bucket_suffixes() -> list[str]:
    """The name suffixes the Prometheus recorder gives buckets (histograms; any other histogram renders
    as a summary without _bucket series), read from crates/specd-service/src/metrics.rs."""
    text = (ROOT / "crates" / "specd-service" / "src" / "metrics.rs").read_text()
    return re.findall(r'Matcher::Suffix\(\s*"([^"]+)"', text)


# ---- the command ----------------------------------------------------------------------------------

def live_names(urls: list[str]) -> set[str]:
    names = set()
    for u in urls:
        with urllib.request.urlopen(u, timeout=10) as r:
            for line in r.read().decode("utf-8", "replace").splitlines():
                if not line or line.startswith("#"):
                    continue
                m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
                if m:
                    names.add(base_name(m.group(1)))
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="names with their kind, labels and roles")
    p.add_argument("--exported", action="store_true", help="the metrics the Rust sources record")
    p.add_argument("--live", nargs="+", metavar="URL", help="check the referenced names against /metrics URLs")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME", help="leave out of --live")
    p.add_argument("--ignore-event-only", action="store_true", help="leave event-only metrics out of --live")
    a = p.parse_args()

    rust = rust_metrics()
    if a.exported:
        for n in sorted(k for k, v in rust.items() if v["kind"]):
            print(n)
        return 0
    names: dict[str, set[str]] = {}
    for q in referenced():
        for m in q.metrics:
            names.setdefault(base_name(m), set()).add(q.where)
    if a.live:
        served = live_names(a.live)
        skip = set(a.ignore) | (EVENT_ONLY if a.ignore_event_only else set())
        missing = sorted(n for n in names if n.startswith("specd_") and n not in served and n not in skip)
        for n in missing:
            print(f"missing from /metrics: {n} (used by {', '.join(sorted(names[n]))})")
        print(f"metric_names: {len(names) - len(missing)} of {len(names)} referenced names served, {len(missing)} missing")
        return 1 if missing else 0
    if a.json:
        out = []
        for n in sorted(names):
            r = rust.get(n, {})
            out.append({
                "name": n,
                "kind": r.get("kind"),
                "labels": sorted(r.get("labels", ())),
                "roles": sorted(r.get("roles", ())),
                "event_only": n in EVENT_ONLY,
                "used_by": sorted(names[n]),
            })
        print(json.dumps(out, indent=2))
        return 0
    for n in sorted(names):
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
