#!/usr/bin/env python3
"""Static checks of the deployment files (run by scripts/check-deploy-files.sh, which adds hadolint and
promtool): the Dockerfile's conventions and .dockerignore, the compose file (structure, depends_on,
volumes, published ports, drain timing, and every specd command parsed by the binary with
--check-config), the Grafana dashboard (structure, data source variable), and every metric and label
name the dashboard and the alert rules use, against the Rust sources.

    scripts/check_deploy_files.py [--specd PATH] [--promtool PATH] [--only NAME]...

Prints one `ok`/`FAIL` line per check (with what failed under it) and exits 1 if any failed. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metric_names as mn  # noqa: E402

ROOT = mn.ROOT
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
PROMETHEUS_YML = ROOT / "deploy" / "compose" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "specd.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

ROLES = ("router", "drafter", "target", "trainer", "up")
ROLE_PORTS = {"50051", "8080", "50061", "50071", "50081", "9090"}


class Failures(list):
    def add(self, msg: str) -> None:
        self.append(msg)


# ---- Dockerfile -----------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str, int]]:
    """(INSTRUCTION, arguments, line) with continuations joined and comments dropped."""
    out = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        parts = buf.split(None, 1)
        out.append((parts[0].upper(), parts[1] if len(parts) > 1 else "", start))
        buf = ""
    return out


def exec_form(args: str):
    try:
        v = json.loads(args)
    except json.JSONDecodeError:
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def check_dockerfile(f: Failures) -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    stages: list[dict] = []
    for op, args, line in ins:
        if op == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            image = words[0]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append({"image": image, "name": name, "line": line, "ins": []})
        elif stages:
            stages[-1]["ins"].append((op, args, line))
    if len(stages) < 2:
        f.add("not multi-stage: a build stage and a runtime stage are expected")
        return
    names = {s["name"] for s in stages if s["name"]}
    for s in stages:
        img = s["image"]
        if img in names:
            continue
        if "$" in img:
            f.add(f"line {s['line']}: FROM {img}: base images are written out, pinned")
            continue
        repo, _, tag = img.partition("@")[0].rpartition(":") if ":" in img.split("/")[-1] else (img, "", "")
        if "@sha256:" not in img and (not tag or tag == "latest"):
            f.add(f"line {s['line']}: FROM {img}: pin the base image to a version tag or digest")
    final = stages[-1]
    if not re.fullmatch(r"(docker\.io/)?(library/)?debian:(bookworm(-\d{8})?-slim|12(\.\d+)?-slim)(@sha256:[0-9a-f]{64})?",
                        final["image"]):
        f.add(f"runtime stage is {final['image']}, expected debian:bookworm-slim (a pinned bookworm slim tag)")
    builds = [(a, l) for s in stages for op, a, l in s["ins"] if op == "RUN" and "cargo build" in a]
    if not builds:
        f.add("no `cargo build` RUN")
    for a, l in builds:
        for cmd in re.findall(r"cargo build[^&;|]*", a):
            for flag in ("--release", "--locked"):
                if flag not in cmd.split():
                    f.add(f"line {l}: `{cmd.strip()}` lacks {flag}")
            if "-p specd" not in cmd and "--package specd" not in cmd:
                f.add(f"line {l}: `{cmd.strip()}` does not build the specd package (-p specd)")
    # The dependency layer: every workspace manifest and the lock file are copied and built before the
    # sources are.
    build = next(s for s in stages if any("cargo build" in a for op, a, _ in s["ins"] if op == "RUN"))
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    copied_before: list[str] = []
    first_build_seen = False
    for op, a, l in build["ins"]:
        if op == "RUN" and "cargo build" in a:
            first_build_seen = True
            break
        if op == "COPY":
            srcs = [w for w in a.split() if not w.startswith("--")][:-1]
            copied_before += srcs
    if not first_build_seen:
        f.add("no cargo build in the build stage")
    for need in ["Cargo.toml", "Cargo.lock", ".cargo/config.toml"] + [f"{m}/Cargo.toml" for m in members]:
        if need not in copied_before:
            f.add(f"dependency layer: {need} is not copied before the first cargo build")
    for src in copied_before:
        if src.rstrip("/") in ("crates", "services", "tests", "proto", ".") :
            f.add(f"dependency layer: COPY {src} before the first cargo build defeats the cache")
    # Runtime stage.
    users = [a for op, a, _ in final["ins"] if op == "USER"]
    if not users:
        f.add("runtime stage sets no USER")
    else:
        uid = users[-1].split(":")[0]
        if uid != "10001":
            f.add(f"runtime USER is {users[-1]}, expected 10001 (numeric, non-root)")
    eps = [(a, l) for op, a, l in final["ins"] if op == "ENTRYPOINT"]
    if not eps:
        f.add("runtime stage has no ENTRYPOINT")
    else:
        v = exec_form(eps[-1][0])
        if v is None:
            f.add(f"line {eps[-1][1]}: ENTRYPOINT is not in exec form (JSON array): SIGTERM would not reach specd")
        elif v[0] != "/usr/local/bin/specd":
            f.add(f"ENTRYPOINT starts {v[0]!r}, expected /usr/local/bin/specd")
    for op, a, l in final["ins"]:
        if op == "CMD" and exec_form(a) is None:
            f.add(f"line {l}: CMD is not in exec form")
        if op == "STOPSIGNAL" and a.strip() not in ("SIGTERM", "15"):
            f.add(f"line {l}: STOPSIGNAL {a}: specd drains on SIGTERM")
    for s in stages:
        for op, a, l in s["ins"]:
            if op == "ADD":
                if re.search(r"\b(https?|git)://|git@", a):
                    f.add(f"line {l}: ADD of a URL; fetch nothing at build time that is not pinned and checked")
                else:
                    f.add(f"line {l}: ADD: use COPY")
    bins = [(a, l) for op, a, l in final["ins"] if op == "COPY" and "--from=" in a]
    dests = [a.split()[-1] for a, _ in bins]
    if "/usr/local/bin/specd" not in dests:
        f.add("runtime stage does not COPY --from the build stage to /usr/local/bin/specd")
    for a, l in bins:
        srcs = [w for w in a.split() if not w.startswith("--")][:-1]
        if any(Path(s).name != "specd" for s in srcs):
            f.add(f"line {l}: the runtime stage copies more than the specd binary from the build: {a}")
    exposed = set()
    for op, a, _ in final["ins"]:
        if op == "EXPOSE":
            exposed |= {p.split("/")[0] for p in a.split()}
    if ROLE_PORTS - exposed:
        f.add(f"EXPOSE lacks {sorted(ROLE_PORTS - exposed)}")
    labels = " ".join(a for op, a, _ in final["ins"] if op == "LABEL")
    for key in ("title", "source", "licenses", "version", "revision"):
        if f"org.opencontainers.image.{key}" not in labels:
            f.add(f"no OCI label org.opencontainers.image.{key}")
    # `specd models fetch` finds scripts/fetch-models.sh relative to the working directory.
    workdirs = [a for op, a, _ in final["ins"] if op == "WORKDIR"]
    fetch = [a.split()[-1] for op, a, _ in final["ins"] if op == "COPY" and "scripts/fetch-models.sh" in a]
    if not fetch:
        f.add("the runtime stage does not carry scripts/fetch-models.sh (`specd models fetch`)")
    elif not workdirs or str(Path(workdirs[-1]) / "scripts" / "fetch-models.sh") != fetch[-1]:
        f.add(f"fetch script at {fetch[-1]} is not WORKDIR/scripts/fetch-models.sh (WORKDIR {workdirs[-1:] or 'unset'})")
    envs = " ".join(a for op, a, _ in final["ins"] if op == "ENV")
    if "SPECD_MODELS_DIR=" not in envs:
        f.add("runtime stage does not set SPECD_MODELS_DIR")
    for op, a, l in final["ins"]:
        if op == "COPY" and "--from=" not in a:
            for src in [w for w in a.split() if not w.startswith("--")][:-1]:
                if not (ROOT / src).exists():
                    f.add(f"line {l}: COPY {src}: no such file in the repository")


# ---- .dockerignore --------------------------------------------------------------------------------

def dockerignore_excluded(patterns: list[str], path: str) -> bool:
    def match(pat: str, p: str) -> bool:
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                if i < len(pat) and pat[i] == "/":
                    i += 1
                    rx = rx[:-2] + "(.*/)?"
                continue
            c = pat[i]
            rx += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
            i += 1
        # A pattern that matches a parent directory excludes what is under it.
        return re.fullmatch(rx + "(/.*)?", p) is not None

    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        if match(pat[1:] if neg else pat, path):
            excluded = not neg
    return excluded


def check_dockerignore(f: Failures) -> None:
    if not DOCKERIGNORE.exists():
        f.add(".dockerignore is missing")
        return
    pats = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
    for must in (".git", "target", "models", "weights", "x/target", "a.gguf"):
        if not dockerignore_excluded(pats, must):
            f.add(f".dockerignore does not exclude {must}")
    # What the Dockerfile copies must stay in the context.
    for op, a, l in dockerfile_instructions(DOCKERFILE.read_text()):
        if op == "COPY" and "--from=" not in a:
            for src in [w for w in a.split() if not w.startswith("--")][:-1]:
                if src in ("./", "."):
                    continue
                if dockerignore_excluded(pats, src.rstrip("/")):
                    f.add(f".dockerignore excludes {src}, which the Dockerfile copies (line {l})")
                probe = ROOT / src
                if probe.is_dir():
                    for child in probe.rglob("*"):
                        if child.is_file() and "target" not in child.parts:
                            rel = child.relative_to(ROOT).as_posix()
                            if dockerignore_excluded(pats, rel) and child.suffix in (".rs", ".proto", ".toml"):
                                f.add(f".dockerignore excludes {rel}, part of COPY {src}")
                                break


# ---- compose --------------------------------------------------------------------------------------

TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include", "models"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota",
    "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "depends_on", "deploy", "develop",
    "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint",
    "env_file", "environment", "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add",
    "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links", "logging",
    "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit", "network_mode",
    "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform", "ports",
    "privileged", "profiles", "pull_policy", "read_only", "restart", "runtime", "scale", "secrets",
    "security_opt", "shm_size", "stdin_open", "stop_grace_period", "stop_signal", "storage_opt",
    "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode", "uts", "volumes", "volumes_from",
    "working_dir",
}
HEALTH_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
BUILD_KEYS = {"context", "dockerfile", "args", "target", "labels", "cache_from", "cache_to", "platforms",
              "tags", "ssh", "secrets", "network", "shm_size", "extra_hosts", "isolation", "pull",
              "no_cache", "additional_contexts", "dockerfile_inline", "privileged", "ulimits", "entitlements"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTARTS = {"no", "always", "on-failure", "unless-stopped"}


def interpolate(value, env: dict, where: str, f: Failures, undefaulted: set):
    """Compose variable interpolation: $$, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, $VAR."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, where, f, undefaulted) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, where, f, undefaulted) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        v = env.get(name)
        if op in (":-", "-"):
            if v is None or (op == ":-" and v == ""):
                return interpolate(arg, env, where, f, undefaulted)
            return v
        if op in (":?", "?"):
            if v is None or (op == ":?" and v == ""):
                f.add(f"{where}: ${{{name}}} is required ({arg})")
                return ""
            return v
        if v is None:
            undefaulted.add(f"{where}: ${{{name}}}")
            return ""
        return v

    return re.sub(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)", repl, value)


