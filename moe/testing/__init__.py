"""What floe's tests and benchmarks share: independent references (an Arctic model written from the
Hugging Face reference, a per-token MoE loop) and the N-process harness. Nothing here imports floe's
model code, so a comparison against it is a comparison against something else."""
