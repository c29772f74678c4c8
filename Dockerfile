# The auditor daemon (`auditor run`). Build: docker build -t katapult-auditor .   Run: see docker-compose.yml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY auditor ./auditor
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUDITOR_API__LISTEN=0.0.0.0:8080 \
    AUDITOR_LOG__FORMAT=json
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --create-home --home-dir /app auditor
# config/auditor.toml under the working directory is read when present (mount ./config here).
WORKDIR /app
USER auditor
EXPOSE 8080
# The daemon handles SIGTERM itself: a running cycle gets daemon.shutdown_grace, then it exits 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"]
CMD ["auditor", "run"]
