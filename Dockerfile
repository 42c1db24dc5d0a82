# orchd in a container: the daemon, its state (SQLite, logs, artifacts) on the /data volume.
#
#   docker build -t orchd .                                        # SLURM over SSH, Vast.ai, RunPod
#   docker build -t orchd --build-arg EXTRAS=cloud,workloads \
#                --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .   # + local training
#   docker run -d --name orchd -v orchd-data:/data -v ~/.ssh:/root/.ssh:ro \
#              -e VAST_API_KEY -e RUNPOD_API_KEY orchd
#   docker exec orchd orchd submit /opt/orchd/jobspecs/sota_push_v2_runpod.yaml
#   docker exec orchd orchd status
#
# API keys and the SMTP password come in as environment variables (or a 0600 file on a
# volume); they are never written to /data. The config file is /data/config.yaml.
FROM python:3.11-slim-bookworm

ARG EXTRAS=cloud
ARG PIP_EXTRA_INDEX_URL=""

RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/orchd
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY migrations ./migrations
COPY workloads ./workloads
COPY jobspecs ./jobspecs
RUN pip install --no-cache-dir ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} ".[${EXTRAS}]"

ENV ORCHD_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
# SIGTERM stops the daemon after its current tick (orchd daemon handles it)
STOPSIGNAL SIGTERM
CMD ["orchd", "daemon"]
