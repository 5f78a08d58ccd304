# burrow in a container: `docker build -t burrow .`
# The same image runs the edge (VPS) or the agent (NAS); see
# configs/docker-compose.example.yml for both sides.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin burrow && strip target/release/burrow

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /etc/burrow /var/lib/burrow
COPY --from=build /src/target/release/burrow /usr/local/bin/burrow
VOLUME ["/var/lib/burrow"]
ENTRYPOINT ["/usr/local/bin/burrow"]
CMD ["--help"]
