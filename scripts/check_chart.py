#!/usr/bin/env python3
"""Checks of the Helm chart that helm itself does not make (run by scripts/check-chart.sh).

  check_chart.py sync CHART              values.yaml and values.schema.json describe the same keys; values.yaml
                                         and every ci/*.yaml validate against the schema
  check_chart.py readme CHART [--update] README.md's values table is the one values.yaml and its comments give
  check_chart.py manifests OUT FILE...   splits rendered manifests: the kinds kubernetes-validate knows go to
                                         OUT/<name> for it; the CRD kinds (ServiceMonitor, PodMonitor,
                                         ScaledObject) are checked here against hand-written expectations; and
                                         references inside a release (selectors, named ports, scale targets) hold
  check_chart.py args SPECD FILE...      every container that runs specd: its command and args, with its env
                                         (envFrom ConfigMaps, literal values, downward-API placeholders) and
                                         $(VAR) expanded as the kubelet does, passed to `SPECD ... --check-config`

Every failure is printed as "FAIL: ..."; the exit status is 1 if there was one.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print(f"FAIL: {msg}")


def done(what):
    if FAILURES:
        print(f"check_chart {what}: {len(FAILURES)} failure(s)")
        sys.exit(1)
    print(f"check_chart {what}: ok")


# --------------------------------------------------------------------------------------------------
# values.yaml <-> values.schema.json


def resolve(schema, node):
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target = schema
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def walk_sync(schema, node, value, path, leaves):
    """Every key of `value` is a property of `node` and the other way round, recursively; collects the
    leaves (scalars, lists, and objects whose schema is free-form) as (path, value, schema node)."""
    node = resolve(schema, node)
    props = node.get("properties") if isinstance(node, dict) else None
    if isinstance(value, dict) and props is not None:
        if node.get("additionalProperties") is not False:
            fail(f"schema {path or '/'}: an object with properties should say additionalProperties: false")
        for key in value:
            if key not in props:
                fail(f"values.yaml {path}.{key}: not in values.schema.json")
        for key in props:
            if key not in value:
                fail(f"values.schema.json {path}.{key}: not in values.yaml")
        for key, sub in value.items():
            if key in props:
                walk_sync(schema, props[key], sub, f"{path}.{key}", leaves)
    else:
        if isinstance(value, dict) and props is None and node.get("type") != "object":
            fail(f"values.yaml {path}: an object where the schema has {node.get('type')}")
        if not isinstance(value, dict) and props is not None:
            fail(f"values.yaml {path}: {value!r} where the schema has an object with properties")
        leaves.append((path[1:], value, node))


def cmd_sync(chart):
    values = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
    schema = json.load(open(os.path.join(chart, "values.schema.json")))
    leaves = []
    walk_sync(schema, schema, values, "", leaves)
    try:
        import jsonschema
    except ImportError:
        fail("python jsonschema is missing: run scripts/setup-deploy-tools.sh (its venv has it)")
        done("sync")
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    files = [os.path.join(chart, "values.yaml")]
    cidir = os.path.join(chart, "ci")
    files += sorted(os.path.join(cidir, f) for f in os.listdir(cidir) if f.endswith(".yaml"))
    for f in files:
        doc = yaml.safe_load(open(f)) or {}
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            where = "/".join(str(p) for p in err.path) or "/"
            fail(f"{os.path.relpath(f, chart)} at {where}: {err.message}")
    print(f"sync: {len(leaves)} values, {len(files)} value files validated")
    done("sync")


# --------------------------------------------------------------------------------------------------
# README values table

KEY_RE = re.compile(r"^(\s*)([A-Za-z0-9_]+):(.*)$")
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def value_comments(path):
    """Descriptions from '# -- text' comments (continued on following '#' lines) above a key."""
    out, stack, pending = {}, [], None
    for line in open(path):
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        m = KEY_RE.match(line)
        if m and not stripped.startswith("-"):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            if pending:
                out[".".join(k for _, k in stack)] = " ".join(pending)
        pending = None
    return out


GENERIC = {
    "resources.requests": "Container resource requests.",
    "resources.limits": "Container resource limits (memory: no CPU limit by default, throttling hurts latency).",
    "replicas": "Pod replicas.",
    "extraArgs": "More flags (--flag=value); one replaces the chart's flag of the same name.",
    "extraEnv": "More variables for this role's container (a list of EnvVar).",
    "podAntiAffinity": "Spread pods over nodes: soft (preferred), hard (required) or none.",
    "affinity": "Replaces the generated anti-affinity when not empty.",
    "nodeSelector": "Node labels the pods need.",
    "tolerations": "Tolerations of the pods.",
    "topologySpreadConstraints": "Topology spread constraints of the pods.",
    "podAnnotations": "Extra pod annotations.",
    "podLabels": "Extra pod labels.",
    "annotations": "Extra annotations.",
    "labels": "Extra labels.",
    "priorityClassName": "PriorityClass of the pods.",
    "threads": "Kernel threads (--threads; null: every CPU the container may use).",
    "capacity": "Sequences held at once (--capacity).",
    "hpa.enabled": "A HorizontalPodAutoscaler on the pods' CPU.",
    "hpa.minReplicas": "Fewest replicas the HPA keeps.",
    "hpa.maxReplicas": "Most replicas the HPA makes.",
    "hpa.targetCPUUtilizationPercentage": "CPU utilization the HPA aims at.",
    "pdb.enabled": "A PodDisruptionBudget.",
    "pdb.maxUnavailable": "Pods a voluntary disruption may take down at once.",
    "interval": "Scrape interval.",
    "storageClass": "Storage class (\"\": the cluster's default).",
    "size": "Size of the claim.",
    "image.repository": "Image repository.",
    "image.tag": "Image tag.",
    "image.pullPolicy": "Image pull policy.",
}


def generic(path):
    parts = path.split(".")
    if len(parts) >= 3 and parts[-3] == "probes":
        kind = {"startup": "startupProbe (grpc health)", "readiness": "readinessProbe (grpc health)",
                "liveness": "livenessProbe (TCP on the gRPC port)"}[parts[-2]]
        return f"{kind} {parts[-1]}."
    for n in (2, 1):
        key = ".".join(parts[-n:])
        if key in GENERIC:
            return GENERIC[key]
    return ""


def table(chart):
    values = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
    schema = json.load(open(os.path.join(chart, "values.schema.json")))
    leaves = []
    walk_sync(schema, schema, values, "", leaves)
    comments = value_comments(os.path.join(chart, "values.yaml"))
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for path, value, node in leaves:
        typ = node.get("type")
        if isinstance(typ, list):
            typ = " or ".join(typ)
        if typ is None and "anyOf" in node:
            typ = " or ".join(sorted({resolve({}, a).get("type", "?") for a in node["anyOf"]}))
        if typ is None:
            typ = "object" if isinstance(value, dict) else type(value).__name__
        desc = comments.get(path) or node.get("description", "") or generic(path)
        if "enum" in node and not all(str(v) in desc for v in node["enum"] if v):
            choices = ", ".join(json.dumps(v) for v in node["enum"])
            desc = f"{desc} One of {choices}.".strip()
        default = json.dumps(value, separators=(", ", ": "))
        rows.append(f"| `{path}` | {typ} | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(rows)


def cmd_readme(chart, update):
    readme = os.path.join(chart, "README.md")
    text = open(readme).read()
    if BEGIN not in text or END not in text:
        fail(f"{readme}: no {BEGIN} ... {END} section")
        done("readme")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    want = f"{head}{BEGIN}\n{table(chart)}\n{END}{tail}"
    if want != text:
        if update:
            open(readme, "w").write(want)
            print(f"readme: rewrote the values table of {readme}")
        else:
            fail(f"{readme}: the values table is out of date (UPDATE_GOLDEN=1 scripts/check-chart.sh rewrites it)")
    done("readme")


# --------------------------------------------------------------------------------------------------
# Rendered manifests

CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")


def load_docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]


def pod_spec(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("metadata", {}), doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        t = doc["spec"]["template"]
        return t.get("metadata", {}), t.get("spec", {})
    return None, None


def selects(selector, labels):
    """matchLabels/matchExpressions (or a plain map, as a Service's) against a label map."""
    if selector is None:
        return False
    ml = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for e in selector.get("matchExpressions", []):
        have = e["key"] in labels
        op = e["operator"]
        if op == "In" and labels.get(e["key"]) not in e["values"]:
            return False
        if op == "NotIn" and labels.get(e["key"]) in e["values"]:
            return False
        if op == "Exists" and not have or op == "DoesNotExist" and have:
            return False
    return True


def only_keys(where, d, allowed):
    if not isinstance(d, dict):
        fail(f"{where}: expected a mapping, got {d!r}")
        return False
    extra = set(d) - set(allowed)
    if extra:
        fail(f"{where}: unexpected keys {sorted(extra)} (allowed: {sorted(allowed)})")
    return True


def check_crd(name, doc, pods, services, workloads):
    kind, meta, spec = doc["kind"], doc.get("metadata", {}), doc.get("spec", {})
    where = f"{name}: {kind}/{meta.get('name')}"
    only_keys(where, doc, {"apiVersion", "kind", "metadata", "spec"})
    if not meta.get("name"):
        fail(f"{where}: no metadata.name")
    if kind == "ServiceMonitor":
        only_keys(f"{where} spec", spec, {"selector", "endpoints", "namespaceSelector", "jobLabel"})
        sel = spec.get("selector", {})
        only_keys(f"{where} spec.selector", sel, {"matchLabels", "matchExpressions"})
        svcs = [s for s in services if selects(sel, s["metadata"].get("labels", {}))]
        if not svcs:
            fail(f"{where}: its selector matches no Service of the release")
        if not spec.get("endpoints"):
            fail(f"{where}: no endpoints")
        for i, ep in enumerate(spec.get("endpoints") or []):
            only_keys(f"{where} endpoints[{i}]", ep, {"port", "path", "interval", "scrapeTimeout", "scheme"})
            ports = {p.get("name") for s in svcs for p in s["spec"].get("ports", [])}
            if ep.get("port") not in ports:
                fail(f"{where} endpoints[{i}]: port {ep.get('port')!r} is not a named port of {sorted(ports)}")
            if not str(ep.get("path", "/metrics")).startswith("/"):
                fail(f"{where} endpoints[{i}]: path must start with /")
            if "interval" in ep and not DURATION.match(str(ep["interval"])):
                fail(f"{where} endpoints[{i}]: interval {ep['interval']!r} is not a duration")
    elif kind == "PodMonitor":
        only_keys(f"{where} spec", spec, {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"})
        sel = spec.get("selector", {})
        only_keys(f"{where} spec.selector", sel, {"matchLabels", "matchExpressions"})
        matched = [p for p in pods if selects(sel, p[0].get("labels", {}))]
        if not matched:
            fail(f"{where}: its selector matches no pod of the release")
        if not spec.get("podMetricsEndpoints"):
            fail(f"{where}: no podMetricsEndpoints")
        for i, ep in enumerate(spec.get("podMetricsEndpoints") or []):
            only_keys(f"{where} podMetricsEndpoints[{i}]", ep, {"port", "path", "interval", "scrapeTimeout", "scheme"})
            for meta_, spec_ in matched:
                names = {p.get("name") for c in spec_.get("containers", []) for p in c.get("ports", [])}
                if ep.get("port") not in names:
                    fail(f"{where} podMetricsEndpoints[{i}]: pod {meta_.get('labels', {}).get('app.kubernetes.io/component')}"
                         f" has no container port named {ep.get('port')!r}")
            if "interval" in ep and not DURATION.match(str(ep["interval"])):
                fail(f"{where} podMetricsEndpoints[{i}]: interval {ep['interval']!r} is not a duration")
    elif kind == "ScaledObject":
        only_keys(f"{where} spec", spec, {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                                          "cooldownPeriod", "idleReplicaCount", "fallback", "advanced", "triggers"})
        ref = spec.get("scaleTargetRef", {})
        only_keys(f"{where} scaleTargetRef", ref, {"apiVersion", "kind", "name", "envSourceContainerName"})
        if (ref.get("kind"), ref.get("name")) not in workloads:
            fail(f"{where}: scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not a workload of the release")
        for k in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            if k in spec and not (isinstance(spec[k], int) and spec[k] >= 0):
                fail(f"{where}: {k} must be a non-negative integer")
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            fail(f"{where}: minReplicaCount > maxReplicaCount")
        triggers = spec.get("triggers") or []
        if not triggers:
            fail(f"{where}: no triggers")
        for i, t in enumerate(triggers):
            only_keys(f"{where} triggers[{i}]", t, {"type", "metadata", "name", "authenticationRef", "metricType"})
            if t.get("type") != "prometheus":
                fail(f"{where} triggers[{i}]: expected type prometheus")
            md = t.get("metadata", {})
            for k in ("serverAddress", "query", "threshold"):
                if not isinstance(md.get(k), str) or not md.get(k):
                    fail(f"{where} triggers[{i}].metadata.{k}: a non-empty string is required")
            try:
                float(md.get("threshold", ""))
            except ValueError:
                fail(f"{where} triggers[{i}].metadata.threshold: not a number")
            if "specd_num_requests_waiting" not in md.get("query", ""):
                print(f"note: {where}: the query does not read specd_num_requests_waiting")


def check_refs(name, docs, pods, services, workloads):
    for doc in docs:
        kind, meta, spec = doc["kind"], doc.get("metadata", {}), doc.get("spec", {})
        where = f"{name}: {kind}/{meta.get('name')}"
        if kind == "Service":
            matched = [p for p in pods if selects(spec.get("selector", {}), p[0].get("labels", {}))]
            if not matched:
                fail(f"{where}: its selector matches no pod")
            for port in spec.get("ports", []):
                tp = port.get("targetPort")
                if isinstance(tp, str):
                    for pm, ps in matched:
                        names = {p.get("name") for c in ps.get("containers", []) for p in c.get("ports", [])}
                        if tp not in names:
                            fail(f"{where}: targetPort {tp!r} is not a container port of the pods it selects")
        elif kind in ("PodDisruptionBudget",):
            if not any(selects(spec.get("selector"), p[0].get("labels", {})) for p in pods):
                fail(f"{where}: its selector matches no pod")
        elif kind == "HorizontalPodAutoscaler":
            ref = spec.get("scaleTargetRef", {})
            if (ref.get("kind"), ref.get("name")) not in workloads:
                fail(f"{where}: scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not a workload of the release")
        elif kind == "NetworkPolicy":
            matched = [p for p in pods if selects(spec.get("podSelector"), p[0].get("labels", {}))]
            if not matched:
                fail(f"{where}: its podSelector matches no pod")
            for rule in spec.get("ingress", []):
                for port in rule.get("ports", []):
                    if isinstance(port.get("port"), str):
                        for pm, ps in matched:
                            names = {p.get("name") for c in ps.get("containers", []) for p in c.get("ports", [])}
                            if port["port"] not in names:
                                fail(f"{where}: port {port['port']!r} is not a container port of the pods it selects")
                for peer in rule.get("from", []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        if not any(selects(peer["podSelector"], p[0].get("labels", {})) for p in pods):
                            fail(f"{where}: a from.podSelector matches no pod of the release")
        m, ps = pod_spec(doc)
        if ps is None:
            continue
        if kind != "Pod" and not selects(spec.get("selector"), m.get("labels", {})):
            fail(f"{where}: spec.selector does not match its own pod template")
        vols = {v["name"] for v in ps.get("volumes", [])}
        vols |= {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for c in ps.get("initContainers", []) + ps.get("containers", []):
            cw = f"{where} container {c['name']}"
            for vm in c.get("volumeMounts", []):
                if vm["name"] not in vols:
                    fail(f"{cw}: mounts volume {vm['name']!r} the pod does not have")
            ports = {p["containerPort"] for p in c.get("ports", [])} | {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                for mech in ("grpc", "tcpSocket", "httpGet"):
                    if mech in pr and pr[mech]["port"] not in ports:
                        fail(f"{cw}: {probe} port {pr[mech]['port']!r} is not a container port")
        if ps.get("terminationGracePeriodSeconds") is not None:
            for c in ps.get("containers", []):
                sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                if sleep >= ps["terminationGracePeriodSeconds"]:
                    fail(f"{where}: the preStop sleep is not shorter than terminationGracePeriodSeconds")


def cmd_manifests(outdir, files):
    skipped = []
    for path in files:
        name = os.path.basename(path)
        docs = load_docs(path)
        pods = [pod_spec(d) for d in docs if pod_spec(d)[1] is not None]
        services = [d for d in docs if d["kind"] == "Service"]
        workloads = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
        core = []
        for d in docs:
            if (d.get("apiVersion"), d.get("kind")) in CRD_KINDS:
                check_crd(name, d, pods, services, workloads)
                skipped.append(f"{name}: {d['kind']}/{d['metadata']['name']}")
            else:
                core.append(d)
        check_refs(name, docs, pods, services, workloads)
        with open(os.path.join(outdir, name), "w") as f:
            yaml.safe_dump_all(core, f, sort_keys=False)
    if skipped:
        print("manifests: CRD kinds checked here against hand-written expectations, not by kubernetes-validate:")
        for s in skipped:
            print(f"  {s}")
    done("manifests")


# --------------------------------------------------------------------------------------------------
# Container args against the binary

PLACEHOLDERS = {
    "status.podIP": "10.0.0.1",
    "status.hostIP": "10.0.0.2",
    "metadata.namespace": "specd",
    "spec.nodeName": "node-0",
    "spec.serviceAccountName": "specd",
}
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(s, env):
    """Kubernetes' $(VAR) expansion: defined variables are substituted, undefined references stay as
    written, and $$ is a literal $."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return VAR_REF.sub(sub, s)


def container_env(c, pod_name, configmaps, where):
    env = {}
    for src in c.get("envFrom", []):
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            cm = configmaps.get(src["configMapRef"]["name"])
            if cm is None:
                fail(f"{where}: envFrom ConfigMap {src['configMapRef']['name']!r} is not rendered by the chart")
                continue
            for k, v in cm.items():
                env[prefix + k] = str(v)
        else:
            fail(f"{where}: envFrom {list(src)} cannot be resolved offline")
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                fp = vf["fieldRef"]["fieldPath"]
                env[e["name"]] = pod_name if fp == "metadata.name" else PLACEHOLDERS.get(fp, "placeholder")
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                cm = configmaps.get(ref["name"], {})
                if ref["key"] not in cm:
                    fail(f"{where}: env {e['name']} refers to ConfigMap {ref['name']} key {ref['key']} that is not rendered")
                env[e["name"]] = str(cm.get(ref["key"], ""))
            elif "resourceFieldRef" in vf:
                env[e["name"]] = "1"
            else:
                env[e["name"]] = "placeholder-secret"
        else:
            env[e["name"]] = ""
    return env


def help_has(specd, argv_prefix, flag):
    r = subprocess.run([specd] + argv_prefix + ["--help"], capture_output=True, text=True, timeout=20,
                       env={"PATH": "/usr/bin:/bin"})
    return r.returncode == 0 and flag in r.stdout


def run_check(specd, argv, env, cache, cwd):
    key = (tuple(argv), tuple(sorted(env.items())))
    if key not in cache:
        full_env = {"PATH": "/usr/bin:/bin", "HOME": cwd}
        full_env.update(env)
        r = subprocess.run([specd] + argv, capture_output=True, text=True, timeout=20, env=full_env, cwd=cwd)
        cache[key] = (r.returncode, (r.stdout + r.stderr).strip())
    return cache[key]


def cmd_args(specd, files):
    if not (os.path.isfile(specd) and os.access(specd, os.X_OK)):
        fail(f"the specd binary {specd} is missing (build it with `cargo build --release -p specd`, or set SPECD)")
        done("args")
    cwd = tempfile.mkdtemp(prefix="check-chart-args.")
    cache = {}
    checked = 0
    # The check is only worth something if the binary knows --check-config and refuses an unknown flag.
    for role in ("router", "drafter", "target", "trainer", "loadtest"):
        if not help_has(specd, [role], "--check-config"):
            fail(f"`specd {role} --help` shows no --check-config: this binary predates it")
    rc, out = run_check(specd, ["router", "--etcd=http://127.0.0.1:2379", "--no-such-flag", "--check-config"], {}, cache, cwd)
    if rc == 0:
        fail(f"`specd router --no-such-flag --check-config` was accepted: the args check would prove nothing ({out})")
    fetch_checks = help_has(specd, ["models", "fetch"], "--check-config")
    for path in files:
        name = os.path.basename(path)
        docs = load_docs(path)
        configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        for d in docs:
            meta, ps = pod_spec(d)
            if ps is None:
                continue
            pod_name = f"{d['metadata']['name']}-0"
            for c in ps.get("initContainers", []) + ps.get("containers", []):
                cmd = c.get("command") or []
                if not cmd or os.path.basename(cmd[0]) != "specd":
                    continue
                where = f"{name}: {d['kind']}/{d['metadata']['name']} container {c['name']}"
                env = container_env(c, pod_name, configmaps, where)
                argv = [expand(a, env) for a in cmd[1:] + c.get("args", [])]
                leftover = [a for a in argv if VAR_REF.search(a)]
                if leftover:
                    fail(f"{where}: unresolved $(VAR) in {leftover} (the kubelet would pass them as written)")
                if argv[:2] == ["models", "fetch"] and not fetch_checks:
                    # `specd models fetch` has no --check-config: its one argument is checked here.
                    rest = argv[2:]
                    if len(rest) > 1 or (rest and rest[0] not in ("qwen", "smollm", "all")):
                        fail(f"{where}: `specd models fetch` takes one of qwen, smollm, all; got {rest}")
                    elif not help_has(specd, ["models", "fetch"], "Usage"):
                        fail(f"{where}: the binary has no `models fetch` command")
                    checked += 1
                    continue
                rc, out = run_check(specd, argv + ["--check-config"], env, cache, cwd)
                checked += 1
                if rc != 0:
                    shown = " ".join(argv)
                    envs = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
                    fail(f"{where}: the binary rejects its configuration (exit {rc}):\n    env: {envs}\n"
                         f"    specd {shown} --check-config\n    {out}")
    print(f"args: {checked} specd containers checked ({len(cache) - 1} distinct configurations) against {specd}")
    done("args")


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    cmd = sys.argv[1]
    if cmd == "sync":
        cmd_sync(sys.argv[2])
    elif cmd == "readme":
        cmd_readme(sys.argv[2], "--update" in sys.argv[3:])
    elif cmd == "manifests":
        cmd_manifests(sys.argv[2], sys.argv[3:])
    elif cmd == "args":
        cmd_args(sys.argv[2], sys.argv[3:])
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
