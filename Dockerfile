# syntax=docker/dockerfile:1
# mergeguard-server and the mergeguard CLI on Debian bookworm.
#
#   docker build -t mergeguard:0.1.0 .                                  # CPU
#   docker build -t mergeguard:0.1.0-cuda --build-arg VARIANT=cuda .    # CUDA
#
# VARIANT=cpu (default) builds against Debian's LibTorch (libtorch-dev, CPU
# only). VARIANT=cuda downloads a CUDA LibTorch (LIBTORCH_URL, cxx11 ABI, to
# match Debian's gRPC and Abseil) into /opt/libtorch, installs Debian's CUDA
# 11.8 toolkit (non-free) for LibTorch's CMake config, builds against it, and
# ships /opt/libtorch in the runtime image; the NVIDIA container runtime
# supplies the driver. The CUDA variant has not been built by the project's
# CI; see docs/deploy.md. The runtime's package lists live in deploy/docker/
# and are checked by tests/deploy/docker_test.py.
ARG VARIANT=cpu
ARG BUILDER_IMAGE=debian:bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- builder
FROM ${BUILDER_IMAGE} AS builder
ARG VARIANT
# The CUDA LibTorch (VARIANT=cuda only). Its CUDA version must match the
# toolkit installed below (Debian bookworm ships 11.8).
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu118/libtorch-cxx11-abi-shared-with-deps-2.1.2%2Bcu118.zip
# Optional sha256 of that archive; checked when set.
ARG LIBTORCH_SHA256=
WORKDIR /src

# The project's dependency set, through the same script as a developer
# machine. Only setup and its package list are copied, so this layer is
# cached while sources change (and scripts/fetch-data, absent here, is not
# run: the image needs no benchmark data).
COPY scripts/setup scripts/packages.extra scripts/
RUN scripts/setup && rm -rf /var/lib/apt/lists/*

RUN set -eu; \
    mkdir -p /opt/libtorch; \
    case "$VARIANT" in \
      cpu) ;; \
      cuda) \
        sed -i 's/^Components: main$/Components: main contrib non-free non-free-firmware/' \
          /etc/apt/sources.list.d/debian.sources; \
        apt-get update -qq; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
          nvidia-cuda-toolkit curl ca-certificates unzip; \
        curl -fsSL -o /tmp/libtorch.zip "$LIBTORCH_URL"; \
        if [ -n "$LIBTORCH_SHA256" ]; then \
          echo "$LIBTORCH_SHA256  /tmp/libtorch.zip" | sha256sum -c -; \
        fi; \
        unzip -q /tmp/libtorch.zip -d /opt; \
        rm -rf /tmp/libtorch.zip /var/lib/apt/lists/*;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1;; \
    esac

COPY . .
# The Makefile's configure step (Ninja, RelWithDebInfo), without tests; only
# the two shipped binaries are built.
RUN set -eu; \
    torch_flags=""; \
    if [ "$VARIANT" = cuda ]; then \
      torch_flags="-DTorch_DIR=/opt/libtorch/share/cmake/Torch"; \
    fi; \
    make configure BUILD_DIR=/build \
      CMAKE_FLAGS="-DMERGEGUARD_BUILD_TESTS=OFF $torch_flags"; \
    cmake --build /build --target mergeguard-server mergeguard -j "$(nproc)"; \
    strip --strip-debug /build/bin/mergeguard-server /build/bin/mergeguard; \
    rm -rf /opt/libtorch/include /opt/libtorch/share /opt/libtorch/bin; \
    find /opt/libtorch -name '*.a' -delete

# ---------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime
ARG VARIANT
COPY deploy/docker/runtime-packages deploy/docker/runtime-packages.cpu \
     /tmp/mergeguard-packages/
RUN set -eu; \
    lists=/tmp/mergeguard-packages/runtime-packages; \
    if [ "$VARIANT" = cpu ]; then \
      lists="$lists /tmp/mergeguard-packages/runtime-packages.cpu"; \
    fi; \
    packages="$(grep -hv -e '^#' -e '^[[:space:]]*$' $lists)"; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      $packages; \
    rm -rf /var/lib/apt/lists/* /tmp/mergeguard-packages; \
    groupadd --system --gid 10001 mergeguard; \
    useradd --system --uid 10001 --gid mergeguard --no-create-home \
      --home-dir /var/lib/mergeguard --shell /usr/sbin/nologin mergeguard; \
    install -d -o mergeguard -g mergeguard -m 0750 /var/lib/mergeguard; \
    install -d -m 0755 /etc/mergeguard /etc/mergeguard/tokens /etc/mergeguard/tls

# Empty for VARIANT=cpu; the CUDA LibTorch's shared libraries otherwise.
COPY --from=builder /opt/libtorch /opt/libtorch
COPY --from=builder /build/bin/mergeguard-server /build/bin/mergeguard \
     /usr/local/bin/

ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MERGEGUARD_SERVER=127.0.0.1:50051

USER 10001:10001
WORKDIR /var/lib/mergeguard
EXPOSE 50051 9464
VOLUME ["/var/lib/mergeguard"]

# grpc.health.v1 through the CLI (the health service needs no token). With
# TLS on, set MERGEGUARD_HEALTH_TLS_CA to the CA file and MERGEGUARD_SERVER to
# a name the certificate carries (e.g. localhost:50051). Docker reads exit 1
# as unhealthy; the CLI's own codes (6: not serving) are mapped to it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD mergeguard health --timeout 5 ${MERGEGUARD_HEALTH_TLS_CA:+--tls-ca "$MERGEGUARD_HEALTH_TLS_CA"} || exit 1

# Mount the token file at /etc/mergeguard/tokens/tokens (format in
# docs/server.md) and the store at /var/lib/mergeguard; append server flags
# (e.g. --tls_cert=/etc/mergeguard/tls/tls.crt) after the image name.
ENTRYPOINT ["mergeguard-server", "--store_dir=/var/lib/mergeguard", "--tokens_file=/etc/mergeguard/tokens/tokens"]
CMD ["--port=50051", "--metrics_port=9464"]
