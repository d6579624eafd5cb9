# syntax=docker/dockerfile:1
#
# Valet: Envoy ext_authz sidecar (gRPC envoy.service.auth.v3.Authorization/Check).
#
#   docker build -t ghcr.io/example/valet:0.1.0 .
#
# Ports (nothing is EXPOSEd: Valet is a sidecar; k8s/ sets the addresses in its policy):
#   9001  gRPC ext_authz + grpc.health.v1   (listen.grpc, keep it on 127.0.0.1)
#   9090  HTTP /metrics /healthz /readyz    (listen.admin)
# Configuration: /etc/valet/valet.yaml (mount the ConfigMap as a directory, never with
# subPath, so that policy edits are hot-reloaded). JWKS cache: a writable directory
# named by jwks.cache_dir (an emptyDir in k8s/deployment.yaml).
# Environment: VALET_WORKERS (default 1), VALET_LOG_FORMAT=json, VALET_LOG=info.
# Valet stops on SIGTERM (the default stop signal), finishing in-flight Checks.

# ---- build ----------------------------------------------------------------
# Debian 12 (bookworm), so the binary links against the same glibc as the runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole context less .dockerignore: Cargo parses every target the manifest
# declares ([[bench]], [[example]], ...), so copying only src/ would break as soon as
# one is added.
COPY . .
# BuildKit caches keep crates and incremental artifacts between builds; the binary is
# copied out of the cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin valet \
    && install -m 0755 target/release/valet /usr/local/bin/valet

# ---- runtime --------------------------------------------------------------
# distroless/cc: glibc, libgcc, CA certificates (for https JWKS and OIDC discovery),
# tzdata, no shell. The :nonroot variant's user is nonroot, uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/valet /valet
# Numeric on purpose: Kubernetes' runAsNonRoot can only verify a numeric USER
# (65532 is `nonroot` in distroless images).
USER 65532:65532
ENTRYPOINT ["/valet"]
CMD ["serve", "--config", "/etc/valet/valet.yaml"]
