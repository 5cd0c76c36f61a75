# ROCm / XLA settings for ZAYA1 training on MI300X (gfx942, 8 GPUs and 192 GB HBM3 each per node).
# Sourced by sbatch_mi300x.sh and launch_multinode.sh; every line says why it is there.

# Grouped GEMM for jax.lax.ragged_dot (the "ragged_dot" expert backend) instead of a dense loop over experts.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_experimental_use_ragged_dot_grouped_gemm=true"
# Overlap the data-parallel gradient reductions and the FSDP/ZeRO all-gathers with compute.
XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_latency_hiding_scheduler=true"
# Fewer, larger collectives: combine reductions/gathers up to 256 MiB (the default thresholds are small).
XLA_FLAGS="$XLA_FLAGS --xla_gpu_all_reduce_combine_threshold_bytes=268435456"
XLA_FLAGS="$XLA_FLAGS --xla_gpu_all_gather_combine_threshold_bytes=268435456"
XLA_FLAGS="$XLA_FLAGS --xla_gpu_reduce_scatter_combine_threshold_bytes=268435456"
# Triton GEMM autotuning is slow on ROCm and our matmuls go to hipBLASLt / the Pallas kernels.
XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false"
# hipBLASLt for the dense matmuls (the ZAYA1 paper's stack): on ROCm XLA's "cublaslt" flag selects hipBLASLt.
XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_cublaslt=true"
export XLA_FLAGS

# Let XLA take 90% of the 192 GB up front (the rest: RCCL buffers, the runtime).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# RCCL over the node's RoCE/InfiniBand NICs; GPU-direct RDMA between nodes.
export NCCL_IB_HCA="${NCCL_IB_HCA:-}"  # set to the cluster's HCAs, e.g. mlx5_0,mlx5_1,... (empty: RCCL picks)
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-3}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export HSA_FORCE_FINE_GRAIN_PCIE=1
# Keep the kernels' and programs' disk caches between runs.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.cache/triton}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax}"
