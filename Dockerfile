# Multi-stage build of the proxy. The runtime image holds the binary, the traffic redirection
# script and the two tools the script needs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ztunnel

FROM debian:bookworm-slim
# Not pinned to package versions (DL3008): the archive replaces them with each security update,
# so pins would break the build; the base image's release is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ztunnel /usr/local/bin/ztunnel
COPY deploy/ztunnel-redirect.sh /usr/local/bin/ztunnel-redirect.sh
# The proxy runs as root with only NET_ADMIN and NET_RAW (see deploy/ztunnel.yaml): transparent
# listeners, original source addresses and SO_MARK need them; file access needs nothing special.
# 15001 outbound, 15006 inbound plaintext, 15008 HBONE, 15020 metrics, 15021 readiness
# (15000, admin, listens on localhost only)
EXPOSE 15001 15006 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]
