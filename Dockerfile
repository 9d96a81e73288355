# syntax=docker/dockerfile:1
# inventory-worker image: build a wheel in one stage, install it into a virtualenv, copy only
# that virtualenv (with sql/ under share/) into a slim runtime that runs as a non-root user.
#   docker build -t inventory-worker:0.1.0 .
#   docker run --rm -e INVENTORY_DATABASE__HOST=... inventory-worker:0.1.0 migrate
#   docker run --rm -p 8080:8080 -e ... inventory-worker:0.1.0 run

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
RUN python -m venv /opt/inventory-worker
COPY pyproject.toml README.md ./
COPY inventory_worker ./inventory_worker
COPY sql ./sql
# A wheel install puts sql/ in /opt/inventory-worker/share/inventory-worker/sql, where
# adapters/migrations.py looks for it. psycopg2-binary brings its own libpq: no compiler needed.
RUN /opt/inventory-worker/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/inventory-worker/bin/pip install --no-cache-dir . \
 && test -f /opt/inventory-worker/share/inventory-worker/sql/procedures/events.sql

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 inventory \
 && useradd --system --uid 10001 --gid inventory --no-create-home --shell /usr/sbin/nologin inventory
COPY --from=build /opt/inventory-worker /opt/inventory-worker
COPY config/config.yaml /etc/inventory-worker/config.yaml
ENV PATH=/opt/inventory-worker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INVENTORY_CONFIG=/etc/inventory-worker/config.yaml \
    INVENTORY_LOGGING__FORMAT=json
USER 10001:10001
# 8080: the read API; 9090: /healthz, /readyz and /metrics (http.management_port)
EXPOSE 8080 9090
# The supervisor handles SIGTERM itself (finish, ack, flush, exit 0); exec form keeps it PID 1.
ENTRYPOINT ["inventory-worker"]
CMD ["run"]
