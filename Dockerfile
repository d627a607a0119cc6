# tokensvc: one image for the service and its migrate step (docker-compose.yml runs both). Reproducible: every
# runtime dependency comes from the hashed lock (requirements.txt, `make lock`), and the project itself is built
# into a wheel in a stage of its own, installed without dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements-pip.txt requirements.txt ./
RUN pip install --require-hashes -r requirements-pip.txt && pip install --require-hashes -r requirements.txt
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels && pip check && useradd --system --uid 10001 tokensvc
USER tokensvc

EXPOSE 8000
# Liveness, not readiness: a database outage must not get healthy replicas restarted (they answer 503 and recover).
# tests/test_packaging.py runs this very command against a live `tokensvc serve`.
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["tokensvc", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-migrate"]
