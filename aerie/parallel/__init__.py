"""Tensor parallelism for the target: Megatron-style sharding of Llama-family layers
(`shard`), the calls rank 0 mirrors on the other ranks (`protocol`, `mirror`), and starting
the ranks (`launch`). See docs/tensor-parallel.md."""
