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
#   SDSERVE_WATCHDOG        0 turns off the watchdog that reloads a model whose Python
#                           backend stub died [1]
#
# Triton's control APIs (model repository, shared memory, statistics, trace, logging) are
# closed on gRPC and HTTP unless a request carries the operator's key: HTTP header
# `sdserve-admin-key`, gRPC metadata `triton-grpc-protocol-sdserve-admin-key` (Triton adds the
# prefix). Inference, health, metadata and model config stay open.
#   SDSERVE_ADMIN_KEY       the key itself, or
#   SDSERVE_ADMIN_KEY_FILE  a file holding it (trailing newlines dropped); with neither,
#                           a key is generated for this start and written (mode 0600) to
#                           $SDSERVE_BUILD_DIR/admin-key, whose path is logged
# gRPC TLS (off unless both of the first two are set):
#   SDSERVE_TLS_CERT        PEM server certificate (chain)
#   SDSERVE_TLS_KEY         PEM private key of that certificate
#   SDSERVE_TLS_CLIENT_CA   PEM CA bundle; when set, clients must present a certificate it
#                           signed (mutual TLS)
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

die() {
    log "error: $*"
    exit 64
}

admin_header="sdserve-admin-key"
# Everything but inference, health, metadata and model-config (Triton's names).
restricted_apis="model-repository,shared-memory,statistics,trace,logging"

# The operator's key: SDSERVE_ADMIN_KEY, else the file SDSERVE_ADMIN_KEY_FILE, else a new
# random key written to ${build_dir}/admin-key. Sets admin_key; never logs it.
resolve_admin_key() {
    if [[ -n "${SDSERVE_ADMIN_KEY+x}" && -n "${SDSERVE_ADMIN_KEY_FILE+x}" ]]; then
        die "set SDSERVE_ADMIN_KEY or SDSERVE_ADMIN_KEY_FILE, not both"
    fi
    if [[ -n "${SDSERVE_ADMIN_KEY+x}" ]]; then
        admin_key="${SDSERVE_ADMIN_KEY}"
        check_admin_key "SDSERVE_ADMIN_KEY"
        log "control APIs need the key from SDSERVE_ADMIN_KEY (header ${admin_header})"
    elif [[ -n "${SDSERVE_ADMIN_KEY_FILE+x}" ]]; then
        [[ -f "${SDSERVE_ADMIN_KEY_FILE}" && -r "${SDSERVE_ADMIN_KEY_FILE}" ]] \
            || die "SDSERVE_ADMIN_KEY_FILE=${SDSERVE_ADMIN_KEY_FILE} is not a readable file"
        admin_key="$(<"${SDSERVE_ADMIN_KEY_FILE}")"  # drops trailing newlines
        check_admin_key "${SDSERVE_ADMIN_KEY_FILE}"
        log "control APIs need the key in ${SDSERVE_ADMIN_KEY_FILE} (header ${admin_header})"
    else
        local key_file="${build_dir}/admin-key"
        admin_key="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"  # 32 random bytes, hex
        [[ "${#admin_key}" -eq 64 ]] || die "could not read 32 bytes from /dev/urandom"
        (
            umask 077
            printf '%s\n' "${admin_key}" >"${key_file}.tmp"
        )
        chmod 600 "${key_file}.tmp"
        mv -f "${key_file}.tmp" "${key_file}"
        log "no SDSERVE_ADMIN_KEY(_FILE): generated a key for this start in ${key_file}" \
            "(mode 0600); control APIs need it in the header ${admin_header}"
    fi
}

# A key must be usable as a gRPC metadata / HTTP header value: printable ASCII, not empty,
# no leading or trailing blanks, no ':' or '=' (the flag's separators).
check_admin_key() {
    local LC_ALL=C
    [[ "${admin_key}" =~ ^[[:graph:]]([[:print:]]*[[:graph:]])?$ ]] \
        || die "the admin key from $1 is empty, has leading/trailing blanks or characters" \
            "other than printable ASCII"
    # tritonserver reads "<apis>:<header>=<key>": a ':' or '=' in the key would break it
    [[ "${admin_key}" != *[:=]* ]] || die "the admin key from $1 must not contain ':' or '='"
}

# gRPC TLS flags from SDSERVE_TLS_CERT / _KEY / _CLIENT_CA; sets tls_args.
resolve_tls() {
    tls_args=()
    local cert="${SDSERVE_TLS_CERT:-}" key="${SDSERVE_TLS_KEY:-}" ca="${SDSERVE_TLS_CLIENT_CA:-}"
    if [[ -z "${cert}" && -z "${key}" ]]; then
        [[ -z "${ca}" ]] || die "SDSERVE_TLS_CLIENT_CA needs SDSERVE_TLS_CERT and SDSERVE_TLS_KEY"
        return 0
    fi
    [[ -n "${cert}" ]] || die "SDSERVE_TLS_KEY is set without SDSERVE_TLS_CERT"
    [[ -n "${key}" ]] || die "SDSERVE_TLS_CERT is set without SDSERVE_TLS_KEY"
    local file
    for file in "${cert}" "${key}" ${ca:+"${ca}"}; do
        [[ -f "${file}" && -r "${file}" ]] || die "TLS file ${file} is not a readable file"
    done
    tls_args=(--grpc-use-ssl=true --grpc-server-cert="${cert}" --grpc-server-key="${key}")
    if [[ -n "${ca}" ]]; then
        tls_args+=(--grpc-root-cert="${ca}" --grpc-use-ssl-mutual=true)
        log "gRPC: TLS with client certificates signed by ${ca} (mutual TLS)"
    else
        log "gRPC: TLS with ${cert}"
    fi
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
    "${python}" -m sdserve_export gpu-repository "${args[@]}"
}

mkdir -p "${build_dir}" "${engines}"
# Checked before the (possibly hour-long) preparation, so a bad setting fails at once.
resolve_admin_key
resolve_tls
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

# The watchdog (sdserve_pipeline.healing) reloads a model whose Python backend stub died,
# which Triton 2.51 never does; it runs beside tritonserver, which keeps this shell's pid
# across exec, and ends with it. It needs explicit model control (load/unload, behind the key).
if [[ "${SDSERVE_WATCHDOG:-1}" != "0" ]]; then
    env -u SDSERVE_ADMIN_KEY_FILE SDSERVE_ADMIN_KEY="${admin_key}" \
        "${python}" -m sdserve_pipeline.healing --server-pid "$$" --http 127.0.0.1:8000 &
fi

log "starting tritonserver on ${gpu_repository}"
exec tritonserver \
    --model-repository="${gpu_repository}" \
    --model-control-mode=explicit \
    --load-model='*' \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    --allow-metrics=true \
    --allow-gpu-metrics=true \
    --strict-readiness=true \
    --exit-timeout-secs=30 \
    --grpc-restricted-protocol="${restricted_apis}:${admin_header}=${admin_key}" \
    --http-restricted-api="${restricted_apis}:${admin_header}=${admin_key}" \
    "${tls_args[@]}" \
    "$@"
