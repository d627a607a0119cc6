# tokensvc: one image for the service and its migrate step (docker-compose.yml runs both).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY src ./src
RUN pip install . && useradd --system --uid 10001 tokensvc
USER tokensvc

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
CMD ["tokensvc", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-migrate"]
