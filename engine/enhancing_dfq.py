"""Enhancing Diversity for Data-free Quantization (generator "enhancing-dfq").

A class-conditional generator is trained once per pool against the full-precision classifier
(`prepare`, in the driver), then sampled by the workers. The paper's parts, each switchable:

1. label embeddings (Eq. 3-5, `label_embed`): MLPs on J layers' pooled features learn, during the
   warm-up, to classify the generator's images (cross-entropy to the drawn label + KL to the
   classifier's own prediction); a class's embedding is the average of their last weight rows.
   Off: a random learnable embedding table (GDFQ).
2. mixer (Eq. 6, `mixer`): k classes (the run's `--k`) and Dirichlet weights lambda give a target
   embedding sum lambda_i E_i that queries all embeddings; the attention scores are the soft label
   (held to the lambda mix by a KL term) and weight the condition. Off: the lambda mix itself is the
   condition and soft label. k=1: no mixing.
3. flow attention (Eq. 7-9, `flow_attention`): per level j a normalizing flow maps Gaussian z to
   z^j, a transformer layer takes (O^{j-1}, z^j) to O^j; O^J is decoded to the input size.
4. losses (Eq. 10, 12): soft cross-entropy + SimLoss1 (`simloss1`) + the BN-statistics loss of
   GDFQ where the classifier has BN, else PSAQ-ViT's patch-similarity entropy (`bn_loss`).
5. our addition, a batch diversity term (`diversity_weight`): the mean cosine between the
   last-activation features of the batch's images. Without it the generator collapses onto nearly
   one image on the CIFAR-10 ResNet-20 (SimLoss1 alone cannot spread a batch that moves as one);
   its weight was chosen on held-out real images (docs/results.md). The noise reaches the
   generator twice: as a token map added to the condition's, and through the flow levels.

Determinism: every random draw is keyed, never a running state: the networks' initial weights by
the run seed, an iteration's classes/weights/noise by (run seed, iteration), a sample's by (run
seed, index) (engine.seeds). A checkpoint (nets, both optimizers, SimLoss1's moving averages, loss
history) is written atomically every `checkpoint_every` iterations and at the end, so a training
resumed after a kill ends, on CPU, with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.bn_distill import _KNOWN_VOCABS, _default_names
from engine.bn_distill_loss import BNStatsMatcher, bn_layers
from engine.classifier import Classifier
from engine.config import config_hash
from engine.enhancing_dfq_loss import (
    ClassCenters,
    pairwise_similarity,
    patch_similarity_entropy,
    soft_cross_entropy,
)
from engine.enhancing_dfq_nets import (
    LATENT_TOKENS,
    Generator,
    LabelEmbedder,
    Mixer,
    Taps,
    block_list,
    feature_layers,
    head_layer,
    pool,
)
from engine.enhancing_dfq_settings import EnhancingDFQSettings
from engine.errors import EngineError
from engine.pairing import ClassDraw, classifier_similarity, head_similarity, prepare_similarity
from engine.records import sample_record
from engine.seeds import EDFQ_INIT, EDFQ_SAMPLE, EDFQ_TRAIN
from engine.writer import fsync_dir, is_local, join, local_path

if TYPE_CHECKING:
    from engine.config import GenerateConfig

CHECKPOINT = "enhancing-dfq/checkpoint.pt"
SOFT_LABEL_MIN = 1e-3  # soft-label entries below this are left out of the sample record
CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------ draws
def draw(
    g: torch.Generator, k: int, num_classes: int, dim: int, pairing: ClassDraw | None = None
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """One sample's classes (k distinct, paired by `pairing`, default random), Dirichlet(1) mixing
    weights and noise (LATENT_TOKENS, dim)."""
    classes = (pairing or ClassDraw("random", num_classes, k))(g)
    e = -torch.rand(k, generator=g, dtype=torch.float64).clamp_min(1e-12).log()
    lam = (e / e.sum()).float()
    z = torch.randn(LATENT_TOKENS, dim, generator=g)
    return classes, lam, z


def train_hash(cfg: GenerateConfig) -> str:
    """What the trained generator depends on: the content settings, model, checkpoint, k and seed,
    and the pairing when it is not random (it trains on the classes it pairs; random leaves the hash
    of checkpoints made before pairings as it was)."""
    s = cfg.generator_settings(EnhancingDFQSettings)
    content = {"settings": s.content(), "model": cfg.model, "checkpoint": cfg.checkpoint, "k": cfg.k,
               "seed": cfg.seed}  # fmt: skip
    if cfg.pairing != "random":
        content["pairing"] = cfg.pairing
    return config_hash(content)


class Nets(nn.Module):
    """What is trained and shipped to the workers: embeddings, mixer, generator."""

    def __init__(self, s: EnhancingDFQSettings, dims: list[int], classifier: Classifier) -> None:
        super().__init__()
        self.embedder = LabelEmbedder(dims, classifier.num_classes, s.embed_dim, s.label_embed)
        self.mixer = Mixer(s.embed_dim)
        self.generator = Generator(
            s.embed_dim, len(dims), s.flow_depth, s.flow_attention, classifier.input_size, classifier.mean,
            classifier.std,
        )  # fmt: skip

    def condition(
        self, classes: torch.Tensor, lam: torch.Tensor, use_mixer: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(condition, soft label, lambda label) of a batch of class lists and their weights."""
        table = self.embedder.embeddings()
        mix = torch.zeros(classes.shape[0], table.shape[0], device=table.device).scatter_add(1, classes, lam)
        target = (lam.unsqueeze(-1) * table[classes]).sum(1)
        if not use_mixer:
            return target, mix, mix
        cond, scores = self.mixer(target, table)
        return cond, scores, mix


