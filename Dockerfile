# Multi-stage build of the proxy. The runtime image holds only the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ztunnel

FROM debian:bookworm-slim
COPY --from=build /src/target/release/ztunnel /usr/local/bin/ztunnel
# 15001 outbound, 15006 inbound plaintext, 15008 HBONE, 15020 metrics, 15021 readiness
# (15000, admin, listens on localhost only)
EXPOSE 15001 15006 15008 15020 15021
ENTRYPOINT ["/usr/local/bin/ztunnel"]
