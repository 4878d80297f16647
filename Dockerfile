# runnel in a container: `runnel serve` as the entry point, as a non-root user.
#
#   docker build -t runnel .
#   docker run -p 8000:8000 runnel                                   # conf/runnel.toml
#   docker run -p 8000:8000 -v $PWD/my.toml:/etc/runnel/runnel.toml \
#       -e RUNNEL_CONFIG=/etc/runnel/runnel.toml -e RUNNEL_WORKERS=4 runnel
#
# Config by mount (RUNNEL_CONFIG names the file) or by RUNNEL_* variables; arguments
# after the image name go to `runnel serve` (`docker run runnel --workers 2`).
# Not built on the machines this repository is tested on (no Docker there):
# tests/unit/test_deploy.py checks the fields the deployment files rely on.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/runnel
COPY pyproject.toml README.md ./
COPY server ./server
COPY plugins/runnel-echo ./plugins/runnel-echo
COPY plugins/runnel-ctranslate2 ./plugins/runnel-ctranslate2
RUN pip install . ./plugins/runnel-echo ./plugins/runnel-ctranslate2
# The default config and the function app it serves (its module path is relative to it).
COPY conf ./conf
COPY examples ./examples

# Runs (the SQLite store) and caches live in /var/lib/runnel, the user's home.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/runnel --create-home runnel
USER 10001:10001
ENV RUNNEL_CONFIG=/opt/runnel/conf/runnel.toml \
    RUNNEL_HOST=0.0.0.0 \
    RUNNEL_PORT=8000 \
    RUNNEL_RUNS_PATH=/var/lib/runnel/runs.sqlite3 \
    XDG_CACHE_HOME=/var/lib/runnel/cache
VOLUME /var/lib/runnel
EXPOSE 8000

# SIGTERM drains: requests in flight get [server] shutdown_grace seconds (30 by default);
# give `docker stop` more than that (docker stop -t 40; compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["runnel", "serve"]
