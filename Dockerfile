# llm-function: one image, two modes.
#   AWS Lambda (the default CMD): function.handler.handler, weights fetched from MODEL_PATH=s3://… into /tmp
#   or memory. SnapStart (template.yaml's SnapStart parameter) needs an AWS Python 3.12+ base image: its
#   runtime client takes the snapshot and runs the snapshot_restore_py hooks (a dependency in pyproject.toml).
#   HTTP server on a GPU host (build with --build-arg TORCH_VARIANT=cu128):
#     docker run --gpus all -p 8000:8000 -e MODEL_PATH=s3://bucket/prefix/ --entrypoint python IMAGE \
#       -m function serve --host 0.0.0.0 --port 8000
FROM public.ecr.aws/lambda/python:3.12 AS app

# cpu (default, for Lambda) or a CUDA wheel index of PyTorch, e.g. cu128, for GPU hosts.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

# Only /tmp is writable on Lambda: every cache goes there. No model hub at run time.
ENV HF_HOME=/tmp/huggingface \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    MODEL_CACHE_DIR=/tmp/llm-function/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR ${LAMBDA_TASK_ROOT}

# torch first, from PyTorch's index for the chosen variant; the rest resolves against it.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

COPY pyproject.toml README.md ./
COPY function/ ./function/
RUN pip install --no-cache-dir . && rm -rf build ./*.egg-info

# Our decoder's layer loop in C++ (function/engine/native.py), compiled for this torch in a stage of its
# own: the image keeps the library, not the compiler. The code that runs is ${LAMBDA_TASK_ROOT}/function
# (first on Lambda's path, and the working directory's for `python -m function`), so it is built there.
FROM app AS native
# The compiler of the base image's own release (its repository pins it); build stage only.
# hadolint ignore=DL3041
RUN dnf install -y gcc-c++ && dnf clean all
# ninja's version range is the `native` extra's, in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[native]" && python -m function build-native

FROM app
COPY --from=native ${LAMBDA_TASK_ROOT}/function/engine/_native/llm_function_native_step.so \
     ${LAMBDA_TASK_ROOT}/function/engine/_native/stamp.json ./function/engine/_native/
EXPOSE 8000
CMD ["function.handler.handler"]
