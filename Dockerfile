# syntax=docker/dockerfile:1
# The operator image: a wheel built in one stage, installed into a slim runtime as a non-root user.
# Works with a read-only root filesystem (mount an emptyDir at /tmp, as manifests/deployment.yaml does).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY crds ./crds
COPY sql ./sql
COPY examples ./examples
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# Must match [project].version in pyproject.toml (a test checks it).
ARG VERSION=0.1.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp
COPY --from=build /wheels /wheels
# Without extras: the embedded PostgreSQL (pgserver) is the demo's, never the operator's. The kubernetes
# client ships a second, asyncio copy of itself (kubernetes/aio, 68 MB) that nothing here imports.
RUN pip install --no-cache-dir --no-index --find-links=/wheels "matview-operator==${VERSION}" \
    && python -c "import kubernetes, pathlib, shutil; shutil.rmtree(pathlib.Path(kubernetes.__file__).parent / 'aio')" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin matview
USER 10001:10001
EXPOSE 9808 8080
ENTRYPOINT ["matview"]
CMD ["operator", "--all-namespaces"]
