# fedapp: one image for every role of a deployment (SuperLink, SuperNode, launcher,
# credentials, the `fedapp` CLI).
#
#   docker build -t fedapp:latest .
#   docker build --build-arg BASE_IMAGE=local/python:3.11-slim -t fedapp:latest .   # no registry
#   docker run --rm fedapp:latest                      # fedapp-launch --help
#   docker run ... fedapp:latest flower-superlink ...  # the SuperLink (also runs the ServerApp)
#   docker run ... fedapp:latest flower-supernode ...  # a SuperNode (runs the ClientApps)
#   docker run ... fedapp:latest fedapp-launch --superlink HOST:9092 ...   # submit one run
#   docker run ... fedapp:latest python -m fedapp.deploy.make_credentials --out DIR ...
#
# See compose.yaml (TLS SuperLink, node authentication, two SuperNodes) and
# docs/deployment.md section 5. Lint: hadolint --failure-threshold warning Dockerfile

# Any Debian-like image with Python >= 3.11 on PATH (pip, venv or not).
ARG BASE_IMAGE=python:3.11-slim

# --- Stage 1: the dependency list, extracted from pyproject.toml. The next stage copies
# only this file, so editing pyproject.toml elsewhere (tool settings, scripts) keeps the
# multi-GB dependency layer cached as long as [project].dependencies stay the same.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); open('requirements.txt', 'w').write('\n'.join(d['project']['dependencies']) + '\n')"

# --- Stage 2: the image.
FROM ${BASE_IMAGE}

# Empty by default: torch comes from PyPI (its default wheel carries CUDA, ~7 GB image).
# Where the PyTorch index is reachable, smaller images come from
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu     (CPU only)
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128   (GPUs)
ARG TORCH_INDEX=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FEDAPP_DATA_ROOT=/data \
    FEDAPP_PROJECT_ROOT=/app \
    FLWR_HOME=/home/fedapp/.flwr

# A fixed uid/gid (10001) so that volumes and bind mounts can be prepared for it.
RUN groupadd --gid 10001 fedapp \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin fedapp

WORKDIR /app

# Dependencies: one layer that survives code edits (it depends on requirements.txt only).
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
        "setuptools>=68" wheel -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code: reinstalled without touching the dependencies.
COPY pyproject.toml README.md ./
COPY fedapp ./fedapp
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && mkdir -p /app/outputs /data /credentials /home/fedapp/.flwr \
    && chown -R fedapp:fedapp /app/outputs /data /credentials /home/fedapp

# Numeric, so that Kubernetes runAsNonRoot and volume owners can check it (fedapp:fedapp).
USER 10001:10001
# 9092: SuperLink (Fleet, Control and Runtime APIs share one port in Flower 1.41)
EXPOSE 9092
VOLUME ["/data", "/app/outputs"]

# No fixed ENTRYPOINT: the command names the role. Console scripts installed here:
# flower-superlink, flower-supernode, flwr, fedapp-launch, fedapp.
CMD ["fedapp-launch", "--help"]
