# mailgate in a container, on its default policy (deploy/container.yaml).
#
#   docker build -t mailgate .
#   docker run -p 2525:2525 -p 127.0.0.1:9125:9125 -v mailgate-mail:/var/lib/mailgate mailgate
#   docker run ... -v /etc/mailgate/policy.yaml:/etc/mailgate/policy.yaml:ro mailgate
#
# tests/test_deploy.py builds the wheel from the files copied below, installs it
# into a fresh virtualenv as the RUN line does, starts the CMD on the policy and
# runs the HEALTHCHECK against it.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/mailgate/bin:$PATH

COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY plugins /src/plugins
RUN python -m venv /opt/mailgate && /opt/mailgate/bin/pip install /src && rm -rf /src

COPY deploy/container.yaml /etc/mailgate/policy.yaml
RUN useradd --system --user-group --home-dir /var/lib/mailgate --create-home \
        --shell /usr/sbin/nologin mailgate
USER mailgate
WORKDIR /var/lib/mailgate
VOLUME /var/lib/mailgate

EXPOSE 2525 9125
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9125/health', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["mailgate", "run", "-c", "/etc/mailgate/policy.yaml"]
