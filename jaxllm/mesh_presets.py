"""Mesh presets by name: the device count (and TPU topology) of common hardware, and an axis
layout to start from. `mesh.preset=v5p-128` fills the mesh section; keys given beside it win
(e.g. `mesh.ici.tensor=4`). Names follow the vendors': a v5p-128 has 128 TensorCores, i.e. 64
chips (4x4x4); v5e and v6e count chips. Layouts shard params and optimizer state fully (fsdp)
inside a slice or node and replicate across slices/nodes (dcn data), which is where every
published recipe for these sizes starts; add tensor or sequence axes for larger models or
longer contexts."""
from __future__ import annotations

MESH_PRESETS: dict[str, dict] = {
    "cpu-8": {"devices": 8, "ici": {"data": 2, "fsdp": 4},
              "about": "8 host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)"},
    "v5e-256": {"devices": 256, "topology": "v5e:16x16", "ici": {"fsdp": -1},
                "about": "TPU v5e pod, 256 chips x 16 GiB"},
    "v5p-128": {"devices": 64, "topology": "v5p:4x4x4", "ici": {"fsdp": -1},
                "about": "TPU v5p-128 slice, 64 chips x 95 GiB"},
    "v6e-256": {"devices": 256, "topology": "v6e:16x16", "ici": {"fsdp": -1},
                "about": "TPU v6e (Trillium) pod, 256 chips x 32 GiB"},
    "v5p-128x2": {"devices": 128, "topology": "v5p:4x4x4", "num_slices": 2, "ici": {"fsdp": -1},
                  "dcn": {"data": 2},
                  "about": "two v5p-128 slices over DCN: fsdp inside a slice, data across"},
    "h100-1": {"devices": 1, "ici": {"fsdp": 1}, "about": "one H100 80 GB"},
    "h100-8": {"devices": 8, "ici": {"fsdp": 8}, "about": "one node, 8 x H100 over NVLink"},
    "h100-4x8": {"devices": 32, "ici": {"fsdp": 8}, "dcn": {"data": 4},
                 "about": "4 nodes x 8 H100: fsdp over NVLink, data across nodes (InfiniBand)"},
}


def resolve(name: str) -> dict:
    """The mesh section a preset stands for (without its description)."""
    p = MESH_PRESETS[name]
    axes = ("data", "fsdp", "tensor", "sequence")
    out = {"preset": name, "devices": p["devices"], "topology": p.get("topology"),
           "num_slices": p.get("num_slices", 1)}
    for level in ("ici", "dcn"):
        out[level] = {a: p.get(level, {}).get(a, 1) for a in axes}
    return out
