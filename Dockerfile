# syntax=docker/dockerfile:1
# Bulkhead's image: one static binary (agent, controller and CLI, the eBPF
# object inside it) on an empty base.
#
#   docker build -t localhost/bulkhead:0.1.0 .        # or: podman build
#
# Without a container engine, `cargo xtask image` builds the same image (the
# same build command, and this file's final stage: its labels, entrypoint and
# user) into target/image/bulkhead-<version>.oci.tar.

# The toolchain rust-toolchain.toml pins: its LLVM (22) must be bpf-linker's.
FROM docker.io/library/rust:1.95.0-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup component add rust-src \
 && rustup target add x86_64-unknown-linux-musl \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
      --no-default-features --features llvm-22 --locked
WORKDIR /src
COPY . .
RUN cargo build --locked --profile dist --target x86_64-unknown-linux-musl -p bulkhead

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bulkhead"
LABEL org.opencontainers.image.description="Kubernetes network microsegmentation with eBPF: node agent, controller and CLI"
LABEL org.opencontainers.image.source="https://github.com/bulkhead-io/bulkhead"
LABEL org.opencontainers.image.version="${VERSION}"
LABEL org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/x86_64-unknown-linux-musl/dist/bulkhead /bulkhead
ENTRYPOINT ["/bulkhead"]
