"""jaxllm: train decoder LLMs end to end in JAX."""
import os


def _tune_xla_cpu() -> None:
    """XLA:CPU in jax 0.10 also hands elementwise fusions to YNNPACK, which made our training
    step ~1.7x slower on the 2-core AVX2 CI machines than YNNPACK for dots only (measured with
    experiments/bench/train_step.py). Only affects CPU; an explicit user setting wins. Must run
    before the CPU backend starts, i.e. before the first computation."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=dot".strip()


_tune_xla_cpu()
