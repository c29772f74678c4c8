# The auditor daemon (`auditor run`). Build: docker build -t katapult-auditor .   Run: see docker-compose.yml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY auditor ./auditor
COPY migrations ./migrations
# The auditor alone: its dependencies come from requirements.lock below.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUDITOR_API__LISTEN=0.0.0.0:8080 \
    AUDITOR_LOG__FORMAT=json
# Exact versions with their hashes (`make lock`), so the image runs what the tests ran. Nothing is resolved here:
# --no-deps keeps anything outside the lock out, and `pip check` fails the build if the lock misses a dependency.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
    && pip check \
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
