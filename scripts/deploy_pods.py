"""Cross-checks a schema cannot see: ConfigMaps and ports that the Deployments
name exist; the policy is mounted as a directory (no subPath) and the JWKS
cache_dir is a writable volume; Envoy's `valet` cluster, Valet's listen
addresses, the probes and the Service agree on ports; shutdown fits the grace
period; every container is non-root, read-only, without privilege escalation or
capabilities, with a RuntimeDefault seccomp profile; the PodMonitor selects the
pods and port; the Istio mesh config's providers, ServiceEntry and
AuthorizationPolicies agree."""

import os

from deploy_common import by_kind, fail, kn, named_port, port_of, seconds


def mesh_providers(objects):
    """{name: extension provider} of the IstioOperators' meshConfig."""
    providers = {}
    for rel, op in by_kind(objects, "IstioOperator"):
        for p in ((op.get("spec") or {}).get("meshConfig") or {}).get("extensionProviders") or []:
            providers[p.get("name")] = p
    return providers


def check(objects, policies, envoy_boot):
    """Returns (pod templates checked, {mesh provider name: provider})."""
    configmaps_anywhere = {d["metadata"]["name"] for _, d in by_kind(objects, "ConfigMap")}
    n_pods = 0
    for rel, dep in by_kind(objects, "Deployment"):
        where = f"{rel} {kn(dep)}"
        spec = (dep.get("spec") or {}).get("template", {}).get("spec") or {}
        labels = ((dep.get("spec") or {}).get("template", {}).get("metadata") or {}).get(
            "labels"
        ) or {}
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
                "capabilities.drop [ALL]": "ALL"
                in ((sc.get("capabilities") or {}).get("drop") or []),
                "seccompProfile RuntimeDefault": (
                    sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
                ).get("type")
                == "RuntimeDefault",
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
                        fail(
                            cw,
                            f"{probe}.{how}.port {pr[how].get('port')!r} is not a port of the container",
                        )

            if c.get("name") != "valet":
                continue
            # Valet: policy mounted as a directory, cache writable, ports agree.
            args = c.get("args") or []
            cfg = (
                args[args.index("--config") + 1]
                if "--config" in args[:-1]
                else "/etc/valet/valet.yaml"
            )
            cfg_dir = os.path.dirname(cfg)
            mount = next(
                (vm for vm in c.get("volumeMounts") or [] if vm.get("mountPath") == cfg_dir), None
            )
            if mount is None:
                fail(cw, f"nothing is mounted at {cfg_dir} (the directory of --config {cfg})")
                continue
            if mount.get("subPath") or mount.get("subPathExpr"):
                fail(
                    cw, f"{cfg_dir} is mounted with subPath: Valet would never see a policy update"
                )
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
                fail(
                    cw,
                    f"policy {cm_name} listen.admin {listen.get('admin')}: probes reach the pod IP, not loopback",
                )
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
                vm = next(
                    (vm for vm in c.get("volumeMounts") or [] if vm.get("mountPath") == cache), None
                )
                if (
                    vm is None
                    or vm.get("readOnly")
                    or "emptyDir" not in volumes.get(vm["name"], {})
                ):
                    fail(
                        cw,
                        f"provider {p.get('name')}: jwks.cache_dir {cache} must be a writable emptyDir mount "
                        "(the root filesystem is read-only)",
                    )
            env = {e.get("name"): e.get("value") for e in c.get("env") or []}
            if env.get("VALET_WORKERS") is None:
                fail(cw, "VALET_WORKERS is not set")
            # After SIGTERM Valet drains, then waits for in-flight Checks: all of it (and
            # any preStop sleep before the SIGTERM) must fit in the grace period.
            drain = seconds(env.get("VALET_DRAIN", "5s"), cw, "VALET_DRAIN")
            grace = seconds(env.get("VALET_SHUTDOWN_GRACE", "10s"), cw, "VALET_SHUTDOWN_GRACE")
            pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get(
                "seconds", 0
            )
            period = spec.get("terminationGracePeriodSeconds", 30)
            if None not in (drain, grace) and pre + drain + grace > period:
                fail(
                    cw,
                    f"preStop {pre}s + drain {drain:g}s + grace {grace:g}s exceed "
                    f"terminationGracePeriodSeconds {period}: Valet would be killed mid-drain",
                )
            for other in containers:
                if other is c:
                    continue
                osleep = (
                    ((other.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
                ).get("seconds", 0)
                if other.get("name") == "envoy" and drain is not None and pre + drain <= osleep:
                    fail(
                        cw,
                        f"stops answering ({pre + drain:g}s after the pod's termination starts) before "
                        f"Envoy stops sending ({osleep}s): Checks would fail",
                    )
            ports = {p.get("containerPort") for p in c.get("ports") or []}
            if grpc_host in ("127.0.0.1", "localhost", "[::1]"):
                if grpc_port in ports:
                    fail(cw, f"lists the loopback-only Check port {grpc_port} as a container port")
                # The pod's Envoy must reach it there.
                envoy = next((x for x in containers if x.get("name") == "envoy"), None)
                if envoy is not None and envoy_boot is not None:
                    clusters = {
                        cl.get("name"): cl
                        for cl in (envoy_boot.get("static_resources") or {}).get("clusters") or []
                    }
                    addrs = [
                        ep["endpoint"]["address"]["socket_address"]
                        for lb in ((clusters.get("valet") or {}).get("load_assignment") or {}).get(
                            "endpoints"
                        )
                        or []
                        for ep in lb.get("lb_endpoints") or []
                    ]
                    if not addrs or any(
                        (a.get("address"), a.get("port_value")) != (grpc_host, grpc_port)
                        for a in addrs
                    ):
                        fail(
                            where,
                            f"Envoy's cluster valet points at {addrs}, Valet listens on {listen.get('grpc')}",
                        )

        envoy = next((x for x in containers if x.get("name") == "envoy"), None)
        if envoy is not None and envoy_boot is not None:
            listeners = (envoy_boot.get("static_resources") or {}).get("listeners") or []
            lports = {l["address"]["socket_address"].get("port_value") for l in listeners}
            for p in envoy.get("ports") or []:
                if p.get("containerPort") not in lports:
                    fail(
                        where,
                        f"envoy container port {p.get('containerPort')} is no listener of the bootstrap {sorted(lports)}",
                    )
            admin = ((envoy_boot.get("admin") or {}).get("address") or {}).get(
                "socket_address"
            ) or {}
            if admin.get("address") not in ("127.0.0.1", "::1"):
                fail("k8s/envoy-configmap.yaml", "Envoy's admin must listen on loopback")

        # Services selecting this pod must target one of its ports.
        for srel, svc in by_kind(objects, "Service"):
            if os.path.dirname(srel) != os.path.dirname(rel):
                continue
            sel = (svc.get("spec") or {}).get("selector") or {}
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                continue
            for sp in (svc.get("spec") or {}).get("ports") or []:
                tp = sp.get("targetPort", sp.get("port"))
                if not any(named_port(c, tp) for c in containers):
                    fail(
                        srel,
                        f"{kn(svc)} port {sp.get('name')}: targetPort {tp!r} is no port of {kn(dep)}",
                    )

        # PodMonitors in the same directory that select this pod.
        for mrel, pm in by_kind(objects, "PodMonitor"):
            sel = ((pm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if os.path.dirname(mrel) != os.path.dirname(rel) or any(
                labels.get(k) != v for k, v in sel.items()
            ):
                continue
            for ep in (pm.get("spec") or {}).get("podMetricsEndpoints") or []:
                if not any(named_port(c, ep.get("port")) for c in containers):
                    fail(
                        mrel,
                        f"{kn(pm)} scrapes port {ep.get('port')!r}, which {kn(dep)} does not have",
                    )

    for mrel, pm in by_kind(objects, "PodMonitor"):
        sel = ((pm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        hits = [
            d
            for rel, d in by_kind(objects, "Deployment")
            if os.path.dirname(rel) == os.path.dirname(mrel)
            and sel
            and all(
                (((d.get("spec") or {}).get("template") or {}).get("metadata") or {})
                .get("labels", {})
                .get(k)
                == v
                for k, v in sel.items()
            )
        ]
        if not hits:
            fail(mrel, f"{kn(pm)} selects no pod of a Deployment beside it")

    # Istio: providers named by policies exist in the mesh config; local provider -> ServiceEntry.
    providers = mesh_providers(objects)
    for rel, ap in by_kind(objects, "AuthorizationPolicy"):
        spec = ap.get("spec") or {}
        if spec.get("action") == "CUSTOM":
            name = (spec.get("provider") or {}).get("name")
            if name not in providers:
                fail(
                    rel,
                    f"{kn(ap)} uses provider {name!r}, not defined in the IstioOperator's extensionProviders",
                )
            if not spec.get("rules"):
                fail(rel, f"{kn(ap)}: a CUSTOM policy without rules never matches")
    service_entries = {
        h: se
        for _, se in by_kind(objects, "ServiceEntry")
        for h in (se.get("spec") or {}).get("hosts") or []
    }
    services = {d["metadata"]["name"]: d for _, d in by_kind(objects, "Service")}
    for name, p in providers.items():
        grpc = p.get("envoyExtAuthzGrpc")
        if grpc is None:
            continue
        unknown = set(grpc) - {
            "service",
            "port",
            "timeout",
            "failOpen",
            "statusOnError",
            "includeRequestBodyInCheck",
            "clearRouteCache",
        }
        if unknown:
            fail(
                "k8s/istio/mesh-config.yaml",
                f"provider {name}: envoyExtAuthzGrpc has no field(s) {sorted(unknown)}",
            )
        host, port = grpc.get("service"), grpc.get("port")
        if grpc.get("failOpen") is not False:
            fail(
                "k8s/istio/mesh-config.yaml", f"provider {name}: set failOpen: false (fail closed)"
            )
        if host in service_entries:
            se = service_entries[host]
            if port not in [pp.get("number") for pp in se["spec"].get("ports") or []]:
                fail(
                    "k8s/istio/mesh-config.yaml",
                    f"provider {name}: port {port} is not a port of ServiceEntry {host}",
                )
            local = [e.get("address") for e in se["spec"].get("endpoints") or []]
            grpc_port = port_of((policies.get("valet-policy") or {}).get("listen", {}).get("grpc"))[
                1
            ]
            if local == ["127.0.0.1"] and port != grpc_port:
                fail(
                    "k8s/istio/mesh-config.yaml",
                    f"provider {name}: port {port} but valet-policy listens on {grpc_port}",
                )
        elif host and host.split(".")[0] in services:
            svc = services[host.split(".")[0]]
            if port not in [pp.get("port") for pp in svc["spec"].get("ports") or []]:
                fail(
                    "k8s/istio/mesh-config.yaml",
                    f"provider {name}: port {port} is not a port of Service {kn(svc)}",
                )
        else:
            fail(
                "k8s/istio/mesh-config.yaml",
                f"provider {name}: {host} is neither a ServiceEntry host nor a Service under k8s/",
            )

    return n_pods, providers
