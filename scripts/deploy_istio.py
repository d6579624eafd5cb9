"""Istio objects: every AuthorizationPolicy and EnvoyFilter under k8s/ uses only
fields and enum values Istio's API has (istio/api security/v1beta1 and
networking/v1alpha3: no CRD schema is bundled, and the API server refuses
unknown fields); and `valet envoy-config --format istio` for the valet-policy
ConfigMap (generated, not kept under k8s/) passes the same checks, names a
provider of mesh-config.yaml with the same service, port, timeout and failOpen as
its meshConfig comment, selects the pods of a Deployment under k8s/istio/ that
runs Valet, skips the Check only on exact paths or `/p/*`, and its EnvoyFilter
patches, applied to an inbound chain shaped like Istio's (RBAC shadow rule,
ext_authz as pilot writes it for envoyExtAuthzGrpc), pass `envoy --mode validate`."""

import json
import os

import yaml

from deploy_common import by_kind, fail, kn

# ------------------------------------------------------- (h) Istio objects
# Field names (as in YAML) and enum values from istio/api:
# security/v1beta1/authorization_policy.proto, networking/v1alpha3/envoy_filter.proto.
ISTIO_FIELDS = {
    "AuthorizationPolicy": {"selector", "targetRef", "targetRefs", "rules", "action", "provider"},
    "selector": {"matchLabels"},
    "provider": {"name"},
    "rules": {"from", "to", "when"},
    "from": {"source"},
    "source": {
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "trustDomains",
        "notTrustDomains",
    },
    "to": {"operation"},
    "operation": {
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    },
    "when": {"key", "values", "notValues"},
    "EnvoyFilter": {"workloadSelector", "targetRefs", "configPatches", "priority"},
    "workloadSelector": {"labels"},
    "configPatches": {"applyTo", "match", "patch"},
    "match": {"context", "proxy", "listener", "routeConfiguration", "cluster", "waypoint"},
    "listener": {"portNumber", "portName", "filterChain", "listenerFilter", "name"},
    "filterChain": {
        "name",
        "sni",
        "transportProtocol",
        "applicationProtocols",
        "filter",
        "destinationPort",
    },
    "filter": {"name", "subFilter"},
    "subFilter": {"name"},
    "patch": {"operation", "value", "filterClass"},
}
ISTIO_ENUMS = {
    ("AuthorizationPolicy", "action"): {"ALLOW", "DENY", "AUDIT", "CUSTOM"},
    ("configPatches", "applyTo"): {
        "LISTENER",
        "FILTER_CHAIN",
        "NETWORK_FILTER",
        "HTTP_FILTER",
        "ROUTE_CONFIGURATION",
        "VIRTUAL_HOST",
        "HTTP_ROUTE",
        "CLUSTER",
        "EXTENSION_CONFIG",
        "BOOTSTRAP",
        "LISTENER_FILTER",
    },
    ("match", "context"): {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY", "WAYPOINT"},
    ("patch", "operation"): {
        "MERGE",
        "ADD",
        "REMOVE",
        "INSERT_BEFORE",
        "INSERT_AFTER",
        "INSERT_FIRST",
        "REPLACE",
        "MERGE_AND_REPLACE_LIST",
    },
}
# Below these, the content is free (labels) or Envoy's own (patch values).
ISTIO_OPAQUE = {
    "matchLabels",
    "labels",
    "value",
    "targetRef",
    "targetRefs",
    "proxy",
    "routeConfiguration",
    "cluster",
    "waypoint",
}


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


def check_fields(objects):
    for rel, d in by_kind(objects, "AuthorizationPolicy") + by_kind(objects, "EnvoyFilter"):
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
        matchers = [
            {"url_path": {"path": {"prefix": p[:-1]} if p.endswith("*") else {"exact": p}}}
            for p in not_paths
        ]
        perms.append({"not_rule": {"or_rules": {"rules": matchers}}} if matchers else {"any": True})
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {
                "action": "DENY",
                "policies": {
                    "istio-ext-authz-0": {
                        "permissions": [{"or_rules": {"rules": perms}}],
                        "principals": [{"any": True}],
                    }
                },
            },
            "shadow_rules_stat_prefix": "istio_ext_authz_",
        },
    }
    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": provider_cluster}, "timeout": "600s"},
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "filter_enabled_metadata": {
                "filter": "envoy.filters.http.rbac",
                "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
                "value": {"string_match": {"prefix": "istio-ext-authz"}},
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "inbound",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}],
                }
            ]
        },
    }
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
    hcm["http_filters"] = (
        [rbac]
        + before
        + [
            ext_authz,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ]
    )

    def cluster(name, port, h2):
        c = {
            "name": name,
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return c

    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "virtualInbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("inbound|8080||", 8080, False),
                cluster(provider_cluster, 9001, True),
            ],
        }
    }


