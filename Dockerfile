# Refrain images, two targets:
#   docker build --target cpu  -t refrain:cpu  .    (torch CPU build + faiss-cpu)
#   docker build --target cuda -t refrain:cuda .    (torch CUDA build + faiss GPU; run with GPUs)
# Always name the target. The CPU stages come first, so that the legacy builder, which builds
# every stage before its target, never needs the CUDA base image for `--target cpu`.
#
# Each target has a build stage (a virtualenv in /opt/venv) and a runtime stage that copies
# it. Python dependencies are installed from pyproject.toml alone, before any code is copied,
# so a code change rebuilds only the last layers. The shipped model (model/weights/default)
# is installed as package data. Data lives on the /data volume. The image runs as the
# non-root user `refrain` (uid and gid 10001).

ARG BASE_IMAGE=debian:bookworm-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

############################################################################################
# CPU build: torch's CPU build (much smaller) and faiss-cpu, on Debian's python3 and venv.
# BASE_IMAGE may already hold python3, python3-venv and libgomp1 (deploy/offline-build.sh
# makes such a base with debootstrap); then neither stage runs apt. With wheels in wheelhouse/
# (deploy/offline-build.sh wheels), pip installs from them alone and the build needs no network.
FROM ${BASE_IMAGE} AS cpu-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYMILVUS=pymilvus==3.0.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY wheelhouse/ /wheels/
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && if ls /wheels/*.whl > /dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; \
       else export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install "pip>=24" "setuptools>=77" "wheel>=0.42" \
    && pip install "torch==2.13.0" \
    && pip install -r /tmp/requirements.txt "${PYMILVUS}" \
    && rm -rf /wheels
COPY README.md ./
COPY model ./model
COPY index ./index
COPY search ./search
COPY service ./service
COPY training ./training
COPY refrain ./refrain
RUN pip install --no-deps --no-build-isolation . && rm -rf /src

############################################################################################
FROM ${BASE_IMAGE} AS cpu
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN if ! dpkg -s python3 libgomp1 > /dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 libgomp1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin refrain \
    && mkdir -p /data && chown refrain:refrain /data
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REFRAIN_DATA_DIR=/data \
    REFRAIN_HEALTH_URL=http://127.0.0.1:8000/healthz
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['REFRAIN_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["refrain"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
############################################################################################
# CUDA build: torch's CUDA 12 build and faiss's GPU build (both bring their CUDA 12 libraries
# as wheels; the base image supplies the rest of the CUDA runtime).
FROM ${CUDA_IMAGE} AS cuda-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG FAISS_GPU=faiss-gpu==1.15.1
ARG PYMILVUS=pymilvus==3.0.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# dependencies only: the list in pyproject.toml, faiss-cpu swapped for the GPU build
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(x for x in d['project']['dependencies'] if not x.startswith('faiss-cpu')))" \
        > /tmp/requirements.txt \
    && pip install "pip>=24" "setuptools>=68" "wheel>=0.42" \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && pip install -r /tmp/requirements.txt "${FAISS_GPU}" "${PYMILVUS}"
COPY README.md ./
COPY model ./model
COPY index ./index
COPY search ./search
COPY service ./service
COPY training ./training
COPY refrain ./refrain
RUN pip install --no-deps --no-build-isolation . && rm -rf /src

############################################################################################
FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin refrain \
    && mkdir -p /data && chown refrain:refrain /data
COPY --from=cuda-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REFRAIN_DATA_DIR=/data \
    REFRAIN_HEALTH_URL=http://127.0.0.1:8000/healthz \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['REFRAIN_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["refrain"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

