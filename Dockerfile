# MassTasker server for local development: docker build -t masstasker . && docker run -p 50053:50053 masstasker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY masstasker ./masstasker
# With the PostgreSQL driver, so one image serves either store (--store / MASSTASKER_STORE). This installs
# the project itself, whose pyproject.toml bounds its dependencies; hadolint reads the extra as a package.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[postgres]" \
    && useradd --system --no-create-home --uid 10001 masstasker

WORKDIR /
USER 10001

# Inside the container the server must listen on every interface to be reachable.
ENV MASSTASKER_LISTEN_RPC=0.0.0.0:50053 \
    MASSTASKER_LISTEN_HTTP=0.0.0.0:8080
EXPOSE 50053 8080

# The health probe dials the gRPC port on loopback and takes its settings from the environment, so a
# server with TLS needs only more of it (docs/security.md). Beside the server's own
#   MASSTASKER_TLS_CERT=/certs/tls.crt MASSTASKER_TLS_KEY=/certs/tls.key
# give the probe the CA that signed that certificate, and the name the certificate carries if it names
# neither 127.0.0.1 nor localhost:
#   MASSTASKER_HEALTHCHECK_TLS_CA=/certs/ca.crt MASSTASKER_HEALTHCHECK_TLS_SERVER_NAME=tasks.example.com
# With MASSTASKER_TLS_CLIENT_CA (mutual TLS) the probe also needs a certificate that CA signed:
#   MASSTASKER_HEALTHCHECK_TLS_CERT=/certs/probe.crt MASSTASKER_HEALTHCHECK_TLS_KEY=/certs/probe.key
# Certificates rotate without a restart: replace the files, then `docker kill --signal=HUP <container>`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-m", "masstasker.server.healthcheck"]

ENTRYPOINT ["masstasker-server"]
