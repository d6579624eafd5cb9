"""What the deploy checks share: the problem list, the loaded objects, external
tools run in parallel, and small readers of ports and durations."""

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

# API groups whose kinds are custom resources: no schema bundled, parsed only.
CRD_GROUPS = {
    "monitoring.coreos.com",
    "security.istio.io",
    "networking.istio.io",
    "install.istio.io",
}
# Files that are YAML but not Kubernetes objects.
NOT_OBJECTS = {("kustomize.config.k8s.io", "Kustomization")}

problems = []


def fail(where, msg):
    problems.append(f"{where}: {msg}")


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def kn(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


def by_kind(objects, kind, api_prefix=None):
    """(relative path, object) of every object of this kind."""
    return [
        (rel, d)
        for rel, _, d in objects
        if d["kind"] == kind and (api_prefix is None or d["apiVersion"].startswith(api_prefix))
    ]


def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    return p.returncode, (p.stdout + p.stderr).strip()


class Runner:
    """External tools (envoy, valet, kubectl), started as soon as their input is
    known and run in parallel while Python checks the rest; `result` waits."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.jobs = {}

    def start(self, cmd):
        key = tuple(cmd)
        if key not in self.jobs:
            self.jobs[key] = self.pool.submit(run, cmd)

    def result(self, cmd):
        self.start(cmd)
        return self.jobs[tuple(cmd)].result()

    def close(self):
        self.pool.shutdown(wait=True)


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
