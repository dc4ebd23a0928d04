# syntax=docker/dockerfile:1
# Multi-stage build: dependencies are compiled in their own layer (cached until Cargo.toml
# or Cargo.lock change), the runtime image is Debian slim with only the binary, run as a
# non-root user.
#
# The build stage copies every path the build reads: src/, sql/ (migrations embedded by
# refinery), assets/ (the docs page src/openapi/page.rs includes) and benches/ (Cargo.toml
# declares the `verify` bench; cargo reads every declared target). CI proves this list is
# enough without a Docker daemon: scripts/check-image-inputs.sh copies exactly what these
# COPY lines name into an empty folder and builds the binary there.

FROM rust:1-bookworm AS deps
WORKDIR /app
COPY Cargo.toml Cargo.lock ./
# Stubs for every target Cargo.toml declares, so only the dependencies compile here.
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs && : > src/lib.rs \
    && echo 'fn main() {}' > benches/verify.rs \
    && cargo build --release --locked --bin keymeter

FROM deps AS build
COPY src ./src
COPY sql ./sql
COPY assets ./assets
COPY benches ./benches
# The copied sources may be older than the stubs: touch them so cargo rebuilds keymeter.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin keymeter

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home keymeter
COPY --from=build /app/target/release/keymeter /usr/local/bin/keymeter
USER keymeter
# Production by default: it refuses development-only settings (KEYMETER_SCRAPE_ALLOW) and
# weak or missing secrets (an admin token under 32 characters, billing without its
# secrets). docker-compose.yml opts into development explicitly.
ENV KEYMETER_BIND=0.0.0.0:8080 \
    KEYMETER_ENV=production \
    KEYMETER_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health/live || exit 1
ENTRYPOINT ["/usr/local/bin/keymeter"]
CMD ["serve"]
