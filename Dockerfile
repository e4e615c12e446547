# Multi-stage build of the proxy. The default (last) stage is the in-pod image that Istio's
# ztunnel chart runs: the binary alone. `--target node-capture` adds the node-level redirection
# script and the tools it needs, for deploy/node-capture/.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The image gets the binary stripped (about 9 MB); its debug information (line tables, for
# profiles and backtraces) is kept apart, linked by name: `--target debug-info` exports it.
RUN cargo build --release --locked --bin ztunnel \
    && mkdir /out \
    && objcopy --only-keep-debug target/release/ztunnel /out/ztunnel.debug \
    && strip --strip-all -o /out/ztunnel target/release/ztunnel \
    && objcopy --add-gnu-debuglink=/out/ztunnel.debug /out/ztunnel

FROM scratch AS debug-info
COPY --from=build /out/ztunnel.debug /ztunnel.debug

FROM debian:bookworm-slim AS node-capture
# Not pinned to package versions (DL3008): the archive replaces them with each security update,
# so pins would break the build; the base image's release is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ztunnel /usr/local/bin/ztunnel
COPY deploy/node-capture/ztunnel-redirect.sh /usr/local/bin/ztunnel-redirect.sh
EXPOSE 15001 15006 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]

FROM debian:bookworm-slim
COPY --from=build /out/ztunnel /usr/local/bin/ztunnel
# In-pod mode: the data ports listen inside each pod's network namespace (istio-cni hands them
# over); the proxy's own pod serves 15020 metrics and 15021 readiness (15000, admin, listens on
# localhost only). Istio's chart runs it as `ztunnel proxy ztunnel`, as uid 0 with NET_ADMIN,
# SYS_ADMIN (entering pod namespaces) and NET_RAW.
EXPOSE 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]
CMD ["proxy", "ztunnel"]
