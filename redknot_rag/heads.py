"""Head profiles: which (layer, kv_head) blocks are local (sink + recent window suffices) and which
are global, measured by a calibration run. Head patterns are data — a `[layers x kv_heads]` file.

`redknot profile-heads` (the calibration lives in `rag/profiling.py`) writes `profiles/<model>.json` and
a PNG heat map.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

LOCAL, GLOBAL = 0, 1


@dataclass(frozen=True)
class HeadProfile:
    """Per-(layer, kv_head) scores and classes. `classes[l][h]` is LOCAL (0) or GLOBAL (1).

    Local heads read the anchor (the attention sink) plus the last `window` context tokens.
    """

    model: str
    weights_fingerprint: str
    num_layers: int
    num_kv_heads: int
    window: int
    locality_threshold: float
    classes: list[list[int]]
    locality: list[list[float]]
    reuse_deviation: list[list[float]]
    retrieval: list[list[float]]
    calibration: dict
    # the reuse policy chosen for this model from its measured frontier (`redknot eval --record-default`):
    # {"policy": name, "results": path, ...evidence}; empty until measured
    reuse_default: dict = field(default_factory=dict)

    def class_tensor(self) -> torch.Tensor:
        return torch.tensor(self.classes, dtype=torch.int64)  # [L, Hkv]

    @property
    def num_global(self) -> int:
        return int(self.class_tensor().sum())

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> HeadProfile:
        return cls(**json.loads(Path(path).read_text()))


def shipped_profile_path(model_name: str) -> Path:
    return Path(str(resources.files("redknot_rag") / "profiles" / f"{model_name}.json"))


def load_profile_for(model_name: str, weights_fingerprint: str) -> HeadProfile | None:
    """The shipped/calibrated profile for a model, if its weights fingerprint matches (else None)."""
    path = shipped_profile_path(model_name)
    if not path.is_file():
        return None
    prof = HeadProfile.load(path)
    if prof.weights_fingerprint != weights_fingerprint:
        return None
    return prof


def plot_profile(prof: HeadProfile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(12, 6), sharey=True)
    for ax, (title, data) in zip(
        axes,
        [
            ("locality (sink+window mass)", prof.locality),
            ("reuse deviation", prof.reuse_deviation),
            ("retrieval (fact mass)", prof.retrieval),
            ("class (1 = global)", prof.classes),
        ],
    ):
        im = ax.imshow(torch.tensor(data, dtype=torch.float32).numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("kv head")
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_ylabel("layer")
    fig.suptitle(
        f"{prof.model}: {prof.num_global}/{prof.num_layers * prof.num_kv_heads} global heads, window {prof.window}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
