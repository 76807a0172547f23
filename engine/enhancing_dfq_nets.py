"""The networks of enhancing-dfq: label-embedding MLPs (Eq. 3-5), the attention mixer (Eq. 6), the
flow-attention generator (Eq. 7-9), and the hooks that read the classifier's features.

Everything here is per sample (no batch statistics in the generator), so a sample's image depends
only on its own noise, classes and mixing weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import EngineError

LATENT_TOKENS = 5  # z[:, 0] modulates the condition (GDFQ); z[:, 1:] feed the flow levels
GRID = 4  # O^j is a GRID x GRID token map, decoded by upsampling
DECODER_CHANNELS = 32
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish)


# ------------------------------------------------------------------------------ classifier taps
def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks by structure: timm's `blocks`/`stages`/`layers`, torchvision's `layerN`,
    else its activation modules (a plain CNN's conv-BN-ReLU units)."""
    named = dict(model.named_modules())
    for attr in ("blocks", "stages", "layers"):
        seq = named.get(attr)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            return [(f"{attr}.{i}", m) for i, m in enumerate(seq)]
    stages = [(n, named[n]) for n in ("layer1", "layer2", "layer3", "layer4") if n in named]
    if stages:
        return stages
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _ACTIVATIONS)]


def feature_layers(model: nn.Module, names: list[str], count: int = 3) -> list[tuple[str, nn.Module]]:
    """The J layers whose pooled outputs feed the label-embedding MLPs: `names`, or the last `count` blocks."""
    named = dict(model.named_modules())
    if names:
        missing = [n for n in names if n not in named]
        if missing:
            raise EngineError(f"the classifier has no module {missing[0]!r} (--edfq-layers)")
        return [(n, named[n]) for n in names]
    blocks = block_list(model)
    if not blocks:
        raise EngineError("cannot find the classifier's blocks; name the feature layers with --edfq-layers")
    return blocks[-count:]


def head_layer(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer: its input is the last-activation feature of SimLoss1."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EngineError("enhancing-dfq needs a classifier whose head is a linear layer")
    return linears[-1]


def pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> mean over space; (B, N, D) tokens -> mean over tokens; (B, D) as is."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x.flatten(1)


class Taps:
    """Forward hooks that keep the outputs of `modules` (and the input of `head`) from the last forward."""

    def __init__(self, modules: list[nn.Module], head: nn.Module | None = None) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self.feature: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._keep(i)) for i, m in enumerate(modules)]
        if head is not None:
            self._handles.append(head.register_forward_hook(self._keep_feature))

    def _keep(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def _keep_feature(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.feature = inputs[0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------------------ label embeddings
class LabelEmbedder(nn.Module):
    """Eq. 3-5: per feature layer j an MLP classifier pooled-feature -> hidden (embed_dim) -> classes;
    class c's embedding is the average over j of row c of the MLPs' last weights. With `learned`
    False the embeddings are a randomly initialised learnable table instead (GDFQ)."""

    def __init__(self, dims: list[int], num_classes: int, embed_dim: int, learned: bool) -> None:
        super().__init__()
        self.learned = learned
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d, embed_dim), nn.ReLU(), nn.Linear(embed_dim, num_classes)) for d in dims
        )
        self.table = nn.Parameter(torch.randn(num_classes, embed_dim))

    def embeddings(self) -> torch.Tensor:
        """(num_classes, embed_dim): the MLPs' averaged weight rows (detached: fixed after warm-up)."""
        if not self.learned:
            return self.table
        rows = torch.stack([mlp[2].weight for mlp in self.mlps]).mean(0).detach()
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8) * math.sqrt(rows.shape[-1])

    def logits(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [mlp(f) for mlp, f in zip(self.mlps, features)]


class Mixer(nn.Module):
    """Eq. 6: the mixed target embedding sum_i lambda_i E_{c_i} queries all class embeddings; the
    attention scores are the soft label, their weighted sum of embeddings the generator's condition."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(embed_dim, embed_dim)
        self.k = nn.Linear(embed_dim, embed_dim)

    def forward(self, target: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (self.q(target) @ self.k(table).T / math.sqrt(table.shape[-1])).softmax(-1)
        return scores @ table, scores


# ------------------------------------------------------------------------------ generator
class Coupling(nn.Module):
    """An affine coupling layer (RealNVP): half the features scale and shift the other half."""

    def __init__(self, dim: int, flip: bool) -> None:
        super().__init__()
        self.flip, half = flip, dim // 2
        self.net = nn.Sequential(nn.Linear(half, dim), nn.Tanh(), nn.Linear(dim, 2 * (dim - half)))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        half = z.shape[-1] // 2
        a, b = (z[..., half:], z[..., :half]) if self.flip else (z[..., :half], z[..., half:])
        scale, shift = self.net(a).chunk(2, dim=-1)
        b = b * torch.exp(torch.tanh(scale)) + shift
        return torch.cat([b, a], -1) if self.flip else torch.cat([a, b], -1)


class FlowAttentionLevel(nn.Module):
    """Eq. 7-9, one level j: a flow maps Gaussian z to z^j; a transformer layer takes (O^{j-1}, z^j)
    to O^j (self-attention over O, cross-attention from O to z^j, MLP)."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.flow = nn.Sequential(*(Coupling(dim, flip=i % 2 == 1) for i in range(depth)))
        self.layer = nn.TransformerDecoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.layer(o, self.flow(z))


class Generator(nn.Module):
    """Condition (class embedding) + noise -> normalized image at the classifier's input size.

    O^0 = condition tokens + a token map of the first noise token (so every sample's noise moves
    the whole map, not only the attention) + positions; with `flow_attention`, J flow-attention
    levels read the other noise tokens; O^J (or O^0 without them, a plain decoder) is decoded.
    """

    def __init__(
        self, embed_dim: int, levels: int, flow_depth: int, flow_attention: bool,
        input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
    ) -> None:  # fmt: skip
        super().__init__()
        c, h, w = input_size
        self.size, self.flow_attention = (h, w), flow_attention
        self.cond = nn.Linear(embed_dim, GRID * GRID * embed_dim)
        self.noise = nn.Linear(embed_dim, GRID * GRID * embed_dim)
        self.pos = nn.Parameter(torch.randn(1, GRID * GRID, embed_dim) * 0.02)
        heads = 4 if embed_dim % 4 == 0 else 1
        self.levels = nn.ModuleList(
            FlowAttentionLevel(embed_dim, flow_depth, heads) for _ in range(levels if flow_attention else 0)
        )
        ups = max(0, math.ceil(math.log2(max(h, w) / GRID)))
        ch = DECODER_CHANNELS
        blocks: list[nn.Module] = [nn.Conv2d(embed_dim, ch, 3, padding=1)]
        for _ in range(ups):
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(4, ch),
                       nn.LeakyReLU(0.2)]  # fmt: skip
        blocks += [nn.Conv2d(ch, c, 3, padding=1), nn.Tanh()]
        self.decode = nn.Sequential(*blocks)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, cond: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """cond (B, D), z (B, LATENT_TOKENS, D) -> normalized images (B, C, H, W)."""
        b, d = cond.shape
        o = (self.cond(cond) + self.noise(z[:, 0])).view(b, GRID * GRID, d) + self.pos
        for level in self.levels:
            o = level(o, z[:, 1:])
        x = self.decode(o.transpose(1, 2).reshape(b, d, GRID, GRID))
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized (B, C, H, W) -> uint8 RGB (B, 3, H, W)."""
        img = (x * self.std + self.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img
