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
# client ships a second, asyncio copy of itself (kubernetes/aio, 68 MB) that nothing here imports, and
# pglast its parser's C source. The rest of the client is kept compiled only (compileall -b puts each
# module's .pyc where its .py was, which Python imports without the source): 59 -> 25 MB, at the price of
# no source lines in the client's own traceback frames. Compiled extensions ship their debug symbols:
# pglast's parser is 27.7 MB with them, 3.7 MB without; binutils is installed for the strip and removed in
# the same layer (unpinned: its version leaves nothing in the image).
# hadolint ignore=DL3008
RUN pip install --no-cache-dir --no-index --find-links=/wheels "matview-operator==${VERSION}" \
    && packages="$(python -c 'import os, pglast; print(os.path.dirname(os.path.dirname(pglast.__file__)))')" \
    && rm -rf /wheels "$packages/kubernetes/aio" "$packages/pglast/parser.c" \
    && python -m compileall -q -b "$packages/kubernetes" \
    && find "$packages/kubernetes" -name __pycache__ -prune -exec rm -rf {} + \
    && find "$packages/kubernetes" -name '*.py' -delete \
    && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends binutils \
    && find "$packages" -name '*.so' -exec strip --strip-unneeded {} + \
    && apt-get purge -y -qq --auto-remove binutils \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin matview
USER 10001:10001
EXPOSE 9808 8080
ENTRYPOINT ["matview"]
CMD ["operator", "--all-namespaces"]
