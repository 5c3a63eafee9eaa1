# The broker as a container image, for docker-compose.yml (broker + Prometheus + Grafana).
#
# Two stages: the first builds the project's wheel from the source tree, the second installs that
# wheel (and its dependencies from PyPI) with pip, so the runtime image holds neither the source
# tree nor build tools. The broker listens on 0.0.0.0 inside the container; publish the port to
# reach it. Pinned base image: rebuilds get the same Python and Debian.
FROM python:3.11.10-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The C speedups (setup.py) need a compiler; the wheel then holds them for the runtime stage.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY broker ./broker
COPY clients ./clients
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin broker

USER broker
EXPOSE 8765
# SIGTERM makes the broker drain (close 1001 to every client, flush, exit 0); the exec form below
# makes the broker PID 1 so it receives the signal from `docker stop` itself.
STOPSIGNAL SIGTERM
# The slim image has no curl: ask /healthz with the interpreter the broker already uses; over
# https when TLS is configured with BROKER_TLS_CERT (its own loopback port: not verified).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE; scheme = 'https' if os.environ.get('BROKER_TLS_CERT') else 'http'; sys.exit(urllib.request.urlopen(scheme + '://127.0.0.1:8765/healthz', timeout=2, context=ctx).status != 200)"]
ENTRYPOINT ["broker"]
CMD ["--host", "0.0.0.0", "--port", "8765"]
