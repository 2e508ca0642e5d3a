# CUDA image of pixart-pipeline for GPU machines (Prefect process/docker work pools).
#   docker build -t pixart-pipeline .
#   docker run --gpus all -v "$PWD/work:/work" pixart-pipeline run configs/lego.yaml --workdir /work
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first, so code edits do not reinstall torch. On PyPI, torch==2.13.0 is the CUDA build.
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY tasks ./tasks
COPY flows ./flows
COPY data ./data
# Versions are pinned in pyproject.toml, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu,distributed]" \
    && useradd --create-home --uid 10001 pipeline
USER 10001
ENTRYPOINT ["pixart-pipeline"]
CMD ["--help"]
