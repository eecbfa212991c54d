#!/usr/bin/env bash
# sdserve container entrypoint: prepare the model repository for the GPU present, then
# exec tritonserver on it (extra arguments are passed on to tritonserver).
#
# First start (nothing under $SDSERVE_BUILD_DIR yet):
#   1. export the checkpoint ($SDSERVE_SOURCE, or the tiny demo pipeline) to ONNX models
#      in a Triton repository, each checked against PyTorch;
#   2. write the GPU variant of that repository: components on Triton's native
#      tensorrt_plan (engines built for this GPU and TensorRT when missing, checked against
#      ONNX Runtime) or onnxruntime_onnx platform.
# Later starts find the ONNX repository and the engines (exact-name match: TensorRT
# version, GPU architecture, precision, batch range, size buckets, ONNX digest) and only
# rewrite the GPU variant, which takes seconds.
#
# Environment (defaults in brackets):
#   SDSERVE_BUILD_DIR       persistent build folder [/workspace/build]
#   SDSERVE_SOURCE          diffusers pipeline folder, hub id, or "demo" [demo]
#   SDSERVE_PIPELINE_NAME   Triton name of the pipeline model [inpaint]
#   SDSERVE_PLATFORM        tensorrt_plan | onnxruntime_onnx [tensorrt_plan]
#   SDSERVE_GPU_REPOSITORY  where the GPU variant goes [$SDSERVE_BUILD_DIR/model_repository_gpu]
#   SDSERVE_BUCKETS         WIDTHxHEIGHT list the engines serve; requests are generated at
#                           the smallest one containing them [per architecture: SD 1.5
#                           512², 768², 768x512, 512x768; SDXL 1024² and its ratios]
#   SDSERVE_FP32_COMPONENTS components built without fp16 [the SDXL VAE only]
#   SDSERVE_INSTANCES       instances per GPU of each component [1]
set -euo pipefail

build_dir="${SDSERVE_BUILD_DIR:-/workspace/build}"
source_spec="${SDSERVE_SOURCE:-demo}"
pipeline="${SDSERVE_PIPELINE_NAME:-inpaint}"
platform="${SDSERVE_PLATFORM:-tensorrt_plan}"
repository="${build_dir}/model_repository"
gpu_repository="${SDSERVE_GPU_REPOSITORY:-${build_dir}/model_repository_gpu}"
engines="${build_dir}/engines"
python="${SDSERVE_PYTHON:-python3}"

log() {
    printf '[sdserve] %s\n' "$*" >&2
}

export_repository() {
    local source_dir="$1"
    if [[ "${source_dir}" == "demo" ]]; then
        log "writing the tiny demo pipeline (random weights)"
        "${python}" -m sdserve_export demo-pipeline --out "${build_dir}/demo-pipeline"
        source_dir="${build_dir}/demo-pipeline"
    fi
    log "exporting ${source_dir} to ${repository}"
    "${python}" -m sdserve_export repository --source "${source_dir}" --out "${repository}" \
        --name "${pipeline}"
    printf '%s\n' "${source_spec}" >"${repository}/.source"
}

needs_export() {
    [[ ! -f "${repository}/${pipeline}/config.pbtxt" ]] && return 0
    [[ "$(cat "${repository}/.source" 2>/dev/null || true)" != "${source_spec}" ]]
}

write_gpu_repository() {
    local args=(
        --repository "${repository}"
        --platform "${platform}"
        --out "${gpu_repository}"
        --engines "${engines}"
        --instances "${SDSERVE_INSTANCES:-1}"
    )
    if [[ -n "${SDSERVE_BUCKETS:-}" ]]; then
        args+=(--buckets "${SDSERVE_BUCKETS}")
    fi
    if [[ -n "${SDSERVE_FP32_COMPONENTS:-}" ]]; then
        args+=(--fp32-components "${SDSERVE_FP32_COMPONENTS}")
    fi
    log "writing the ${platform} repository to ${gpu_repository}"
    "${python}" -m sdserve_export.gpu_repository "${args[@]}"
}

mkdir -p "${build_dir}" "${engines}"
# One preparer at a time when replicas share the build volume; the lock is released
# before tritonserver starts, so a serving replica never blocks another's start.
exec 9>"${build_dir}/.prepare.lock"
flock 9
if needs_export; then
    export_repository "${source_spec}"
fi
write_gpu_repository
flock --unlock 9
exec 9>&-

log "starting tritonserver on ${gpu_repository}"
exec tritonserver \
    --model-repository="${gpu_repository}" \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    --allow-metrics=true \
    --allow-gpu-metrics=true \
    --strict-readiness=true \
    --exit-timeout-secs=30 \
    "$@"