def duration_s(v) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(v))
    if not parts or "".join(a + b for a, b in parts) != str(v):
        return None
    for n, u in parts:
        total += float(n) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[u]
    return total


def env_map(env) -> dict:
    """A service's environment as a dict (None: passed through from the host when set there)."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return {str(k): (None if v is None else str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()}
    out = {}
    for item in env:
        k, eq, v = str(item).partition("=")
        out[k] = v if eq else None
    return out


def command_list(cmd) -> list[str]:
    if cmd is None:
        return []
    return [str(c) for c in cmd] if isinstance(cmd, list) else shlex.split(str(cmd))


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_compose(f: Failures, specd: str | None, host_env: dict) -> None:
    import yaml

    raw = yaml.safe_load(COMPOSE.read_text())
    if not isinstance(raw, dict):
        f.add("compose.yaml is not a mapping")
        return
    for k in raw:
        if k not in TOP_KEYS and not str(k).startswith("x-"):
            f.add(f"unknown top-level key {k!r}" + (" (obsolete: drop it)" if k == "version" else ""))
    undefaulted: set[str] = set()
    doc = interpolate(raw, host_env, "compose.yaml", f, undefaulted)
    for u in sorted(undefaulted):
        f.add(f"{u} has no default: `docker compose up` must work without an .env file")
    services = doc.get("services") or {}
    declared_volumes = set((doc.get("volumes") or {}).keys())
    used_volumes: set[str] = set()
    specd_image = None
    roles: dict[str, list[str]] = {r: [] for r in ROLES}
    fetchers = []
    deps_graph: dict[str, set] = {}
    for name, svc in services.items():
        where = f"service {name}"
        if not isinstance(svc, dict):
            f.add(f"{where}: not a mapping")
            continue
        for k in svc:
            if k not in SERVICE_KEYS and not str(k).startswith("x-"):
                f.add(f"{where}: unknown key {k!r}")
        image = svc.get("image")
        if not image and "build" not in svc:
            f.add(f"{where}: neither image nor build")
        if image:
            last = image.split("/")[-1]
            if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
                f.add(f"{where}: image {image} is not pinned to a tag")
        if "build" in svc:
            b = svc["build"]
            if isinstance(b, dict):
                for k in b:
                    if k not in BUILD_KEYS:
                        f.add(f"{where}: unknown build key {k!r}")
                ctx = (COMPOSE.parent / b.get("context", ".")).resolve()
                dockerfile = ctx / b.get("dockerfile", "Dockerfile")
                if not dockerfile.exists():
                    f.add(f"{where}: build dockerfile {dockerfile} does not exist")
                elif dockerfile.resolve() == DOCKERFILE.resolve():
                    specd_image = specd_image or image
        restart = svc.get("restart")
        if restart is not None and str(restart).split(":")[0] not in RESTARTS:
            f.add(f"{where}: restart {restart!r}")
        # depends_on
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        deps_graph[name] = set(deps)
        for dep, spec in deps.items():
            if dep not in services:
                f.add(f"{where}: depends_on {dep!r}, which is not a service")
                continue
            cond = (spec or {}).get("condition", "service_started")
            if cond not in CONDITIONS:
                f.add(f"{where}: depends_on {dep}: condition {cond!r}")
            if cond == "service_healthy" and not (services[dep].get("healthcheck") or {}).get("test"):
                f.add(f"{where}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if cond == "service_completed_successfully" and str(services[dep].get("restart", "no")) not in ("no", "on-failure"):
                f.add(f"{where}: waits for {dep} to complete, but {dep} restarts ({services[dep].get('restart')})")
            dep_profiles = set(services[dep].get("profiles") or [])
            if dep_profiles and not dep_profiles & set(svc.get("profiles") or []):
                f.add(f"{where}: depends on {dep}, which only runs under profiles {sorted(dep_profiles)}")
        # volumes
        for v in svc.get("volumes") or []:
            if isinstance(v, dict):
                src, vtype = v.get("source"), v.get("type", "volume")
            else:
                src = str(v).split(":")[0]
                vtype = "bind" if src.startswith((".", "/", "~")) else "volume"
            if vtype == "volume" and src:
                used_volumes.add(src)
                if src not in declared_volumes:
                    f.add(f"{where}: volume {src!r} is not declared under top-level volumes")
            elif vtype == "bind" and src.startswith("."):
                if not (COMPOSE.parent / src).exists():
                    f.add(f"{where}: bind mount {src} does not exist (relative to deploy/compose)")
        # healthcheck
        hc = svc.get("healthcheck")
        if hc:
            for k in hc:
                if k not in HEALTH_KEYS:
                    f.add(f"{where}: unknown healthcheck key {k!r}")
            test = hc.get("test")
            if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL", "NONE")) and not isinstance(test, str):
                f.add(f"{where}: healthcheck test must be a list starting with CMD, CMD-SHELL or NONE")
            for k in ("interval", "timeout", "start_period", "start_interval"):
                if k in hc and duration_s(hc[k]) is None:
                    f.add(f"{where}: healthcheck {k} {hc[k]!r} is not a duration")
        # ports: only the router is published in the default profile; profiled extras on loopback only.
        ports = svc.get("ports") or []
        argv = command_list(svc.get("command"))
        role = argv[0] if argv else None
        if ports:
            if svc.get("profiles"):
                for p in ports:
                    if not str(p).startswith("127.0.0.1:"):
                        f.add(f"{where}: optional service publishes {p} beyond loopback")
            elif role != "router":
                f.add(f"{where}: publishes ports {ports}; only the router is published")
        if image == specd_image or (image and specd_image is None and "build" in svc):
            pass
        if role in roles:
            roles[role].append(name)
        if argv[:2] == ["models", "fetch"]:
            fetchers.append(name)
    # cycles
    def visit(n, stack):
        if n in stack:
            f.add(f"depends_on cycle: {' -> '.join(stack + [n])}")
            return
        for d in deps_graph.get(n, ()):
            visit(d, stack + [n])
    for n in deps_graph:
        visit(n, [])
    for v in declared_volumes - used_volumes:
        f.add(f"volume {v!r} is declared but no service uses it")
    # The cluster this file promises.
    need = {"router": 1, "target": 2, "drafter": 2, "trainer": 1}
    for r, n in need.items():
        if len(roles[r]) < n:
            f.add(f"{len(roles[r])} {r} service(s), expected at least {n}")
    if not fetchers:
        f.add("no service runs `specd models fetch`")
    etcd = [n for n, s in services.items() if str(s.get("image", "")).split("/")[-1].startswith("etcd:")]
    if not etcd:
        f.add("no etcd service (official etcd image)")
    # Every specd service: the image, the model volume, drain timing, advertised address, its command.
    checks = []
    for name, svc in services.items():
        argv = command_list(svc.get("command"))
        if not argv or (argv[0] not in ROLES and argv[:2] != ["models", "fetch"]):
            continue
        where = f"service {name}"
        if specd_image and svc.get("image") != specd_image:
            f.add(f"{where}: image {svc.get('image')} is not the specd image {specd_image}")
        env = env_map(svc.get("environment"))
        env = {k: (host_env.get(k) if v is None else v) for k, v in env.items()}
        env = {k: v for k, v in env.items() if v is not None}
        mounts = [str(v) for v in svc.get("volumes") or []]
        if argv[:2] == ["models", "fetch"]:
            if len(argv) != 3 or argv[2] not in ("qwen", "smollm", "all"):
                f.add(f"{where}: `specd {' '.join(argv)}`: expected models fetch qwen|smollm|all")
            if not any(m.split(":")[1:2] == ["/models"] and not m.endswith(":ro") for m in mounts):
                f.add(f"{where}: the fetch needs the model volume at /models, writable")
            continue
        role = argv[0]
        models_dir = flag_value(argv, "--models-dir") or env.get("SPECD_MODELS_DIR", "/models")
        if not any(m.split(":")[1:2] == [models_dir] for m in mounts):
            f.add(f"{where}: nothing is mounted at its models dir {models_dir}")
        drain = flag_value(argv, "--drain-secs") or env.get("SPECD_DRAIN_SECS", "30")
        grace = duration_s(svc.get("stop_grace_period", "10s"))
        if grace is None or grace <= float(drain):
            f.add(f"{where}: stop_grace_period {svc.get('stop_grace_period', '10s (default)')} is not longer than the drain ({drain} s)")
        if str(svc.get("stop_signal", "SIGTERM")) not in ("SIGTERM", "15"):
            f.add(f"{where}: stop_signal {svc.get('stop_signal')}: specd drains on SIGTERM")
        if role in ("router", "drafter", "target", "trainer"):
            if not (flag_value(argv, "--etcd") or env.get("SPECD_ETCD")):
                f.add(f"{where}: no --etcd / SPECD_ETCD")
            etcd_url = flag_value(argv, "--etcd") or env.get("SPECD_ETCD", "")
            for ep in etcd_url.split(","):
                host = re.sub(r"^https?://", "", ep).rsplit(":", 1)[0]
                if host and host not in services:
                    f.add(f"{where}: etcd endpoint {ep} names no service")
                elif host and host not in (svc.get("depends_on") or {}):
                    f.add(f"{where}: does not depend on {host}")
            adv = flag_value(argv, "--advertise-addr") or env.get("SPECD_ADVERTISE_ADDR")
            grpc = flag_value(argv, "--grpc-addr") or env.get("SPECD_GRPC_ADDR")
            if not adv:
                f.add(f"{where}: no --advertise-addr: the others would dial loopback")
            else:
                host, _, port = adv.rpartition(":")
                if host != name:
                    f.add(f"{where}: advertises {adv}, but the others reach it as {name}")
                if grpc and grpc.rpartition(":")[2] != port:
                    f.add(f"{where}: advertises port {port} but listens on {grpc}")
            if role != "router" and not (flag_value(argv, "--metrics-addr") or env.get("SPECD_METRICS_ADDR")):
                f.add(f"{where}: no --metrics-addr: Prometheus and the healthcheck need /metrics and /health")
        checks.append((name, argv, env))
    # The binary parses every command, with the service's environment, and validates it.
    if specd is None:
        f.add("no specd binary given (--specd PATH or SPECD=PATH): commands not checked")
        return
    if not Path(specd).is_file() or not os.access(specd, os.X_OK):
        f.add(f"the specd binary {specd} is missing (build it, or set SPECD=PATH): commands not checked")
        return
    for name, argv, env in checks:
        run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECD_", "OTEL_"))}
        run_env.update(env)
        try:
            r = subprocess.run([specd, *argv, "--check-config"], env=run_env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            f.add(f"service {name}: `specd {' '.join(argv)} --check-config`: {e}")
            continue
        if r.returncode != 0:
            out = (r.stderr.strip() or r.stdout.strip()).splitlines()
            f.add(f"service {name}: `specd {' '.join(argv)} --check-config` exited {r.returncode}: {' / '.join(out[-3:])}")


def check_prometheus_config(f: Failures) -> None:
    """The compose Prometheus scrapes every specd service on its metrics port."""
    import yaml

    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose.get("services", {})
    scraped = {}
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                scraped[t] = job["job_name"]
    for t, job in scraped.items():
        host = t.rsplit(":", 1)[0]
        if host not in services:
            f.add(f"prometheus.yml: job {job} scrapes {t}, which is no compose service")
    for name, svc in services.items():
        argv = command_list(svc.get("command"))
        if not argv or argv[0] not in ("router", "drafter", "target", "trainer"):
            continue
        if argv[0] == "router":
            port = (flag_value(argv, "--http-addr") or "0.0.0.0:8080").rsplit(":", 1)[1]
        else:
            port = (flag_value(argv, "--metrics-addr") or ":").rsplit(":", 1)[1]
        target = f"{name}:{port}"
        if target not in scraped:
            f.add(f"prometheus.yml does not scrape {target} (service {name})")
        elif "specd" not in scraped[target]:
            f.add(f"prometheus.yml: job {scraped[target]} of {target} lacks 'specd' (SpecdProcessDown matches job=~\".*specd.*\")")
    for rf in prom.get("rule_files", []):
        local = ROOT / "deploy" / "prometheus" / Path(rf).relative_to("rules") if rf.startswith("rules/") else None
        if local is None or not local.exists():
            f.add(f"prometheus.yml: rule file {rf} is not deploy/prometheus/ mounted at rules/")


# ---- dashboard ------------------------------------------------------------------------------------

def check_dashboard(f: Failures) -> None:
    try:
        d = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        f.add(f"{DASHBOARD.name} is not valid JSON: {e}")
        return
    for k in ("title", "uid", "panels", "schemaVersion", "templating"):
        if k not in d:
            f.add(f"dashboard has no {k!r}")
    variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        f.add("dashboard has no `datasource` variable of type datasource (query prometheus)")
    ids = set()

    def check_ds(obj, where):
        src = obj.get("datasource")
        if src is None:
            f.add(f"{where}: no datasource (use ${{datasource}})")
        elif isinstance(src, dict):
            if src.get("uid") not in ("${datasource}", "$datasource", "-- Grafana --", "-- Mixed --"):
                f.add(f"{where}: datasource uid {src.get('uid')!r} is hard-coded (use ${{datasource}})")
        elif src not in ("${datasource}", "$datasource"):
            f.add(f"{where}: datasource {src!r} is hard-coded (use ${{datasource}})")

    def walk(panels):
        for p in panels or []:
            where = f"panel {p.get('title')!r}"
            if p.get("id") in ids:
                f.add(f"{where}: duplicate id {p.get('id')}")
            ids.add(p.get("id"))
            g = p.get("gridPos") or {}
            if not all(k in g for k in ("h", "w", "x", "y")) or g.get("x", 0) + g.get("w", 0) > 24:
                f.add(f"{where}: gridPos {g}")
            if p.get("type") != "row":
                if not p.get("targets"):
                    f.add(f"{where}: no queries")
                check_ds(p, where)
                for t in p.get("targets", []):
                    if not t.get("expr"):
                        f.add(f"{where}: a query without expr")
                    check_ds(t, f"{where} query {t.get('refId')}")
            walk(p.get("panels"))

    walk(d.get("panels"))
    for a in (d.get("annotations") or {}).get("list", []):
        if a.get("expr"):
            check_ds(a, f"annotation {a.get('name')!r}")
    for name, v in variables.items():
        if v.get("type") == "query":
            check_ds(v, f"variable {name!r}")


def check_promql_syntax(f: Failures, promtool: str | None) -> None:
    """Every dashboard query parsed by promtool, as a recording rule with Grafana's variables filled."""
    if not promtool:
        f.add("promtool not found: dashboard PromQL not parsed (scripts/setup-deploy-tools.sh installs it)")
        return
    import yaml

    qs = mn.dashboard_queries(DASHBOARD)
    rules = []
    for i, q in enumerate(qs):
        e = q.expr
        for var, val in (("$__rate_interval", "5m"), ("${__rate_interval}", "5m"), ("$__interval", "1m"),
                         ("$__range", "1h"), ("$namespace", ".*"), ("${namespace}", ".*")):
            e = e.replace(var, val)
        if "$" in e:
            f.add(f"{q.where}: unknown Grafana variable in {q.expr}")
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as t:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, t)
    try:
        r = subprocess.run([promtool, "check", "rules", t.name], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            out = r.stdout + r.stderr
            for m in re.finditer(r"group \"dashboard\", rule (\d+)", out):
                idx = int(m.group(1)) - 1
                if 0 <= idx < len(qs):
                    f.add(f"{qs[idx].where}: does not parse: {qs[idx].expr}")
            f.add("promtool: " + " / ".join(l.strip() for l in out.strip().splitlines()[-4:]))
    finally:
        os.unlink(t.name)


# ---- metric names ---------------------------------------------------------------------------------

def check_metric_names(f: Failures) -> None:
    rust = mn.rust_metrics()
    suffixes = mn.bucket_suffixes()
    queries = mn.referenced([DASHBOARD], [ALERTS])
    for q in queries:
        for written in q.metrics:
            base = mn.base_name(written)
            if base in mn.PROMETHEUS_METRICS:
                continue
            r = rust.get(base)
            if r is None or not r["files"]:
                f.add(f"{q.where}: {written}: no such metric in the Rust sources")
                continue
            if written != base:
                if r["kind"] != "histogram":
                    f.add(f"{q.where}: {written}: {base} is a {r['kind']}, not a histogram")
                elif not any(base.endswith(s) for s in suffixes):
                    f.add(f"{q.where}: {written}: {base} has no buckets (only names ending {suffixes} are histograms; others render as summaries)")
            if written in q.rated and r["kind"] == "gauge":
                f.add(f"{q.where}: rate/increase of the gauge {written}")
            if written in q.rated and r["kind"] == "histogram" and written == base:
                f.add(f"{q.where}: rate of the histogram {written} itself (use _bucket, _sum or _count)")
        # Labels: a selector's matchers belong to its metric; grouping labels to some metric of the query.
        for written, labels in q.selectors:
            if not written:
                continue
            base = mn.base_name(written)
            if base in mn.PROMETHEUS_METRICS or base not in rust:
                continue
            allowed = rust[base]["labels"] | mn.TARGET_LABELS | ({"le"} if written.endswith("_bucket") else set())
            for label in sorted(labels - allowed):
                f.add(f"{q.where}: {written}{{{label}=...}}: the services attach no {label!r} label to {base} (they attach {sorted(rust[base]['labels']) or 'none'})")
        known = set(mn.TARGET_LABELS)
        for written in q.metrics:
            base = mn.base_name(written)
            if base in rust:
                known |= rust[base]["labels"]
            if written.endswith("_bucket"):
                known.add("le")
        for label in sorted(q.grouping - known):
            f.add(f"{q.where}: groups by {label!r}, a label none of {sorted(q.metrics)} has")
    exported = {n for n, v in rust.items() if v["kind"]}
    used = {mn.base_name(m) for q in queries for m in q.metrics}
    unused = sorted(exported - used)
    if unused:
        print(f"     note: exported but not on the dashboard or in an alert: {', '.join(unused)}")


def slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def check_alert_rules(f: Failures) -> None:
    import yaml

    doc = yaml.safe_load(ALERTS.read_text())
    anchors = set()
    if OPERATIONS.exists():
        for line in OPERATIONS.read_text().splitlines():
            m = re.match(r"#+\s+(.*)", line)
            if m:
                anchors.add(slug(m.group(1)))
    else:
        f.add("docs/operations.md is missing (alerts link to it)")
    names = set()
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            if "alert" not in r:
                continue
            a = r["alert"]
            if a in names:
                f.add(f"alert {a} is defined twice")
            names.add(a)
            if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                f.add(f"alert {a}: severity label must be critical, warning or info")
            ann = r.get("annotations") or {}
            for k in ("summary", "description", "runbook_url"):
                if not ann.get(k):
                    f.add(f"alert {a}: no {k} annotation")
            url = ann.get("runbook_url", "")
            if url and OPERATIONS.exists():
                path, _, anchor = url.partition("#")
                if path != "docs/operations.md" or anchor not in anchors:
                    f.add(f"alert {a}: runbook_url {url} is no heading of docs/operations.md")


# ---- main -----------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specd", default=os.environ.get("SPECD"), help="the specd binary (for --check-config)")
    p.add_argument("--promtool", default=None)
    p.add_argument("--only", action="append", default=[])
    a = p.parse_args()
    promtool = a.promtool or next((str(Path(d) / "promtool") for d in os.environ.get("PATH", "").split(":")
                                    if (Path(d) / "promtool").is_file()), None)
    checks = [
        ("dockerfile", "Dockerfile conventions (deploy/docker/Dockerfile)", check_dockerfile),
        ("dockerignore", ".dockerignore", check_dockerignore),
        ("compose", "compose file, commands parsed by `specd ... --check-config` (preset smollm)",
         lambda f: check_compose(f, a.specd, {})),
        ("compose", "compose file with SPECD_MODEL_PRESET=qwen SPECD_DRAFTER_KINDS=model,self,ngram",
         lambda f: check_compose(f, a.specd, {"SPECD_MODEL_PRESET": "qwen", "SPECD_DRAFTER_KINDS": "model,self,ngram"})),
        ("compose", "compose Prometheus scrapes every specd service", check_prometheus_config),
        ("dashboard", "Grafana dashboard structure (deploy/grafana/specd.json)", check_dashboard),
        ("dashboard", "dashboard PromQL parses (promtool)", lambda f: check_promql_syntax(f, promtool)),
        ("metrics", "metric and label names of the dashboard and alerts exist in the Rust sources", check_metric_names),
        ("metrics", "alert rules: severity, annotations, runbook anchors in docs/operations.md", check_alert_rules),
    ]
    failed = 0
    for key, title, fn in checks:
        if a.only and key not in a.only:
            continue
        f = Failures()
        try:
            fn(f)
        except Exception as e:  # a check that crashes is a failed check, with its reason
            f.add(f"{type(e).__name__}: {e}")
        if f:
            failed += 1
            print(f"FAIL {title}")
            for msg in f:
                print(f"     {msg}")
        else:
            print(f"ok   {title}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
