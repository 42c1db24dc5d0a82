# orchd in a container: the daemon, its state (SQLite, logs, artifacts) on the /data volume,
# running as the unprivileged user orchd (uid 1000).
#
#   docker build -t orchd .                                        # SLURM over SSH, Vast.ai, RunPod
#   docker run -d --name orchd -v orchd-data:/data -v ~/.ssh:/home/orchd/.ssh:ro \
#              -v ~/specs:/specs:ro -e VAST_API_KEY -e RUNPOD_API_KEY orchd
#   docker exec orchd orchd submit /specs/my_run.yaml              # specs (and a spec's workdir, for
#   docker exec orchd orchd status                                 # uploads) must be mounted in
#
# The local backend in a container is for trying orchd out: its jobs run inside this container,
# so stopping the container stops them. Build it in with the workloads (a CPU torch):
#   docker build -t orchd --build-arg EXTRAS=cloud,workloads \
#                --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# API keys and the SMTP password come in as environment variables (or a 0600 file on a
# volume); they are never written to /data. The config file is /data/config.yaml. The health
# check fails when the daemon has not ticked for two minutes (`orchd health`).
FROM python:3.11-slim-bookworm

ARG EXTRAS=cloud
ARG PIP_EXTRA_INDEX_URL=""

RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/orchd
COPY pyproject.toml setup.py README.md ./
COPY orchestrator ./orchestrator
COPY migrations ./migrations
COPY workloads ./workloads
COPY jobspecs ./jobspecs
# gcc for the log parser's compiled recogniser (orchestrator/_linescan.c), removed once it is built
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} ".[${EXTRAS}]" \
    && (cd / && python -c "import orchestrator._linescan") \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 orchd && mkdir -p /data && chown orchd:orchd /data
USER orchd
ENV ORCHD_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
HEALTHCHECK --interval=60s --timeout=15s --start-period=90s CMD ["orchd", "-q", "health", "--max-age", "120"]
# SIGTERM stops the daemon after its current tick (orchd daemon handles it)
STOPSIGNAL SIGTERM
CMD ["orchd", "daemon"]
