"""Named model shapes. Published ones match their Hugging Face config.json files."""
from jaxllm.models.config import ModelConfig, RopeScaling

_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))

PRESETS: dict[str, ModelConfig] = {
    # Quickstart size: trains on 2 CPU cores in minutes.
    "tiny": ModelConfig(preset="tiny", vocab_size=2048, hidden_size=256, intermediate_size=768,
                        num_layers=4, num_heads=8, num_kv_heads=4, max_seq_len=1024),
    # Benchmark shape shared with the HF baseline in experiments/bench/train_step.py.
    "bench-7m": ModelConfig(preset="bench-7m", vocab_size=8192, hidden_size=256,
                            intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4,
                            max_seq_len=1024),
    "llama2-7b": ModelConfig(preset="llama2-7b", vocab_size=32000, hidden_size=4096,
                             intermediate_size=11008, num_layers=32, num_heads=32,
                             num_kv_heads=32, max_seq_len=4096),
    "llama3-8b": ModelConfig(preset="llama3-8b", vocab_size=128256, hidden_size=4096,
                             intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                             max_seq_len=8192, rope_theta=500000.0),
    "llama3.1-8b": ModelConfig(preset="llama3.1-8b", vocab_size=128256, hidden_size=4096,
                               intermediate_size=14336, num_layers=32, num_heads=32,
                               num_kv_heads=8, max_seq_len=131072, **_LLAMA3_ROPE),
    "llama3.2-1b": ModelConfig(preset="llama3.2-1b", vocab_size=128256, hidden_size=2048,
                               intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                               head_dim=64, max_seq_len=131072, tie_embeddings=True,
                               rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    "qwen2.5-0.5b": ModelConfig(preset="qwen2.5-0.5b", vocab_size=151936, hidden_size=896,
                                intermediate_size=4864, num_layers=24, num_heads=14,
                                num_kv_heads=2, max_seq_len=32768, rope_theta=1000000.0,
                                rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": ModelConfig(preset="qwen2.5-7b", vocab_size=152064, hidden_size=3584,
                              intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                              max_seq_len=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              qkv_bias=True),
    "mistral-7b": ModelConfig(preset="mistral-7b", vocab_size=32000, hidden_size=4096,
                              intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                              max_seq_len=32768, sliding_window=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with field overrides on top (e.g. preset("llama3-8b", num_layers=2))."""
    if name not in PRESETS:
        import difflib
        near = difflib.get_close_matches(name, list(PRESETS), 1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise KeyError(f"unknown model preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    return PRESETS[name].replace(**overrides)
