# syntax=docker/dockerfile:1
# One image for every f2pipe service: `docker run IMAGE connector|processor|sink|...`.
# Built in two stages so the runtime image holds the virtual environment and
# nothing of the toolchain; dependencies are exactly those of uv.lock.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/f2pipe \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m pip install --no-cache-dir uv==0.13.9
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY src ./src
RUN uv sync --locked --no-dev --no-editable

FROM ${PYTHON_IMAGE} AS runtime
# certgen's fixed uid/gid. The compose file runs every other service as a uid of its
# own in this group, which may read the keys certgen hands out in the shares; each
# container mounts only its own share. The folders below are created here so the
# volumes mounted on them start owned by certgen (Docker copies the ownership), and
# the state folder is the group's so a one-shot of another uid may write in its volume.
RUN groupadd --system --gid 10001 f2pipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/f2pipe --no-create-home \
        --shell /usr/sbin/nologin f2pipe \
 && install -d -o 10001 -g 10001 -m 0770 /var/lib/f2pipe \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/f2pipe/shares
COPY --from=build /opt/f2pipe /opt/f2pipe
ENV PATH=/opt/f2pipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    F2PIPE_STATE_DIR=/var/lib/f2pipe
WORKDIR /var/lib/f2pipe
USER 10001:10001
ENTRYPOINT ["f2pipe"]
CMD ["--help"]
