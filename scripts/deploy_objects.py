"""The files under k8s/: every YAML document parsed (each Kubernetes object with
apiVersion, kind and metadata.name, no duplicates), every JSON file parsed, and
built-in objects validated against the real OpenAPI schemas, strictly (unknown
fields are errors). The schemas come bundled in the PyPI package
`kubernetes-validate`: no cluster and no network. Custom resources (Prometheus
Operator, Istio) have no schema there: they are parsed only. scripts/lib/venv.sh
unpacks the schemas of the versions validated only (K8S_VERSIONS): a version
without its own would silently get an older one's, so that is an error here."""

import json
import os

import kubernetes_validate
import kubernetes_validate.utils
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from deploy_common import CRD_GROUPS, NOT_OBJECTS, fail, group_of, kn


def load(repo):
    """(YAML files, objects as (relative path, index, document))."""
    K8S = os.path.join(repo, "k8s")
    REPO = repo
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
            if (
                not isinstance(meta, dict)
                or not isinstance(meta.get("name"), str)
                or not meta["name"]
            ):
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

    return files, objects


def check_schemas(objects, versions):
    """Returns (objects valid for every version, custom resources skipped)."""
    have = set(kubernetes_validate.utils.all_versions())
    VERSIONS = []
    for version in versions:
        if version in have:
            VERSIONS.append(version)
        else:
            fail(
                "kubernetes-validate",
                f"no schemas for Kubernetes {version} here (it has {' '.join(sorted(have))}): "
                "scripts/lib/venv.sh unpacks those of K8S_VERSIONS",
            )
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
                fail(
                    rel,
                    f"{kn(doc)}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version} "
                    "(a typo, or a custom resource whose group is not in CRD_GROUPS)",
                )
                ok = False
                break
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top)"
                fail(rel, f"{kn(doc)} against Kubernetes {version}: {path}: {e.message}")
                ok = False
        n_schema += ok
    return n_schema, n_custom
