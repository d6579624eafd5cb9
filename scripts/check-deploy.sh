#!/usr/bin/env bash
# Validate the deployment files offline: k8s/**/*.yaml and the Dockerfile.
#
#   (a) every YAML file under k8s/ parses (all documents), and every Kubernetes object
#       in it has apiVersion, kind and metadata.name;
#   (b) built-in Kubernetes objects validate against the real OpenAPI schemas, strictly
#       (unknown fields are errors), for the oldest and newest Kubernetes versions
#       supported (K8S_VERSIONS below). The schemas come bundled in the PyPI package
#       `kubernetes-validate`, so no cluster and no network is needed once installed.
#       Custom resources (Prometheus Operator, Istio) have no schema there: they are
#       parsed and checked for (a) only, plus the cross-checks below;
#   (c) the Envoy bootstrap inside k8s/envoy-configmap.yaml passes
#       `envoy --mode validate` (Envoy from scripts/install-test-deps.sh);
#   (d) every Valet policy inside a ConfigMap (key valet.yaml) passes
#       `valet check-config`, warnings included (OIDC discovery needs no network for
#       it); target/debug/valet is (re)built with `cargo build --bin valet` when
#       missing or older than the sources (or VALET_BIN names a binary to use);
#   (e) cross-checks a schema cannot see: ConfigMaps and ports that the Deployments
#       name exist; the policy is mounted as a directory (no subPath) and the JWKS
#       cache_dir is a writable volume; Envoy's `valet` cluster, Valet's listen
#       addresses, the probes and the Service agree on ports; every container is
#       non-root, read-only, without privilege escalation or capabilities, with a
#       RuntimeDefault seccomp profile; the PodMonitor selects the pods and port; the
#       Istio provider names, ServiceEntry and AuthorizationPolicies agree;
#   (f) the Dockerfile parses (BuildKit's own parser, PyPI `dockerfile`) and has the
#       expected shape: rust:1-bookworm builder, non-root numeric USER, /valet
#       entrypoint;
#   (g) `kubectl kustomize k8s/` builds, when kubectl is on PATH (skipped otherwise);
#   (h) Istio objects: every AuthorizationPolicy and EnvoyFilter under k8s/ uses only
#       fields and enum values Istio's API has (istio/api security/v1beta1 and
#       networking/v1alpha3: no CRD schema is bundled, and the API server refuses
#       unknown fields); and `valet envoy-config --format istio` for the valet-policy
#       ConfigMap (not kept under k8s/: generated) passes the same checks, names a
#       provider of mesh-config.yaml with the same service, port, timeout and
#       failOpen as its meshConfig comment, selects the pods of a Deployment under
#       k8s/istio/ that runs Valet, skips the Check only on exact paths or `/p/*`,
#       and its EnvoyFilter patches, applied to an inbound chain shaped like Istio's
#       (RBAC shadow rule, ext_authz as pilot writes it for envoyExtAuthzGrpc), pass
#       `envoy --mode validate`.
#
# Tools go to $REPO/.tools/deploy-venv (a venv; PyPI only). Idempotent: a warm run
# makes no network access and takes a few seconds. Exits non-zero with a message per
# problem; the last line of stdout is a one-line summary.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$TOOLS/deploy-venv"
# Pinned: a new release must not change the verdict silently.
REQUIREMENTS=(kubernetes-validate==1.37.0 PyYAML==6.0.4 dockerfile==3.4.0)
# Oldest supported (the preStop `sleep` action is on by default from 1.30) and newest.
K8S_VERSIONS="1.30.0 1.37.0"

log() { echo "check-deploy: $*" >&2; }

# ------------------------------------------------------------------ tools
# shellcheck source=lib/venv.sh
. "$REPO/scripts/lib/venv.sh"
ensure_venv "$VENV" check-deploy "${REQUIREMENTS[@]}"

# Envoy: installed (or found) by the test-deps script; its last stdout line is the path.
ENVOY="${VALET_ENVOY:-}"
if [ -z "$ENVOY" ]; then
    ENVOY="$("$REPO/scripts/install-test-deps.sh" | tail -n1)"
fi

# Valet: $VALET_BIN if set, else the debug binary, rebuilt only when missing or older
# than its sources.
VALET="${VALET_BIN:-$REPO/target/debug/valet}"
if [ -z "${VALET_BIN:-}" ] && { [ ! -x "$VALET" ] ||
   [ -n "$(find "$REPO/src" "$REPO/Cargo.toml" "$REPO/Cargo.lock" -newer "$VALET" -print -quit 2>/dev/null)" ]; }; then
    log "building target/debug/valet (cargo build --bin valet)"
    (cd "$REPO" && cargo build --quiet --bin valet >&2)
fi

KUBECTL=""
if command -v kubectl >/dev/null 2>&1; then KUBECTL="$(command -v kubectl)"; fi

exec "$VENV/bin/python" - "$REPO" "$ENVOY" "$VALET" "$KUBECTL" "$K8S_VERSIONS" <<'PYTHON'
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import dockerfile
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError
    import yaml
