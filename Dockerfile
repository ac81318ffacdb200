# The code location image: the gRPC server the Dagster webserver and daemon load the definitions from,
# and the image of every run pod and step pod (they take the code location's image).
#   docker build -t registry.example.com/ocr-assets:0.1.0 .
FROM python:3.12-slim

# rapid-layout pulls in the full opencv-python wheel, which links libGL and GLib
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /opt/ocr_assets
COPY pyproject.toml README.md ./
COPY ocr_assets ./ocr_assets
# PyPI's torch wheels for Linux x86_64 are CUDA builds (the CUDA runtime comes as nvidia-* wheels): the
# layout pod needs only the node's NVIDIA driver, no CUDA base image. torch 2.14.1 from PyPI is built for
# CUDA 13.0, which needs a driver >= 580 on the GPU nodes; for older drivers, build with
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or another CUDA 12 index carrying it).
# [k8s] adds dagster-k8s and dagster-postgres.
ARG TORCH_INDEX=""
RUN if [ -n "$TORCH_INDEX" ]; then \
      pip install --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1; \
    fi \
 && pip install ".[k8s]"

# PP-DocLayoutV3 (OCR_ASSETS_LAYOUT_MODEL=/models/pp-doclayout-v3) is mounted from the `models` volume
# (deploy/k8s/dagster.yaml, values.yaml). To bake it in instead, fetch it beside this file
#   hf download PaddlePaddle/PP-DocLayoutV3_safetensors --local-dir models/pp-doclayout-v3
# drop the volume from the manifests, and uncomment:
# COPY models/pp-doclayout-v3 /models/pp-doclayout-v3

# not root; the chart mounts dagster.yaml into DAGSTER_HOME, a folder this user owns
RUN useradd --create-home --uid 10001 dagster \
 && mkdir -p "$DAGSTER_HOME" \
 && chown dagster "$DAGSTER_HOME"
USER 10001

EXPOSE 3030
# CMD, not ENTRYPOINT: the chart and the run launcher give each pod its command as args
# (dagster api grpc ..., dagster api execute_run ...), which replace CMD but would follow an ENTRYPOINT
CMD ["dagster", "api", "grpc", "--module-name", "ocr_assets.definitions", "--host", "0.0.0.0", "--port", "3030"]
