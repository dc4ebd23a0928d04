# syntax=docker/dockerfile:1
# Multi-stage build: dependencies are compiled in their own layer (cached until Cargo.toml
# or Cargo.lock change), the runtime image is Debian slim with only the binary, run as a
# non-root user.

FROM rust:1-bookworm AS deps
WORKDIR /app
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked --bin keymeter 2>/dev/null || true

FROM deps AS build
COPY src ./src
COPY sql ./sql
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin keymeter

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home keymeter
COPY --from=build /app/target/release/keymeter /usr/local/bin/keymeter
USER keymeter
ENV KEYMETER_BIND=0.0.0.0:8080 \
    KEYMETER_ENV=production \
    KEYMETER_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health/live || exit 1
ENTRYPOINT ["/usr/local/bin/keymeter"]
CMD ["serve"]