except ImportError as e:
    print(f"check-deploy: {e}; delete .tools/deploy-venv and run again", file=sys.stderr)
    sys.exit(1)

REPO, ENVOY, VALET, KUBECTL, VERSIONS = sys.argv[1:6]
VERSIONS = VERSIONS.split()
K8S = os.path.join(REPO, "k8s")

# API groups whose kinds are custom resources: no schema bundled, parsed only.
CRD_GROUPS = {"monitoring.coreos.com", "security.istio.io", "networking.istio.io",
              "install.istio.io"}
# Files that are YAML but not Kubernetes objects.
NOT_OBJECTS = {("kustomize.config.k8s.io", "Kustomization")}

problems = []


def fail(where, msg):
    problems.append(f"{where}: {msg}")


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


# ------------------------------------------------------------ (a) parse
files = []
for root, dirs, names in os.walk(K8S):
    dirs.sort()
    for n in sorted(names):
        if n.endswith((".yaml", ".yml")):
            files.append(os.path.join(root, n))
if not files:
    fail("k8s/", "no YAML files")

objects = []  # (relpath, index, doc)
for path in files:
    rel = os.path.relpath(path, REPO)
    try:
        with open(path, encoding="utf-8") as fh:
            docs = list(yaml.safe_load_all(fh))
    except (OSError, yaml.YAMLError) as e:
        fail(rel, f"does not parse: {e}")
        continue
    docs = [d for d in docs if d is not None]
    if not docs:
        fail(rel, "no YAML document")
    for i, doc in enumerate(docs):
        where = f"{rel} document {i + 1}"
        if not isinstance(doc, dict):
            fail(where, "not a mapping")
            continue
        api, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api, str) or not api:
            fail(where, "no apiVersion")
            continue
        if not isinstance(kind, str) or not kind:
            fail(where, "no kind")
            continue
        if (group_of(api), kind) in NOT_OBJECTS:
            continue
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
            fail(where, f"{kind} has no metadata.name")
            continue
        objects.append((rel, i, doc))

for path in (os.path.join(K8S, n) for n in os.listdir(K8S) if n.endswith(".json")):
    try:
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError) as e:
        fail(os.path.relpath(path, REPO), f"does not parse as JSON: {e}")

seen = {}
for rel, i, doc in objects:
    key = (doc["kind"], doc["metadata"]["name"], os.path.dirname(rel))
    if key in seen:
        fail(rel, f"{doc['kind']}/{doc['metadata']['name']} also defined in {seen[key]}")
    seen[key] = rel


