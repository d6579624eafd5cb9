"""The configs embedded in ConfigMaps: every Envoy bootstrap (key envoy.yaml)
passes `envoy --mode validate`, and each gRPC service names a defined HTTP/2
cluster; every Valet policy (key valet.yaml) passes `valet check-config`,
warnings included, with its errors placed in the file that holds it."""

import json
import os
import re

import yaml

from deploy_common import by_kind, fail, kn


def prepare(objects, tmp, runner, envoy, valet):
    """Writes the embedded configs out and starts their validation at once.
    Returns ({ConfigMap name: envoy.yaml path}, {ConfigMap name: valet.yaml path})."""
    envoy_files, policy_files = {}, {}
    for _, cm in by_kind(objects, "ConfigMap"):
        data = cm.get("data") or {}
        name = cm["metadata"]["name"]
        if "envoy.yaml" in data:
            path = os.path.join(tmp, f"envoy-{name}.yaml")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(data["envoy.yaml"])
            envoy_files[name] = path
            runner.start(envoy_validate(envoy, path))
        if "valet.yaml" in data:
            d = os.path.join(tmp, "valet-" + name)
            os.makedirs(d)
            # Every key, as the volume mounts them: the policy may name its siblings
            # (a denylist, a JWKS file) by relative path.
            for key, value in data.items():
                if "/" not in key and not key.startswith("."):
                    with open(os.path.join(d, key), "w", encoding="utf-8") as fh:
                        fh.write(value)
            path = os.path.join(d, "valet.yaml")
            policy_files[name] = path
            runner.start([valet, "check-config", "--config", path])
    runner.start([envoy, "--version"])
    return envoy_files, policy_files


def envoy_validate(envoy, path):
    return [envoy, "--mode", "validate", "-c", path, "--log-level", "warn"]


def check_envoy(objects, envoy_files, runner, ENVOY):
    """Returns (bootstraps validated, the bootstrap of k8s/envoy-configmap.yaml,
    Envoy's version)."""
    envoy_version = "?"
    n_envoy = 0
    envoy_boot = None
    for rel, cm in by_kind(objects, "ConfigMap"):
        data = cm.get("data") or {}
        if "envoy.yaml" not in data:
            continue
        path = envoy_files[cm["metadata"]["name"]]
        code, out = runner.result(envoy_validate(ENVOY, path))
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
        clusters = {
            cl.get("name"): cl
            for cl in ((boot or {}).get("static_resources") or {}).get("clusters") or []
        }

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
                fail(
                    rel,
                    f"{kn(cm)} envoy.yaml: envoy_grpc names cluster {name!r}, which is not defined",
                )
            elif "http2_protocol_options" not in json.dumps(cl):
                fail(
                    rel,
                    f"{kn(cm)} envoy.yaml: cluster {name!r} serves gRPC but does not speak HTTP/2 "
                    "(http2_protocol_options)",
                )
    if not any(rel == "k8s/envoy-configmap.yaml" for rel, _ in by_kind(objects, "ConfigMap")):
        fail("k8s/envoy-configmap.yaml", "missing (or has no ConfigMap)")
    elif envoy_boot is None:
        fail("k8s/envoy-configmap.yaml", "no envoy.yaml key in its ConfigMap")
    code, out = runner.result([ENVOY, "--version"])
    m = re.search(r"/(\d+\.\d+\.\d+)/", out or "")
    if m:
        envoy_version = m.group(1)
    return n_envoy, envoy_boot, envoy_version


def block_origin(REPO, rel, cm_name, key):
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
            if (
                getattr(top.get("kind"), "value", None) != "ConfigMap"
                or getattr(meta.get("name"), "value", None) != cm_name
            ):
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


def relocate(REPO, out, path, rel, cm_name, key):
    """Rewrite `path:L:C:` positions of an extracted block into positions in rel."""
    origin = block_origin(REPO, rel, cm_name, key)

    def repl(m):
        if origin is None:
            return f"{rel} [{cm_name}].data.{key}:{m.group(1)}:{m.group(2)}:"
        return f"{rel}:{origin[0] + int(m.group(1)) - 1}:{origin[1] + int(m.group(2))}:"

    out = re.sub(re.escape(path) + r":(\d+):(\d+):", repl, out)
    return out.replace(path, f"{rel} [{cm_name}].data.{key}")


def check_policies(objects, policy_files, runner, VALET, REPO):
    """Returns {ConfigMap name: parsed policy}."""
    policies = {}
    for rel, cm in by_kind(objects, "ConfigMap"):
        data = cm.get("data") or {}
        if "valet.yaml" not in data:
            continue
        path = policy_files[cm["metadata"]["name"]]
        code, out = runner.result([VALET, "check-config", "--config", path])
        out = relocate(REPO, out or "", path, rel, cm["metadata"]["name"], "valet.yaml")
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

    return policies
