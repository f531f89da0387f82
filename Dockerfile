# fedapp: one image for every role of a deployment (SuperLink, SuperNode, launcher).
#
#   docker build -t fedapp .
#   docker run --rm fedapp                       # fedapp-launch --help
#   docker run ... fedapp flower-superlink ...   # the SuperLink (also runs the ServerApp)
#   docker run ... fedapp flower-supernode ...   # a SuperNode (runs the ClientApps)
#   docker run ... fedapp fedapp-launch --config exp.toml   # a whole run in one container
#
# See compose.yaml for a SuperLink with two SuperNodes and docs/deployment.md for details.
FROM python:3.11-slim

# CPU wheels of torch by default (the default PyPI wheel pulls several GB of CUDA);
# build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for GPUs.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FEDAPP_DATA_ROOT=/data \
    FEDAPP_PROJECT_ROOT=/app \
    FLWR_HOME=/home/fedapp/.flwr

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin fedapp

WORKDIR /app
# Dependencies first (a layer that survives code edits), then the code.
COPY pyproject.toml README.md* ./
COPY fedapp ./fedapp
RUN pip install --extra-index-url "${TORCH_INDEX}" . \
    && mkdir -p /app/outputs /data /home/fedapp/.flwr \
    && chown -R fedapp:fedapp /app/outputs /data /home/fedapp

USER fedapp
# 9092: SuperLink (Fleet, Control and Runtime APIs share one port in Flower 1.41)
EXPOSE 9092
VOLUME ["/data", "/app/outputs"]

# No fixed ENTRYPOINT: the command names the role. Console scripts installed here:
# flower-superlink, flower-supernode, flwr, fedapp-launch.
CMD ["fedapp-launch", "--help"]