def kn(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


# ------------------------------------------------------------ (b) schemas
n_schema = n_custom = 0
for rel, i, doc in objects:
    if group_of(doc["apiVersion"]) in CRD_GROUPS:
        n_custom += 1
        continue
    ok = True
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            fail(rel, f"{kn(doc)}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version} "
                      "(a typo, or a custom resource whose group is not in CRD_GROUPS)")
            ok = False
            break
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            fail(rel, f"{kn(doc)} against Kubernetes {version}: {path}: {e.message}")
            ok = False
    n_schema += ok


def by_kind(kind, api_prefix=None):
    return [(rel, d) for rel, _, d in objects
            if d["kind"] == kind and (api_prefix is None or d["apiVersion"].startswith(api_prefix))]


# ------------------------------------------------- (c), (d) embedded configs
tmp = tempfile.TemporaryDirectory(prefix="check-deploy-")


def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    return p.returncode, (p.stdout + p.stderr).strip()


envoy_version = "?"
n_envoy = 0
envoy_boot = None
for rel, cm in by_kind("ConfigMap"):
    data = cm.get("data") or {}
    if "envoy.yaml" not in data:
        continue
    path = os.path.join(tmp.name, f"envoy-{cm['metadata']['name']}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(data["envoy.yaml"])
    code, out = run([ENVOY, "--mode", "validate", "-c", path, "--log-level", "warn"])
    n_envoy += 1
    if code != 0:
        fail(rel, f"{kn(cm)} envoy.yaml: envoy --mode validate failed:\n{out}")
    try:
        boot = yaml.safe_load(data["envoy.yaml"])
        if rel == "k8s/envoy-configmap.yaml":
            envoy_boot = boot
    except yaml.YAMLError as e:
        fail(rel, f"{kn(cm)} envoy.yaml does not parse: {e}")
        continue
    # What `--mode validate` lets through: a gRPC service naming an undefined cluster
    # (every Check would fail at run time), or a gRPC cluster without HTTP/2.
    clusters = {cl.get("name"): cl for cl in ((boot or {}).get("static_resources") or {}).get("clusters") or []}

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "envoy_grpc" and isinstance(v, dict):
                    yield v.get("cluster_name")
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for name in walk(boot):
        cl = clusters.get(name)
        if cl is None:
            fail(rel, f"{kn(cm)} envoy.yaml: envoy_grpc names cluster {name!r}, which is not defined")
        elif "http2_protocol_options" not in json.dumps(cl):
            fail(rel, f"{kn(cm)} envoy.yaml: cluster {name!r} serves gRPC but does not speak HTTP/2 "
                      "(http2_protocol_options)")
if not any(rel == "k8s/envoy-configmap.yaml" for rel, _ in by_kind("ConfigMap")):
    fail("k8s/envoy-configmap.yaml", "missing (or has no ConfigMap)")
elif envoy_boot is None:
    fail("k8s/envoy-configmap.yaml", "no envoy.yaml key in its ConfigMap")
code, out = run([ENVOY, "--version"])
m = re.search(r"/(\d+\.\d+\.\d+)/", out or "")
if m:
    envoy_version = m.group(1)

def block_origin(rel, cm_name, key):
    """(first line, indent) in the file of the literal block data[key] of ConfigMap
    cm_name, so that positions inside it can be reported as file:line:column."""
    try:
        with open(os.path.join(REPO, rel), encoding="utf-8") as fh:
            text = fh.read()
        for node in yaml.compose_all(text):
            if not isinstance(node, yaml.MappingNode):
                continue
            top = {k.value: v for k, v in node.value}
            meta = {k.value: v for k, v in getattr(top.get("metadata"), "value", []) or []}
            if getattr(top.get("kind"), "value", None) != "ConfigMap" or getattr(meta.get("name"), "value", None) != cm_name:
                continue
            data = {k.value: v for k, v in getattr(top.get("data"), "value", []) or []}
            value = data.get(key)
            if value is None or value.style != "|":
                return None
            first = value.start_mark.line + 1  # 0-based line after the `|`
            line = text.splitlines()[first]
            return first + 1, len(line) - len(line.lstrip(" "))
    except (OSError, yaml.YAMLError, IndexError):
        pass
    return None


def relocate(out, path, rel, cm_name, key):
    """Rewrite `path:L:C:` positions of an extracted block into positions in rel."""
    origin = block_origin(rel, cm_name, key)

    def repl(m):
        if origin is None:
            return f"{rel} [{cm_name}].data.{key}:{m.group(1)}:{m.group(2)}:"
        return f"{rel}:{origin[0] + int(m.group(1)) - 1}:{origin[1] + int(m.group(2))}:"

    out = re.sub(re.escape(path) + r":(\d+):(\d+):", repl, out)
    return out.replace(path, f"{rel} [{cm_name}].data.{key}")


policies = {}  # ConfigMap name -> parsed policy
policy_files = {}  # ConfigMap name -> its valet.yaml, extracted
for rel, cm in by_kind("ConfigMap"):
    data = cm.get("data") or {}
    if "valet.yaml" not in data:
        continue
    d = os.path.join(tmp.name, "valet-" + cm["metadata"]["name"])
    os.makedirs(d)
    # Every key, as the volume mounts them: the policy may name its siblings
    # (a denylist, a JWKS file) by relative path.
    for key, value in data.items():
        if "/" not in key and not key.startswith("."):
            with open(os.path.join(d, key), "w", encoding="utf-8") as fh:
                fh.write(value)
    path = os.path.join(d, "valet.yaml")
    policy_files[cm["metadata"]["name"]] = path
    code, out = run([VALET, "check-config", "--config", path])
    out = relocate(out or "", path, rel, cm["metadata"]["name"], "valet.yaml")
    if code != 0:
        fail(rel, f"{kn(cm)} valet.yaml: valet check-config failed:\n{out}")
    elif "warning" in out:
        fail(rel, f"{kn(cm)} valet.yaml: valet check-config warns:\n{out}")
    try:
        policies[cm["metadata"]["name"]] = yaml.safe_load(data["valet.yaml"])
    except yaml.YAMLError:
        pass  # check-config said why
if "valet-policy" not in policies:
    fail("k8s/valet-configmap.yaml", "no ConfigMap valet-policy with a valet.yaml key")


# ------------------------------------------------------- (e) cross-checks
def port_of(addr):
    m = re.fullmatch(r"(.*):(\d+)", str(addr or ""))
    return (m.group(1), int(m.group(2))) if m else (None, None)


def seconds(text, where, what):
    """A Valet duration (250ms, 30s, 5m, 1h, 1m30s) in seconds, or None if invalid."""
    parts = re.findall(r"(\d+)(ms|s|m|h)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        fail(where, f"{what}={text!r} is not a duration like 10s")
        return None
    return sum(int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def named_port(container, ref):
    if isinstance(ref, int):
        return ref
    for p in container.get("ports") or []:
        if p.get("name") == ref:
            return p.get("containerPort")
    return None


configmaps = {(os.path.dirname(rel), d["metadata"]["name"]) for rel, d in by_kind("ConfigMap")}
configmaps_anywhere = {d["metadata"]["name"] for _, d in by_kind("ConfigMap")}
n_pods = 0
for rel, dep in by_kind("Deployment"):
    where = f"{rel} {kn(dep)}"
    spec = (dep.get("spec") or {}).get("template", {}).get("spec") or {}
    labels = ((dep.get("spec") or {}).get("template", {}).get("metadata") or {}).get("labels") or {}
    n_pods += 1
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    pod_sc = spec.get("securityContext") or {}
    containers = spec.get("containers") or []
    for v in volumes.values():
        cm = (v.get("configMap") or {}).get("name")
        if cm and cm not in configmaps_anywhere:
            fail(where, f"volume {v['name']} names ConfigMap {cm}, defined nowhere under k8s/")
    for c in containers:
        cw = f"{where} container {c.get('name')}"
        sc = c.get("securityContext") or {}
        want = {
            "runAsNonRoot": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True,
            "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities.drop [ALL]": "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
            "seccompProfile RuntimeDefault": (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
        }
        for what, ok in want.items():
            if not ok:
                fail(cw, f"securityContext lacks {what}")
        if not (c.get("resources") or {}).get("limits", {}).get("memory"):
            fail(cw, "no memory limit")
        for vm in c.get("volumeMounts") or []:
            if vm.get("name") not in volumes:
                fail(cw, f"mounts undefined volume {vm.get('name')}")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            pr = c.get(probe) or {}
            for how in ("httpGet", "tcpSocket", "grpc"):
                if how in pr and named_port(c, pr[how].get("port")) is None:
                    fail(cw, f"{probe}.{how}.port {pr[how].get('port')!r} is not a port of the container")

        if c.get("name") != "valet":
            continue
        # Valet: policy mounted as a directory, cache writable, ports agree.
        args = c.get("args") or []
        cfg = args[args.index("--config") + 1] if "--config" in args[:-1] else "/etc/valet/valet.yaml"
        cfg_dir = os.path.dirname(cfg)
        mount = next((vm for vm in c.get("volumeMounts") or [] if vm.get("mountPath") == cfg_dir), None)
        if mount is None:
            fail(cw, f"nothing is mounted at {cfg_dir} (the directory of --config {cfg})")
            continue
        if mount.get("subPath") or mount.get("subPathExpr"):
            fail(cw, f"{cfg_dir} is mounted with subPath: Valet would never see a policy update")
        cm_name = (volumes.get(mount["name"], {}).get("configMap") or {}).get("name")
        policy = policies.get(cm_name)
        if policy is None:
            fail(cw, f"{cfg_dir} is not a ConfigMap with a valet.yaml key")
            continue
        if any(vm.get("subPath") for vm in c.get("volumeMounts") or []):
            fail(cw, "a volume is mounted with subPath")
        listen = policy.get("listen") or {}
        admin_host, admin_port = port_of(listen.get("admin"))
        grpc_host, grpc_port = port_of(listen.get("grpc"))
        if admin_port is None:
            fail(cw, f"policy {cm_name} has no listen.admin: probes and metrics need it")
        elif admin_host not in ("0.0.0.0", "[::]"):
            fail(cw, f"policy {cm_name} listen.admin {listen.get('admin')}: probes reach the pod IP, not loopback")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = (c.get(probe) or {}).get("httpGet")
            if not get:
                fail(cw, f"no httpGet {probe}")
                continue
            if named_port(c, get.get("port")) != admin_port:
                fail(cw, f"{probe} port is not listen.admin's {admin_port}")
            if get.get("path") not in ("/healthz", "/readyz"):
                fail(cw, f"{probe} path {get.get('path')} is not /healthz or /readyz")
        if ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path") != "/readyz":
            fail(cw, "readinessProbe must be /readyz (keys loaded)")
        for p in policy.get("providers") or []:
            cache = (p.get("jwks") or {}).get("cache_dir")
            if not cache:
                continue
            vm = next((vm for vm in c.get("volumeMounts") or [] if vm.get("mountPath") == cache), None)
            if vm is None or vm.get("readOnly") or "emptyDir" not in volumes.get(vm["name"], {}):
                fail(cw, f"provider {p.get('name')}: jwks.cache_dir {cache} must be a writable emptyDir mount "
                         "(the root filesystem is read-only)")
        env = {e.get("name"): e.get("value") for e in c.get("env") or []}
        if env.get("VALET_WORKERS") is None:
            fail(cw, "VALET_WORKERS is not set")
        # After SIGTERM Valet drains, then waits for in-flight Checks: all of it (and
        # any preStop sleep before the SIGTERM) must fit in the grace period.
        drain = seconds(env.get("VALET_DRAIN", "5s"), cw, "VALET_DRAIN")
        grace = seconds(env.get("VALET_SHUTDOWN_GRACE", "10s"), cw, "VALET_SHUTDOWN_GRACE")
        pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
        period = spec.get("terminationGracePeriodSeconds", 30)
        if None not in (drain, grace) and pre + drain + grace > period:
            fail(cw, f"preStop {pre}s + drain {drain:g}s + grace {grace:g}s exceed "
                     f"terminationGracePeriodSeconds {period}: Valet would be killed mid-drain")
        for other in containers:
            if other is c:
                continue
            osleep = (((other.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            if other.get("name") == "envoy" and drain is not None and pre + drain <= osleep:
                fail(cw, f"stops answering ({pre + drain:g}s after the pod's termination starts) before "
                         f"Envoy stops sending ({osleep}s): Checks would fail")
        ports = {p.get("containerPort") for p in c.get("ports") or []}
        if grpc_host in ("127.0.0.1", "localhost", "[::1]"):
            if grpc_port in ports:
                fail(cw, f"lists the loopback-only Check port {grpc_port} as a container port")
            # The pod's Envoy must reach it there.
            envoy = next((x for x in containers if x.get("name") == "envoy"), None)
            if envoy is not None and envoy_boot is not None:
                clusters = {cl.get("name"): cl for cl in (envoy_boot.get("static_resources") or {}).get("clusters") or []}
                addrs = [ep["endpoint"]["address"]["socket_address"]
                         for lb in ((clusters.get("valet") or {}).get("load_assignment") or {}).get("endpoints") or []
                         for ep in lb.get("lb_endpoints") or []]
                if not addrs or any((a.get("address"), a.get("port_value")) != (grpc_host, grpc_port) for a in addrs):
                    fail(where, f"Envoy's cluster valet points at {addrs}, Valet listens on {listen.get('grpc')}")

    envoy = next((x for x in containers if x.get("name") == "envoy"), None)
    if envoy is not None and envoy_boot is not None:
        listeners = (envoy_boot.get("static_resources") or {}).get("listeners") or []
        lports = {l["address"]["socket_address"].get("port_value") for l in listeners}
        for p in envoy.get("ports") or []:
            if p.get("containerPort") not in lports:
                fail(where, f"envoy container port {p.get('containerPort')} is no listener of the bootstrap {sorted(lports)}")
        admin = ((envoy_boot.get("admin") or {}).get("address") or {}).get("socket_address") or {}
        if admin.get("address") not in ("127.0.0.1", "::1"):
            fail("k8s/envoy-configmap.yaml", "Envoy's admin must listen on loopback")

    # Services selecting this pod must target one of its ports.
    for srel, svc in by_kind("Service"):
        if os.path.dirname(srel) != os.path.dirname(rel):
            continue
        sel = (svc.get("spec") or {}).get("selector") or {}
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            continue
        for sp in (svc.get("spec") or {}).get("ports") or []:
            tp = sp.get("targetPort", sp.get("port"))
            if not any(named_port(c, tp) for c in containers):
                fail(srel, f"{kn(svc)} port {sp.get('name')}: targetPort {tp!r} is no port of {kn(dep)}")

    # PodMonitors in the same directory that select this pod.
    for mrel, pm in by_kind("PodMonitor"):
        sel = ((pm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if os.path.dirname(mrel) != os.path.dirname(rel) or any(labels.get(k) != v for k, v in sel.items()):
            continue
        for ep in (pm.get("spec") or {}).get("podMetricsEndpoints") or []:
            if not any(named_port(c, ep.get("port")) for c in containers):
                fail(mrel, f"{kn(pm)} scrapes port {ep.get('port')!r}, which {kn(dep)} does not have")

for mrel, pm in by_kind("PodMonitor"):
    sel = ((pm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    hits = [d for rel, d in by_kind("Deployment") if os.path.dirname(rel) == os.path.dirname(mrel)
            and sel and all((((d.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels", {}).get(k) == v
                            for k, v in sel.items())]
    if not hits:
        fail(mrel, f"{kn(pm)} selects no pod of a Deployment beside it")

# Istio: providers named by policies exist in the mesh config; local provider -> ServiceEntry.
providers = {}
for rel, op in by_kind("IstioOperator"):
    for p in (((op.get("spec") or {}).get("meshConfig") or {}).get("extensionProviders") or []):
        providers[p.get("name")] = p
for rel, ap in by_kind("AuthorizationPolicy"):
    spec = ap.get("spec") or {}
    if spec.get("action") == "CUSTOM":
        name = (spec.get("provider") or {}).get("name")
        if name not in providers:
            fail(rel, f"{kn(ap)} uses provider {name!r}, not defined in the IstioOperator's extensionProviders")
        if not spec.get("rules"):
            fail(rel, f"{kn(ap)}: a CUSTOM policy without rules never matches")
service_entries = {h: se for _, se in by_kind("ServiceEntry") for h in (se.get("spec") or {}).get("hosts") or []}
services = {d["metadata"]["name"]: d for _, d in by_kind("Service")}
for name, p in providers.items():
    grpc = p.get("envoyExtAuthzGrpc")
    if grpc is None:
        continue
    unknown = set(grpc) - {"service", "port", "timeout", "failOpen", "statusOnError",
                           "includeRequestBodyInCheck", "clearRouteCache"}
    if unknown:
        fail("k8s/istio/mesh-config.yaml", f"provider {name}: envoyExtAuthzGrpc has no field(s) {sorted(unknown)}")
    host, port = grpc.get("service"), grpc.get("port")
    if grpc.get("failOpen") is not False:
        fail("k8s/istio/mesh-config.yaml", f"provider {name}: set failOpen: false (fail closed)")
    if host in service_entries:
        se = service_entries[host]
        if port not in [pp.get("number") for pp in se["spec"].get("ports") or []]:
            fail("k8s/istio/mesh-config.yaml", f"provider {name}: port {port} is not a port of ServiceEntry {host}")
        local = [e.get("address") for e in se["spec"].get("endpoints") or []]
        grpc_port = port_of((policies.get("valet-policy") or {}).get("listen", {}).get("grpc"))[1]
        if local == ["127.0.0.1"] and port != grpc_port:
            fail("k8s/istio/mesh-config.yaml", f"provider {name}: port {port} but valet-policy listens on {grpc_port}")
    elif host and host.split(".")[0] in services:
        svc = services[host.split(".")[0]]
        if port not in [pp.get("port") for pp in svc["spec"].get("ports") or []]:
            fail("k8s/istio/mesh-config.yaml", f"provider {name}: port {port} is not a port of Service {kn(svc)}")
    else:
        fail("k8s/istio/mesh-config.yaml", f"provider {name}: {host} is neither a ServiceEntry host nor a Service under k8s/")


# ------------------------------------------------------- (h) Istio objects
# Field names (as in YAML) and enum values from istio/api:
# security/v1beta1/authorization_policy.proto, networking/v1alpha3/envoy_filter.proto.
ISTIO_FIELDS = {
    "AuthorizationPolicy": {"selector", "targetRef", "targetRefs", "rules", "action", "provider"},
    "selector": {"matchLabels"},
    "provider": {"name"},
    "rules": {"from", "to", "when"},
    "from": {"source"},
    "source": {"principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals",
               "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts", "ipBlocks",
               "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "trustDomains", "notTrustDomains"},
    "to": {"operation"},
    "operation": {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"},
    "when": {"key", "values", "notValues"},
    "EnvoyFilter": {"workloadSelector", "targetRefs", "configPatches", "priority"},
    "workloadSelector": {"labels"},
    "configPatches": {"applyTo", "match", "patch"},
    "match": {"context", "proxy", "listener", "routeConfiguration", "cluster", "waypoint"},
    "listener": {"portNumber", "portName", "filterChain", "listenerFilter", "name"},
    "filterChain": {"name", "sni", "transportProtocol", "applicationProtocols", "filter", "destinationPort"},
    "filter": {"name", "subFilter"},
    "subFilter": {"name"},
    "patch": {"operation", "value", "filterClass"},
}
ISTIO_ENUMS = {
    ("AuthorizationPolicy", "action"): {"ALLOW", "DENY", "AUDIT", "CUSTOM"},
    ("configPatches", "applyTo"): {"LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER",
                                   "ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER",
                                   "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER"},
    ("match", "context"): {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY", "WAYPOINT"},
    ("patch", "operation"): {"MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST",
                             "REPLACE", "MERGE_AND_REPLACE_LIST"},
}
# Below these, the content is free (labels) or Envoy's own (patch values).
ISTIO_OPAQUE = {"matchLabels", "labels", "value", "targetRef", "targetRefs", "proxy",
                "routeConfiguration", "cluster", "waypoint"}


def check_istio_fields(where, doc):
    def walk(kind, node, path):
        allowed = ISTIO_FIELDS.get(kind)
        items = node if isinstance(node, list) else [node]
        for item in items:
            if not isinstance(item, dict):
                fail(where, f"{path}: expected a mapping, got {item!r}")
                continue
            for k, v in item.items():
                if allowed is not None and k not in allowed:
                    fail(where, f"{path}: {kind} has no field {k!r} (Istio would refuse it)")
                    continue
                values = ISTIO_ENUMS.get((kind, k))
                if values is not None and v not in values:
                    fail(where, f"{path}.{k}: {v!r} is not one of {sorted(values)}")
                if k in ISTIO_OPAQUE or not isinstance(v, (dict, list)):
                    continue
                if isinstance(v, list) and not all(isinstance(x, dict) for x in v):
                    continue  # a list of strings
                walk(k, v, f"{path}.{k}")

    walk(doc["kind"], doc.get("spec") or {}, f"{kn(doc)}.spec")
    for rule in (doc.get("spec") or {}).get("rules") or []:
        for to in (rule or {}).get("to") or []:
            op = (to or {}).get("operation") or {}
            for p in (op.get("paths") or []) + (op.get("notPaths") or []):
                inner = p[1:-1] if len(p) > 1 else ""
                if "*" in inner and "{" not in p:
                    fail(where, f"{kn(doc)}: path {p!r}: `*` only at the start or the end")


for rel, d in by_kind("AuthorizationPolicy") + by_kind("EnvoyFilter"):
    check_istio_fields(rel, d)


def proto_merge(into, value):
    """As an EnvoyFilter MERGE: messages field by field, lists appended."""
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            proto_merge(into[k], v)
        elif isinstance(v, list) and isinstance(into.get(k), list):
            into[k] = into[k] + v
        else:
            into[k] = v


def istio_inbound(ap, ef, provider_cluster):
    """An Envoy bootstrap shaped like Istio's inbound chain for a CUSTOM provider,
    with the EnvoyFilter's patches applied."""
    perms = []
    for rule in ap["spec"].get("rules") or []:
        ops = [(t or {}).get("operation") or {} for t in (rule or {}).get("to") or []]
        not_paths = [p for op in ops for p in op.get("notPaths") or []]
        matchers = [{"url_path": {"path": {"prefix": p[:-1]} if p.endswith("*") else {"exact": p}}}
                    for p in not_paths]
        perms.append({"not_rule": {"or_rules": {"rules": matchers}}} if matchers else {"any": True})
    rbac = {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "shadow_rules": {"action": "DENY", "policies": {"istio-ext-authz-0": {
            "permissions": [{"or_rules": {"rules": perms}}], "principals": [{"any": True}]}}},
        "shadow_rules_stat_prefix": "istio_ext_authz_"}}
    ext_authz = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "grpc_service": {"envoy_grpc": {"cluster_name": provider_cluster}, "timeout": "600s"},
        "transport_api_version": "V3", "failure_mode_allow": False,
        "filter_enabled_metadata": {"filter": "envoy.filters.http.rbac",
                                    "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
                                    "value": {"string_match": {"prefix": "istio-ext-authz"}}}}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "inbound", "route_config": {"virtual_hosts": [{
               "name": "inbound", "domains": ["*"],
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]}]}}
    before = []
    for p in ef["spec"].get("configPatches") or []:
        value = (p.get("patch") or {}).get("value") or {}
        op = (p.get("patch") or {}).get("operation")
        if p.get("applyTo") == "HTTP_FILTER" and op == "MERGE":
            proto_merge(ext_authz, value)
        elif p.get("applyTo") == "HTTP_FILTER" and op == "INSERT_BEFORE":
            before.append(value)
        elif p.get("applyTo") == "NETWORK_FILTER" and op == "MERGE":
            proto_merge(hcm, value.get("typed_config") or {})
        else:
            fail("generated Istio objects", f"unexpected patch {p.get('applyTo')} {op}")
    hcm["http_filters"] = [rbac] + before + [ext_authz, {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]

    def cluster(name, port, h2):
        c = {"name": name, "type": "STATIC", "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    return {"static_resources": {
        "listeners": [{"name": "virtualInbound",
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [cluster("inbound|8080||", 8080, False), cluster(provider_cluster, 9001, True)]}}


istio_generated = "not generated (no valet-policy)"
where = "valet envoy-config --format istio (k8s/valet-configmap.yaml)"
if "valet-policy" in policy_files:
    code, out = run([VALET, "envoy-config", "--format", "istio", "--config", policy_files["valet-policy"]])
    docs = []
    if code != 0:
        fail(where, f"failed:\n{out}")
    else:
        try:
            docs = [d for d in yaml.safe_load_all(out) if d]
        except yaml.YAMLError as e:
            fail(where, f"does not parse: {e}")
    kinds = [d.get("kind") for d in docs if isinstance(d, dict)]
    if code == 0 and kinds != ["AuthorizationPolicy", "EnvoyFilter"]:
        fail(where, f"expected an AuthorizationPolicy and an EnvoyFilter, got {kinds}")
    elif code == 0:
        ap, ef = docs
        for d in docs:
            check_istio_fields(where, d)
        spec = ap.get("spec") or {}
        if spec.get("action") != "CUSTOM" or not spec.get("rules"):
            fail(where, f"{kn(ap)}: want action CUSTOM with a rule")
        name = (spec.get("provider") or {}).get("name")
        provider = (providers.get(name) or {}).get("envoyExtAuthzGrpc")
        if provider is None:
            fail(where, f"{kn(ap)} uses provider {name!r}, not an envoyExtAuthzGrpc provider of mesh-config.yaml")
        # The meshConfig snippet in the header comment, uncommented.
        lines = out.splitlines()
        start = next((i for i, l in enumerate(lines) if l.strip("# ") == "meshConfig:"), None)
        snippet = []
        for l in lines[start:] if start is not None else []:
            if l.strip() == "#":
                break
            snippet.append(l[1:])
        try:
            mesh = yaml.safe_load("\n".join(snippet)) or {}
            entry = ((mesh.get("meshConfig") or {}).get("extensionProviders") or [{}])[0]
        except (yaml.YAMLError, AttributeError, IndexError) as e:
            fail(where, f"the meshConfig comment does not parse: {e}")
            entry = {}
        if entry.get("name") != name:
            fail(where, f"the meshConfig comment registers {entry.get('name')!r}, the policy uses {name!r}")
        if provider is not None:
            for k in ("service", "port", "timeout", "failOpen"):
                if (entry.get("envoyExtAuthzGrpc") or {}).get(k) != provider.get(k):
                    fail(where, f"meshConfig comment: {k} {(entry.get('envoyExtAuthzGrpc') or {}).get(k)!r} "
                                f"but mesh-config.yaml has {provider.get(k)!r}")
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        if ((ef.get("spec") or {}).get("workloadSelector") or {}).get("labels") != labels:
            fail(where, "the EnvoyFilter and the AuthorizationPolicy select different pods")
        pods = [d for rel, d in by_kind("Deployment") if rel.startswith("k8s/istio/")
                and labels and all(((d["spec"]["template"].get("metadata") or {}).get("labels") or {}).get(k) == v
                                   for k, v in labels.items())]
        if not any(c.get("name") == "valet" for d in pods for c in d["spec"]["template"]["spec"].get("containers") or []):
            fail(where, f"selector {labels} selects no pod under k8s/istio/ with a valet container")
        skipped = [p for r in spec.get("rules") or [] for t in (r or {}).get("to") or []
                   for p in ((t or {}).get("operation") or {}).get("notPaths") or []]
        for p in skipped:
            if not p.startswith("/") or ("*" in p and not p.endswith("/*")) or p.count("*") > 1:
                fail(where, f"skipped path {p!r} is neither exact nor /p/*")
        cluster = f"outbound|{(provider or {}).get('port', 9001)}||{(provider or {}).get('service', 'valet.local')}"
        path = os.path.join(tmp.name, "istio-inbound.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(istio_inbound(ap, ef, cluster), fh)
        code, vout = run([ENVOY, "--mode", "validate", "-c", path, "--log-level", "warn"])
        if code != 0:
            fail(where, f"the EnvoyFilter's patches on an Istio-shaped inbound chain: envoy --mode validate failed:\n{vout}")
        istio_generated = f"generated Istio objects OK ({len(skipped)} path(s) skip the Check)"

# ------------------------------------------------------------ (f) Dockerfile
df_path = os.path.join(REPO, "Dockerfile")
try:
    cmds = dockerfile.parse_file(df_path)
except (OSError, dockerfile.GoParseError) as e:
    fail("Dockerfile", f"does not parse: {e}")
    cmds = []
if cmds:
    froms = [c for c in cmds if c.cmd == "FROM"]
    if len(froms) < 2:
        fail("Dockerfile", "expected a multi-stage build (builder + runtime)")
    elif not froms[0].value[0].startswith("rust:") or "bookworm" not in froms[0].value[0]:
        fail("Dockerfile", f"builder image {froms[0].value[0]}: expected rust:1-bookworm (same glibc as the runtime)")
    last = cmds[cmds.index(froms[-1]):] if froms else cmds
    users = [c for c in last if c.cmd == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1].value[0]):
        fail("Dockerfile", "the runtime stage needs a numeric non-root USER (runAsNonRoot can only verify a uid)")
    ep = [c for c in last if c.cmd == "ENTRYPOINT"]
    if not ep or not ep[-1].json or ep[-1].value[0] != "/valet":
        fail("Dockerfile", 'ENTRYPOINT must be ["/valet"] (exec form, so Valet gets SIGTERM)')
    if not any(c.cmd == "RUN" and "--locked" in c.value[0] and "--release" in c.value[0] for c in cmds):
        fail("Dockerfile", "no `cargo build --release --locked` step")
    if any(c.cmd == "EXPOSE" for c in cmds):
        fail("Dockerfile", "EXPOSE: Valet is a localhost sidecar; document ports instead")
if not os.path.exists(os.path.join(REPO, ".dockerignore")):
    fail(".dockerignore", "missing")
else:
    with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as fh:
        ignored = {l.strip().rstrip("/") for l in fh if l.strip() and not l.startswith("#")}
    for must in ("target", ".tools", ".git"):
        if must not in ignored:
            fail(".dockerignore", f"does not leave out {must}/")


# ------------------------------------------------------------ (g) kustomize
kustomize = "skipped (no kubectl)"
if KUBECTL and os.path.exists(os.path.join(K8S, "kustomization.yaml")):
    code, out = run([KUBECTL, "kustomize", K8S])
    if code != 0:
        fail("k8s/kustomization.yaml", f"kubectl kustomize failed:\n{out}")
    else:
        built = [d for d in yaml.safe_load_all(out) if d]
        kustomize = f"kustomize builds {len(built)} objects"

if problems:
    for p in problems:
        print(f"check-deploy: {p}", file=sys.stderr)
    print(f"check-deploy: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
print(f"deploy: {len(files)} YAML files, {len(objects)} objects OK "
      f"({n_schema} schema-valid for Kubernetes {' and '.join(v.rsplit('.', 1)[0] for v in VERSIONS)}, "
      f"{n_custom} custom resources parsed), {n_envoy} Envoy bootstrap valid (envoy {envoy_version}), "
      f"{len(policies)} Valet policies valid, {n_pods} pod templates cross-checked, {istio_generated}, "
      f"Dockerfile OK, {kustomize}")
PYTHON
