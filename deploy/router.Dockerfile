# SGLang router in front of the RedKnot-RAG replicas. UNTESTED (no Docker daemon here).
FROM python:3.11-slim
RUN pip install --no-cache-dir "sglang-router==0.3.2" && apt-get update \
    && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
COPY router-entrypoint.sh /usr/local/bin/router-entrypoint.sh
RUN chmod +x /usr/local/bin/router-entrypoint.sh
EXPOSE 30000
ENTRYPOINT ["tini", "--", "/usr/local/bin/router-entrypoint.sh"]
