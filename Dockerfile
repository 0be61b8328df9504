# checkout-sidecar image: the sidecar, its pinned runtime dependencies and the default
# config, run as a non-root user.
#
#   make image    # docker build --network host -t checkout-sidecar . on a base it finds
#                 # or makes (deploy/image/build-base.sh: no Docker Hub needed)
#   docker run --rm -p 9901:9901 -e SIDECAR_ADMIN_LISTEN=0.0.0.0:9901 \
#       -e SIDECAR_ADMIN_TOKEN=change-me checkout-sidecar
#
# Configuration comes from the environment (read by config/sidecar.yaml):
# SIDECAR_LISTEN, SIDECAR_ADMIN_LISTEN, SIDECAR_ADMIN_TOKEN (required when the admin
# listener is not on loopback), SIDECAR_STORE, PAYMENT_UPSTREAM and the other
# *_UPSTREAM variables. Mount another config at /etc/checkout-sidecar/ to replace it;
# the sidecar reloads it when the file changes. State lives in /var/lib/checkout-sidecar,
# the one writable path, so the root filesystem can be read-only.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a venv with the locked dependencies and the sidecar itself ----------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# the lock first: this layer is rebuilt only when the dependencies change
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-virtualenv -r requirements.lock

COPY pyproject.toml ./
COPY proxy ./proxy
# the dependencies are all in the lock: --no-deps keeps anything unpinned out
RUN pip install --no-cache-dir --require-virtualenv --no-deps . \
    && pip check

# --- runtime: the venv, the default config, a non-root user --------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="checkout-sidecar" \
      org.opencontainers.image.description="Resilience sidecar for checkout backends" \
      org.opencontainers.image.version="${VERSION}"

# a fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --no-create-home \
        --home-dir /var/lib/checkout-sidecar --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/checkout-sidecar \
    && chown sidecar:sidecar /var/lib/checkout-sidecar

COPY --from=build /opt/venv /opt/venv
COPY config/sidecar.yaml /etc/checkout-sidecar/sidecar.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_STORE=sqlite:///var/lib/checkout-sidecar/state.db

# relative paths (a memory:// store's queue file) land in the writable state directory
WORKDIR /var/lib/checkout-sidecar
VOLUME ["/var/lib/checkout-sidecar"]

USER 10001:10001

# 8080: the data plane (loopback by default: the app in the same pod calls it);
# 9901: admin (/healthz, /readyz, /metrics, /admin/*; a token off loopback)
EXPOSE 8080 9901

# the admin port follows SIDECAR_ADMIN_LISTEN; /healthz needs no token
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SIDECAR_ADMIN_LISTEN', '127.0.0.1:9901').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

# exec form: the sidecar is PID 1 and gets SIGTERM (drain, then grace) and SIGHUP (reload)
STOPSIGNAL SIGTERM
ENTRYPOINT ["checkout-sidecar"]
CMD ["run", "--config", "/etc/checkout-sidecar/sidecar.yaml"]
