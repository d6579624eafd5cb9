"""Validate the deployment files offline: k8s/**/*.yaml and the Dockerfile.

  (a) every YAML file under k8s/ parses, every object has apiVersion, kind and
      metadata.name (deploy_objects.py);
  (b) built-in objects validate strictly against the Kubernetes schemas of the
      oldest and newest versions supported (deploy_objects.py);
  (c) every Envoy bootstrap in a ConfigMap passes `envoy --mode validate`, and
  (d) every Valet policy passes `valet check-config`, warnings included
      (deploy_embedded.py);
  (e) cross-checks a schema cannot see: ports, mounts, probes, shutdown timing,
      security contexts, PodMonitor, Istio providers (deploy_pods.py);
  (f) the Dockerfile's shape (deploy_docker.py);
  (g) `kubectl kustomize k8s/` builds, when kubectl is on PATH;
  (h) Istio objects, kept and generated (deploy_istio.py).

The external tools run in parallel, and the schemas are validated meanwhile.

Usage: check_deploy.py REPO ENVOY VALET KUBECTL|"" "K8S_VERSION..."
Exits non-zero with a line per problem; the last line of stdout is a summary.
"""

import os
import sys
import tempfile

import yaml

import deploy_docker
import deploy_embedded
import deploy_istio
import deploy_objects
import deploy_pods
from deploy_common import Runner, fail, problems


def main():
    repo, envoy, valet, kubectl, versions = sys.argv[1:6]
    versions = versions.split()
    k8s = os.path.join(repo, "k8s")
    files, objects = deploy_objects.load(repo)
    runner = Runner()
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        # Start every external tool first; they run while Python checks schemas.
        envoy_files, policy_files = deploy_embedded.prepare(objects, tmp, runner, envoy, valet)
        deploy_istio.start_generated(policy_files, runner, valet)
        kustomize_cmd = None
        if kubectl and os.path.exists(os.path.join(k8s, "kustomization.yaml")):
            kustomize_cmd = [kubectl, "kustomize", k8s]
            runner.start(kustomize_cmd)

        # Python's own slow part, in a thread: the rest mostly waits for the tools.
        schemas = runner.pool.submit(deploy_objects.check_schemas, objects, versions)
        # The generated Istio objects first: their Envoy run starts only after.
        providers = deploy_pods.mesh_providers(objects)
        deploy_istio.check_fields(objects)
        istio_generated = deploy_istio.check_generated(
            objects, providers, policy_files, runner, valet, envoy, tmp
        )
        n_envoy, envoy_boot, envoy_version = deploy_embedded.check_envoy(
            objects, envoy_files, runner, envoy
        )
        policies = deploy_embedded.check_policies(objects, policy_files, runner, valet, repo)
        n_pods, providers = deploy_pods.check(objects, policies, envoy_boot)
        deploy_docker.check(repo)
        istio_generated = istio_generated()
        n_schema, n_custom = schemas.result()

        kustomize = "skipped (no kubectl)"
        if kustomize_cmd:
            code, out = runner.result(kustomize_cmd)
            if code != 0:
                fail("k8s/kustomization.yaml", f"kubectl kustomize failed:\n{out}")
            else:
                built = [d for d in yaml.safe_load_all(out) if d]
                kustomize = f"kustomize builds {len(built)} objects"
        runner.close()

    if problems:
        for p in problems:
            print(f"check-deploy: {p}", file=sys.stderr)
        print(f"check-deploy: {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    k8s_versions = " and ".join(v.rsplit(".", 1)[0] for v in versions)
    print(
        f"deploy: {len(files)} YAML files, {len(objects)} objects OK "
        f"({n_schema} schema-valid for Kubernetes {k8s_versions}, "
        f"{n_custom} custom resources parsed), {n_envoy} Envoy bootstrap valid "
        f"(envoy {envoy_version}), {len(policies)} Valet policies valid, "
        f"{n_pods} pod templates cross-checked, {istio_generated}, Dockerfile OK, {kustomize}"
    )


main()