def build_nets(cfg: GenerateConfig, classifier: Classifier, dims: list[int]) -> Nets:
    s = cfg.generator_settings(EnhancingDFQSettings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EDFQ_INIT.seed(cfg.seed, 0))
        return Nets(s, dims, classifier)


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------ training
class Trainer:
    """Trains the nets of one run against the classifier; `run()` resumes from the checkpoint."""

    def __init__(
        self, cfg: GenerateConfig, classifier: Classifier, device: str | None = None, similarity: Any = None
    ) -> None:
        self.cfg, self.classifier = cfg, classifier
        self.s = cfg.generator_settings(EnhancingDFQSettings)
        self.device = _device(device or cfg.device)
        self.model = classifier.factory().to(self.device).eval().requires_grad_(False)
        if not 1 <= cfg.k <= classifier.num_classes:
            raise EngineError(f"k (classes per sample) must be in [1, {classifier.num_classes}], got {cfg.k}")
        self.layers = [m for _, m in feature_layers(self.model, self.s.layer_names())]
        self.head = head_layer(self.model)
        if similarity is None and cfg.pairing != "random":
            similarity = head_similarity(self.model)
        self.pairing = ClassDraw(cfg.pairing, classifier.num_classes, cfg.k, similarity)
        self.has_bn = bool(bn_layers(self.model))
        self.attn = [getattr(b, "attn", b) for _, b in block_list(self.model)] if not self.has_bn else []
        taps = Taps(self.layers, self.head)
        try:
            with torch.no_grad():
                logits = self.model(torch.zeros(2, *classifier.input_size, device=self.device))
            dims = [pool(o).shape[-1] for o in taps.outputs]
            feature_dim = taps.feature.shape[-1]
        finally:
            taps.close()
        if logits.shape[-1] != classifier.num_classes:
            raise EngineError(
                f"classifier gives {logits.shape[-1]} logits, num_classes is {classifier.num_classes}"
            )
        self.nets = build_nets(cfg, classifier, dims).to(self.device)
        gen_params = [*self.nets.generator.parameters(), *self.nets.mixer.parameters()]
        if not self.s.label_embed:
            gen_params.append(self.nets.embedder.table)
        self.opt_g = torch.optim.Adam(gen_params, lr=self.s.lr, betas=(0.5, 0.999))
        self.opt_m = torch.optim.Adam(self.nets.embedder.mlps.parameters(), lr=self.s.mlp_lr)
        self.centers = ClassCenters(classifier.num_classes, feature_dim, self.s.ema, self.device)
        self.iteration, self.done, self.history = 0, False, []
        self.url = join(cfg.out, CHECKPOINT)
        self.hash = train_hash(cfg)

    # -- checkpoint -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "train_hash": self.hash, "iteration": self.iteration, "done": self.done,
            "nets": self.nets.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_m": self.opt_m.state_dict(),
            "centers": self.centers.state(), "history": self.history,
        }  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        if state.get("train_hash") != self.hash:
            raise EngineError(f"{self.url} was trained with other settings; use a new --out")
        self.nets.load_state_dict(state["nets"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_m.load_state_dict(state["opt_m"])
        self.centers.load(state["centers"])
        self.iteration, self.done, self.history = state["iteration"], state["done"], list(state["history"])

    def save(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        data = buf.getvalue()
        write_atomic(self.url, data)
        return data

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> bytes:
        """Train to the end (or resume to it) and return the final checkpoint's bytes.
        `stop_after` (tests): raise after that many iterations of this call, as a kill would."""
        if self.s.threads and self.device.type == "cpu":
            before = torch.get_num_threads()
            torch.set_num_threads(self.s.threads)
            try:
                return self._run(stop_after)
            finally:
                torch.set_num_threads(before)
        return self._run(stop_after)

    def _run(self, stop_after: int | None) -> bytes:
        remove_stale_temps(self.url)
        saved = read_bytes(self.url)
        if saved is not None:
            self.load(torch.load(io.BytesIO(saved), map_location=self.device, weights_only=True))
            if self.done:
                return saved
            _log(f"enhancing-dfq: resuming training at iteration {self.iteration}/{self.s.iterations}")
        steps = 0
        while self.iteration < self.s.iterations:
            losses = self.step(self.iteration)
            self.iteration += 1
            self.history.append(losses)
            if self.iteration % self.s.log_every == 0 or self.iteration == self.s.iterations:
                _log(f"enhancing-dfq: iteration {self.iteration}/{self.s.iterations} "
                     + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))  # fmt: skip
            if self.iteration % self.s.checkpoint_every == 0 and self.iteration < self.s.iterations:
                self.save()
            steps += 1
            if stop_after is not None and steps >= stop_after:
                raise KeyboardInterrupt(f"stopped after {steps} iterations")
        self.done = True
        return self.save()

    def batch(self, it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = EDFQ_TRAIN.torch_generator(self.cfg.seed, it)
        draws = [
            draw(g, self.cfg.k, self.classifier.num_classes, self.s.embed_dim, self.pairing)
            for _ in range(self.s.train_batch)
        ]
        classes = torch.tensor([c for c, _, _ in draws], device=self.device)
        lam = torch.stack([lam for _, lam, _ in draws]).to(self.device)
        z = torch.stack([z for _, _, z in draws]).to(self.device)
        return classes, lam, z

    def step(self, it: int) -> dict[str, float]:
        s = self.s
        classes, lam, z = self.batch(it)
        taps = Taps(self.layers, self.head)
        attn = Taps(self.attn)
        try:
            with BNStatsMatcher(self.model) as bn:
                bn.reset()
                cond, soft, mix = self.nets.condition(classes, lam, s.mixer)
                x = self.nets.generator(cond, z)
                logits = self.model(x)
                losses = {"ce": soft_cross_entropy(logits, soft.detach())}
                if s.mixer:
                    losses["mix"] = F.kl_div(soft.clamp_min(1e-12).log(), mix, reduction="batchmean")
                if s.simloss1:
                    losses["sim1"] = self.centers.loss(taps.feature, soft.detach())
                if s.diversity_weight > 0:
                    losses["div"] = pairwise_similarity(taps.feature)
                if s.bn_loss and self.has_bn:
                    losses["bn"] = bn.loss()
                elif s.bn_loss:
                    losses["patch"] = -torch.stack([patch_similarity_entropy(t) for t in attn.outputs]).mean()
            weights = {"ce": s.ce_weight, "mix": 1.0, "sim1": s.sim_weight, "bn": s.stats_weight,
                       "patch": s.stats_weight, "div": s.diversity_weight}  # fmt: skip
            total = sum(weights[k] * v for k, v in losses.items())
            self.opt_g.zero_grad(set_to_none=True)
            total.backward()
            self.opt_g.step()
            if s.simloss1:
                self.centers.update(taps.feature.detach(), soft.detach())
            if s.label_embed and it < s.warmup:
                losses["mlp"] = self.train_mlps([o.detach() for o in taps.outputs], logits.detach(), mix)
        finally:
            taps.close()
            attn.close()
        return {k: float(v.detach()) for k, v in losses.items()}

    def train_mlps(
        self, outputs: list[torch.Tensor], logits: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 3-5: each MLP learns the drawn label and the classifier's own prediction (KL)."""
        teacher = logits.softmax(-1)
        loss = torch.stack([
            soft_cross_entropy(out, label) + F.kl_div(F.log_softmax(out, -1), teacher, reduction="batchmean")
            for out in self.nets.embedder.logits([pool(o) for o in outputs])
        ]).mean()  # fmt: skip
        self.opt_m.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_m.step()
        return loss.detach()


# ------------------------------------------------------------------------------ sampling
class EnhancingDFQGenerator:
    """The registry's factory: a worker's sampler of the trained generator (`edfq_state` context)."""

    @classmethod
    def check(cls, cfg: GenerateConfig, classifier: Classifier | None = None, **_: Any) -> None:
        """Before anything is written: k against the class count, the feature layers and head exist."""
        if classifier is None:
            raise EngineError(
                "enhancing-dfq needs the classifier (the `classifier` context) from the CLI layer"
            )
        if not 1 <= cfg.k <= classifier.num_classes:
            raise EngineError(f"k (classes per sample) must be in [1, {classifier.num_classes}], got {cfg.k}")
        model = classifier.factory()
        feature_layers(model, cfg.generator_settings(EnhancingDFQSettings).layer_names())
        head_layer(model)

    @classmethod
    def prepare(cls, cfg: GenerateConfig, classifier: Classifier | None = None, **_: Any) -> dict[str, Any]:
        """Once per run, in the driver: train (or resume, or reuse) the generator; its bytes go to
        workers, with the classifier's class similarity when the pairing needs one (engine.pairing)."""
        if classifier is None:
            raise EngineError(
                "enhancing-dfq needs the classifier (the `classifier` context) from the CLI layer"
            )
        out = prepare_similarity(cfg, classifier)
        return {**out, "edfq_state": Trainer(cfg, classifier, similarity=out.get("similarity")).run()}

    def __init__(
        self, cfg: GenerateConfig, *, classifier: Classifier | None = None, edfq_state: bytes | None = None,
        device: str | None = None, similarity: Any = None, **_: Any,
    ) -> None:  # fmt: skip
        if classifier is None or edfq_state is None:
            raise EngineError(
                "enhancing-dfq needs the classifier and the trained state (run through prepare)"
            )
        self.cfg, self.classifier = cfg, classifier
        self.s = cfg.generator_settings(EnhancingDFQSettings)
        self.device = _device(device or cfg.device)
        state = torch.load(io.BytesIO(edfq_state), map_location="cpu", weights_only=True)
        if state["train_hash"] != train_hash(cfg) or not state["done"]:
            raise EngineError(
                "the enhancing-dfq state handed to the worker is not this run's finished training"
            )
        dims = [state["nets"][f"embedder.mlps.{j}.0.weight"].shape[1] for j in range(_levels(state["nets"]))]
        self.nets = build_nets(cfg, classifier, dims)
        self.nets.load_state_dict(state["nets"])
        self.nets.to(self.device).eval().requires_grad_(False)
        if similarity is None and cfg.pairing != "random":
            similarity = classifier_similarity(classifier)
        self.pairing = ClassDraw(cfg.pairing, classifier.num_classes, cfg.k, similarity)
        self.vocab = cfg.vocab or _KNOWN_VOCABS.get(classifier.num_classes, "file:none")
        self.names = _default_names(self.vocab, classifier.num_classes)
        batch = cfg.batch_size
        self.batch_size = batch if isinstance(batch, int) and not isinstance(batch, bool) else 8

    def generate(self, indices: Sequence[int]) -> list[tuple[Image.Image, dict[str, Any]]]:
        out: list[tuple[Image.Image, dict[str, Any]]] = []
        for start in range(0, len(indices), self.batch_size):
            chunk = [int(i) for i in indices[start : start + self.batch_size]]
            out += self._generate(chunk)
        return out

    @torch.no_grad()
    def _generate(self, indices: list[int]) -> list[tuple[Image.Image, dict[str, Any]]]:
        draws = [self.draw(i) for i in indices]
        classes = torch.tensor([c for c, _, _ in draws], device=self.device)
        lam = torch.stack([lam for _, lam, _ in draws]).to(self.device)
        z = torch.stack([z for _, _, z in draws]).to(self.device)
        cond, soft, _ = self.nets.condition(classes, lam, self.s.mixer)
        images = self.nets.generator.to_uint8(self.nets.generator(cond, z))
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        soft_rows = soft.cpu().tolist()
        return [
            (Image.fromarray(a, "RGB"), self.sample_json(i, c, lam_i.tolist(), row))
            for a, i, (c, lam_i, _), row in zip(arrays, indices, draws, soft_rows)
        ]

    def draw(self, index: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        g = EDFQ_SAMPLE.torch_generator(self.cfg.seed, index)
        return draw(g, self.cfg.k, self.classifier.num_classes, self.s.embed_dim, self.pairing)

    def sample_json(
        self, index: int, classes: list[int], lam: list[float], soft: list[float]
    ) -> dict[str, Any]:
        """SHARDS.md's record plus `soft_label` ({class id: weight >= 0.001}) and `mix_weights`."""
        _, height, width = self.classifier.input_size
        names = [self.names[c] for c in classes]
        return sample_record(
            index, generator="enhancing-dfq", model=str(self.cfg.model),
            prompt="enhancing-dfq: " + " and ".join(names), class_ids=classes, class_names=names,
            vocab=self.vocab, k=self.cfg.k, pairing=self.cfg.pairing, seed=EDFQ_SAMPLE.seed(self.cfg.seed, index),
            run_seed=self.cfg.seed, steps=self.s.iterations, width=width, height=height,
            soft_label={c: round(w, 6) for c, w in enumerate(soft) if w >= SOFT_LABEL_MIN},
            mix_weights=[round(w, 6) for w in lam],
        )  # fmt: skip


def _levels(nets_state: dict[str, torch.Tensor]) -> int:
    return len({key.split(".")[2] for key in nets_state if key.startswith("embedder.mlps.")})


# ------------------------------------------------------------------------------ files
def read_bytes(url: str) -> bytes | None:
    if is_local(url):
        path = local_path(url)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path) if fs.exists(path) else None


def remove_stale_temps(url: str) -> None:
    """Delete the temp files a killed checkpoint write left (local outputs; the lock is held)."""
    if not is_local(url):
        return
    path = local_path(url)
    folder, stem = os.path.dirname(path), os.path.basename(path) + ".tmp-"
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(stem):
                os.remove(os.path.join(folder, name))


def write_atomic(url: str, data: bytes) -> None:
    """Write `data` to `url` whole or not at all: a temp name in the same directory, fsync, rename."""
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fsync_dir(folder)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    tmp = path + ".tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["EnhancingDFQGenerator", "Trainer", "draw", "train_hash"]