def start_generated(policy_files, runner, VALET):
    if "valet-policy" in policy_files:
        runner.start(generate_cmd(VALET, policy_files))


def generate_cmd(VALET, policy_files):
    return [VALET, "envoy-config", "--format", "istio", "--config", policy_files["valet-policy"]]


def check_generated(objects, providers, policy_files, runner, VALET, ENVOY, tmp):
    """Checks what `valet envoy-config --format istio` generates and starts Envoy
    on it; returns a function that waits for Envoy and returns a summary line."""
    istio_generated = "not generated (no valet-policy)"
    where = "valet envoy-config --format istio (k8s/valet-configmap.yaml)"
    if "valet-policy" in policy_files:
        code, out = runner.result(generate_cmd(VALET, policy_files))
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
                fail(
                    where,
                    f"{kn(ap)} uses provider {name!r}, not an envoyExtAuthzGrpc provider of mesh-config.yaml",
                )
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
                fail(
                    where,
                    f"the meshConfig comment registers {entry.get('name')!r}, the policy uses {name!r}",
                )
            if provider is not None:
                for k in ("service", "port", "timeout", "failOpen"):
                    if (entry.get("envoyExtAuthzGrpc") or {}).get(k) != provider.get(k):
                        fail(
                            where,
                            f"meshConfig comment: {k} {(entry.get('envoyExtAuthzGrpc') or {}).get(k)!r} "
                            f"but mesh-config.yaml has {provider.get(k)!r}",
                        )
            labels = (spec.get("selector") or {}).get("matchLabels") or {}
            if ((ef.get("spec") or {}).get("workloadSelector") or {}).get("labels") != labels:
                fail(where, "the EnvoyFilter and the AuthorizationPolicy select different pods")
            pods = [
                d
                for rel, d in by_kind(objects, "Deployment")
                if rel.startswith("k8s/istio/")
                and labels
                and all(
                    ((d["spec"]["template"].get("metadata") or {}).get("labels") or {}).get(k) == v
                    for k, v in labels.items()
                )
            ]
            if not any(
                c.get("name") == "valet"
                for d in pods
                for c in d["spec"]["template"]["spec"].get("containers") or []
            ):
                fail(
                    where,
                    f"selector {labels} selects no pod under k8s/istio/ with a valet container",
                )
            skipped = [
                p
                for r in spec.get("rules") or []
                for t in (r or {}).get("to") or []
                for p in ((t or {}).get("operation") or {}).get("notPaths") or []
            ]
            for p in skipped:
                if not p.startswith("/") or ("*" in p and not p.endswith("/*")) or p.count("*") > 1:
                    fail(where, f"skipped path {p!r} is neither exact nor /p/*")
            cluster = f"outbound|{(provider or {}).get('port', 9001)}||{(provider or {}).get('service', 'valet.local')}"
            path = os.path.join(tmp, "istio-inbound.json")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(istio_inbound(ap, ef, cluster), fh)
            # Started here, read by finish_generated: it runs while the rest is checked.
            runner.start(validate_cmd(ENVOY, path))
            istio_generated = f"generated Istio objects OK ({len(skipped)} path(s) skip the Check)"
            return lambda: finish_generated(runner, ENVOY, path, where, istio_generated)
    return lambda: istio_generated


def validate_cmd(envoy, path):
    return [envoy, "--mode", "validate", "-c", path, "--log-level", "warn"]


def finish_generated(runner, envoy, path, where, summary):
    code, vout = runner.result(validate_cmd(envoy, path))
    if code != 0:
        fail(
            where,
            "the EnvoyFilter's patches on an Istio-shaped inbound chain: "
            f"envoy --mode validate failed:\n{vout}",
        )
    return summary
