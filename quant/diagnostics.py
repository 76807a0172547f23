"""Pool diagnostics: what a calibration pool makes the classifier see, measured against real images.

For a pool (any source `--calib` takes: a dfq pool, an ImageFolder, a tar, an .npz, `noise`) and an
optional reference (real images), through the model's own preprocessing (`quant.data`):

- the classifier's penultimate features (the input of its final Linear, by a forward hook) and
  its predictions;
- the Fréchet distance of the pool's features to the reference's, overall and per class
  (mixup-class prompting's feature-distribution argument, arXiv 2507.21947 Fig. 4), and a 2-D t-SNE
  embedding of both;
- intra-class diversity: the mean pairwise cosine of the features within each class and overall,
  and the similarity matrix with samples sorted by class (EnhancingDFQ's Fig. 4);
- prompt fidelity: the share of samples whose top-5 holds a class they were prompted with (a pool
  record's `class_ids`, SHARDS.md; a labelled source's label);
- class coverage and the histogram of predicted classes.

A sample's class is its pool record's first class (or its folder / array label) where it has one,
else the class the model predicts. `diagnose` returns the report as a dict and, given a directory,
writes it as `index.html` (one self-contained page, figures embedded) and `report.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD, build_transform, iter_labelled, noise_calibration
from .diagnostics_report import write_report
from .errors import QuantError
from .feature_stats import class_similarity, frechet_distance, mean_of, per_class_frechet, subsample_indices
from .quantizers import check_device

FORMAT = "dfq-pool-diagnostics/1"
NOISE = "noise"


@dataclass(frozen=True)
class DiagnosticsSettings:
    """How much of each source is read and what the report shows."""

    #: images read from each source (a pool's first; other sources a seeded draw, as `--calib`)
    n_images: int = 1024
    batch_size: int = 256
    #: points of each set in the t-SNE embedding (0: no embedding)
    embed: int = 500
    #: samples of each set in the similarity-matrix picture
    matrix: int = 256
    #: images of each set shown in the report
    thumbnails: int = 32
    #: the k of prompt fidelity's top-k
    top_k: int = 5
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_images", "batch_size", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QuantError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("embed", "matrix", "thumbnails", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise QuantError(f"{name} must be an integer >= 0, got {v!r}")
        check_device(self.device)


@dataclass
class FeatureSet:
    """One source as the model sees it: per sample its penultimate features, class probabilities,
    label (-1: none), prompted classes (empty: none) and class (label, else prediction)."""

    role: str
    source: str
    features: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    prompted: list[list[int]]
    label_source: str
    thumbnails: np.ndarray = field(repr=False)  # (k, H, W, 3) in [0, 1]

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def classes(self) -> np.ndarray:
        return np.where(self.labels >= 0, self.labels, self.predicted)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's final classifier Linear: timm's `get_classifier()`, else the last `nn.Linear`
    registered."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise QuantError("the model has no nn.Linear classifier to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(
    model: nn.Module, batches: Iterable[torch.Tensor], device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of `batches`: the input of the final classifier Linear (flattened; its
    last call in a forward) and the model's output, as float32 arrays."""
    head = classifier_layer(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    feats, logits = [], []
    try:
        for batch in batches:
            seen.clear()
            out = model(batch.to(device))
            if not seen:
                raise QuantError("the classifier Linear was not called in the forward pass")
            feats.append(seen[-1].reshape(len(batch), -1).float().cpu())
            logits.append(out.reshape(len(batch), -1).float().cpu())
    finally:
        handle.remove()
    if not feats:
        raise QuantError("no images to take features of")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _items(
    source: str, data_config: dict, n: int, seed: int
) -> Iterator[tuple[torch.Tensor, int, dict | None]]:
    if source == NOISE:
        for image in noise_calibration(n, data_config.get("input_size", (3, 224, 224)), seed=seed):
            yield image, -1, None
        return
    yield from iter_labelled(source, build_transform(data_config), n, seed=seed)


def _display(images: torch.Tensor, data_config: dict) -> np.ndarray:
    """Preprocessed images back to [0, 1] RGB (N, H, W, 3) for a picture."""
    mean = torch.tensor(data_config.get("mean") or IMAGENET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(data_config.get("std") or IMAGENET_STD).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _prompted(record: dict | None, label: int) -> list[int]:
    """The classes a sample was made for: its record's `class_ids`, else its label (none: [])."""
    if record is not None and isinstance(record.get("class_ids"), list):
        return [int(c) for c in record["class_ids"]]
    return [label] if label >= 0 else []


def read_set(
    role: str, model: nn.Module, data_config: dict, source: str, settings: DiagnosticsSettings
) -> FeatureSet:
    """Read up to `settings.n_images` images of `source` and take the model's view of them."""
    labels: list[int] = []
    prompted: list[list[int]] = []
    records = 0
    thumbs: list[torch.Tensor] = []

    def batches() -> Iterator[torch.Tensor]:
        nonlocal records
        batch: list[torch.Tensor] = []
        for image, label, record in _items(source, data_config, settings.n_images, settings.seed):
            labels.append(label)
            prompted.append(_prompted(record, label))
            records += record is not None
            if len(thumbs) < settings.thumbnails:
                thumbs.append(image)
            batch.append(image)
            if len(batch) == settings.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    features, logits = penultimate_features(model, batches(), settings.device)
    label_array = np.asarray(labels, dtype=np.int64)
    label_source = "records" if records else ("labels" if (label_array >= 0).any() else "predicted")
    return FeatureSet(
        role=role,
        source=str(source),
        features=features,
        probs=torch.softmax(torch.from_numpy(logits), dim=1).numpy(),
        labels=label_array,
        prompted=prompted,
        label_source=label_source,
        thumbnails=_display(torch.stack(thumbs), data_config) if thumbs else np.zeros((0, 1, 1, 3)),
    )


def prompt_fidelity(probs: np.ndarray, prompted: list[list[int]], top_k: int) -> dict | None:
    """Shares of the samples with prompted classes whose top-1 is one of them and whose top-k holds
    one (None when no sample has any)."""
    rows = [i for i, p in enumerate(prompted) if p]
    if not rows:
        return None
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs[rows], axis=1)[:, :k]
    hit_k = [bool(set(top[j]) & set(prompted[i])) for j, i in enumerate(rows)]
    hit_1 = [int(top[j, 0]) in prompted[i] for j, i in enumerate(rows)]
    return {"n": len(rows), "top1": float(np.mean(hit_1)), "top_k": float(np.mean(hit_k)), "k": k}


def _histogram(values: np.ndarray, num_classes: int) -> list[int]:
    inside = values[(values >= 0) & (values < num_classes)]
    return np.bincount(inside, minlength=num_classes).astype(int).tolist()


def _entropy(counts: list[int]) -> float:
    """Entropy of the histogram divided by log(classes): 1 = every class equally often."""
    p = np.asarray(counts, dtype=np.float64)
    if p.sum() == 0 or len(p) < 2:
        return 0.0
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def set_summary(fs: FeatureSet, num_classes: int, top_k: int) -> dict:
    """Diversity, prompt fidelity, coverage and the prediction histogram of one set."""
    predicted = _histogram(fs.predicted, num_classes)
    labelled = fs.labels[fs.labels >= 0]
    out = {
        "source": fs.source,
        "n": len(fs.features),
        "label_source": fs.label_source,
        "diversity": class_similarity(fs.features, fs.classes),
        "fidelity": prompt_fidelity(fs.probs, fs.prompted, top_k),
        "coverage": {
            "num_classes": num_classes,
            "predicted_classes": int(sum(c > 0 for c in predicted)),
            "predicted_entropy": _entropy(predicted),
            "labelled_classes": int(len(np.unique(labelled))) if len(labelled) else None,
            "labels_outside_model": int(((labelled < 0) | (labelled >= num_classes)).sum()),
        },
        "confidence": float(fs.probs.max(axis=1).mean()),
        "prediction_histogram": predicted,
        "label_histogram": _histogram(fs.labels, num_classes) if len(labelled) else None,
    }
    return out


def compare_sets(pool: FeatureSet, reference: FeatureSet) -> dict:
    """Fréchet distance of the pool's features to the reference's, overall and per class."""
    if pool.features.shape[1] != reference.features.shape[1]:
        raise QuantError("the pool's and the reference's features differ in size")
    if len(pool.features) < 2 or len(reference.features) < 2:
        raise QuantError("the Fréchet distance needs at least 2 images in the pool and the reference")
    per_class = per_class_frechet(pool.features, pool.classes, reference.features, reference.classes)
    return {
        "overall": frechet_distance(pool.features, reference.features),
        "per_class": per_class,
        "mean_per_class": mean_of(per_class),
    }


def embed_sets(sets: list[FeatureSet], per_set: int, seed: int) -> dict:
    """A 2-D t-SNE of up to `per_set` samples of each set, fitted jointly (PCA to 50 dimensions
    first when the features have more): {role: {"xy", "classes"}}."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        raise QuantError("the embedding needs scikit-learn: pip install 'dfq[diagnostics]'") from None
    picks = [subsample_indices(len(fs.features), per_set, seed) for fs in sets]
    data = np.concatenate([fs.features[idx] for fs, idx in zip(sets, picks)]).astype(np.float64)
    if len(data) < 4:
        raise QuantError(f"the embedding needs at least 4 images, got {len(data)}")
    if data.shape[1] > 50 and len(data) > 50:
        data = PCA(n_components=50, random_state=seed).fit_transform(data)
    perplexity = float(min(30.0, (len(data) - 1) / 3.0))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(data)
    out, start = {}, 0
    for fs, idx in zip(sets, picks):
        out[fs.role] = {
            "xy": np.round(xy[start : start + len(idx)], 4).tolist(),
            "classes": fs.classes[idx].tolist(),
        }
        start += len(idx)
    return {"method": "tsne", "perplexity": perplexity, "sets": out}


class _Stages:
    """Numbered progress lines, `[k/total] what`."""

    def __init__(self, total: int, say: Callable[[str], None] | None) -> None:
        self.total, self.done, self.say = total, 0, say or (lambda _msg: None)

    def __call__(self, what: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {what}")

    def note(self, what: str) -> None:
        self.say(f"      {what}")


@dataclass
class Diagnosis:
    """The report dict and the feature sets behind it (the pictures need the features)."""

    report: dict
    sets: list[FeatureSet]


def check_roles(others: Sequence[tuple[str, str]]) -> None:
    """Names of the extra sets: non-empty, distinct, and neither `pool` nor `reference`."""
    seen = {"pool", "reference"}
    for name, _ in others:
        if not name or name in seen:
            raise QuantError(f"set name {name!r} is empty or taken (pool, reference and each other name)")
        seen.add(name)


def run_diagnostics(
    model: nn.Module,
    data_config: dict,
    pool: str,
    reference: str | None = None,
    settings: DiagnosticsSettings | None = None,
    model_name: str | None = None,
    stage: Callable[[str], None] | None = None,
    others: Sequence[tuple[str, str]] = (),
) -> Diagnosis:
    """Every statistic of the module doc for `pool` (and `reference`), as a `Diagnosis`; `others`
    are further (name, source) sets measured the same way beside the pool, so one report ranks
    several pools against one reference. `stage` is called with a line as each stage starts."""
    s = settings or DiagnosticsSettings()
    check_roles(others)
    stage = stage or _Stages(0, None)
    model = model.eval().to(s.device)
    num_classes = int(data_config.get("num_classes") or classifier_layer(model).out_features)
    roles = [("pool", pool), *others] + ([("reference", reference)] if reference is not None else [])
    sets = []
    for role, source in roles:
        stage(f"{role}: features of up to {s.n_images} images of {source}")
        sets.append(read_set(role, model, data_config, source, s))
        if isinstance(stage, _Stages):
            stage.note(f"{len(sets[-1].features)} images, classes from {sets[-1].label_source}")
    report: dict = {
        "format": FORMAT,
        "model": model_name,
        "num_classes": num_classes,
        "feature_dim": int(sets[0].features.shape[1]),
        "settings": {"n_images": s.n_images, "embed": s.embed, "top_k": s.top_k, "seed": s.seed},
        "sets": [fs.role for fs in sets],
        "reference": None,
        "frechet": None,
        "frechet_of": None,
        "embedding": None,
    }
    stage("diversity, prompt fidelity, coverage")
    for fs in sets:
        report[fs.role] = set_summary(fs, num_classes, s.top_k)
    if reference is not None:
        stage("Fréchet distance, overall and per class")
        ref = sets[-1]
        report["frechet_of"] = {fs.role: compare_sets(fs, ref) for fs in sets[:-1]}
        report["frechet"] = report["frechet_of"]["pool"]
    if s.embed > 0:
        stage(f"t-SNE of up to {s.embed} images a set")
        report["embedding"] = embed_sets(sets, s.embed, s.seed)
    return Diagnosis(report, sets)


def diagnose(
    model: nn.Module,
    data_config: dict,
    pool: str,
    reference: str | None = None,
    settings: DiagnosticsSettings | None = None,
    report_dir: str | Path | None = None,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    others: Sequence[tuple[str, str]] = (),
) -> dict:
    """The diagnostics report of `pool` (against `reference` real images, if given; beside the
    named `others` sets) as a dict; with `report_dir`, also written there as `index.html` and
    `report.json` (their paths under `files`).

    `model` and `data_config` as `quant.models.load_model` returns them; `progress` gets a line
    per stage."""
    s = settings or DiagnosticsSettings()
    with_ref = reference is not None
    stages = _Stages(2 + len(others) + 2 * with_ref + (s.embed > 0) + (report_dir is not None), progress)
    diagnosis = run_diagnostics(model, data_config, pool, reference, s, model_name, stages, others)
    if report_dir is not None:
        stages(f"report: figures, {Path(report_dir) / 'index.html'}")
        write_report(diagnosis, Path(report_dir), s.matrix, s.seed)
    return diagnosis.report
