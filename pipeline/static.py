"""Static-embedding students: build one (`gist static-student`), and train it with `gist train`.

A static student is a sentence-transformers model whose first module is a `StaticEmbedding`: an
`nn.EmbeddingBag` that averages trained token vectors (model2vec, sentence-transformers' static
recipe). A step costs milliseconds, so a guide run online would dominate training by two orders of
magnitude; sentence-transformers' `GISTEmbedLoss` refuses such a student outright ("Both the training
model and the guiding model must use a PreTrainedTokenizer"). With the guide's verdicts stored by
stage 1 a guided step costs what an MNRL step costs.

What is different for a static student, and handled here:

- building one: `make_static_student` distils any local sentence-transformers / transformers model
  with model2vec (`StaticEmbedding.from_distillation`, the optional `static` extra), or initialises
  token vectors at random from a tokenizer, as sentence-transformers' static-embedding recipe does;
- similarities: `StaticGuidedMaskLoss` computes cosines as normalize-and-matmul (MNRL's way). The
  broadcast cosine of `GuidedMaskLoss` reproduces `GISTEmbedLoss`'s values to the bit, which matters
  only where `GISTEmbedLoss` can run; for a static student the similarities are most of the step, and
  the matmul is several times cheaper. Same loss to float32 noise (tests/test_static.py);
- GradCache: a `StaticEmbedding` batch is a flat token stream with offsets and no batch dimension, so
  sentence-transformers' cached losses refuse it. `CachedStaticGuidedMaskLoss` and
  `CachedStaticMultipleNegativesRankingLoss` pad it to rows for the mini-batch split and flatten each
  mini-batch back before embedding it;
- options without meaning: a static model has no sequence length and no activations to recompute, so
  `--max-seq-length` and `--gradient-checkpointing` are refused with one line (`check_static_settings`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import GistError
from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss
from pipeline.outputs import Kind, Output

INITS = ("distill", "random")
STATIC_RECORD = "gist_static.json"  # how the static student was made; the output's kind record
STATIC_STUDENT = Kind("static-student", directory=True, record=STATIC_RECORD, owned=(
    STATIC_RECORD, "modules.json", "config_sentence_transformers.json", "README.md", "model.safetensors", "tokenizer.json", "0_StaticEmbedding",
))
EXTRA_HINT = "pip install 'gist[static]' (model2vec and skeletoken)"


def is_static(model) -> bool:
    """Whether `model` embeds its inputs with a StaticEmbedding (directly or behind a Router)."""
    from sentence_transformers.base.losses.gradcache import has_static_embedding_input

    return has_static_embedding_input(model)


def check_static_settings(model, settings) -> None:
    """Refuse, in one line, `gist train` options that have no meaning for a static student."""
    if not is_static(model):
        return
    if settings.max_seq_length:
        raise GistError(f"--max-seq-length {settings.max_seq_length}: the student is a static embedding model (StaticEmbedding), which averages "
                        "the vectors of every token of a text and has no sequence length; leave the option out")
    if settings.gradient_checkpointing:
        raise GistError("--gradient-checkpointing: the student is a static embedding model (StaticEmbedding): it keeps no activations to "
                        "recompute (its memory is its token table and the similarity matrices); leave the option out")
    if not settings.default_objective:
        raise GistError("--directions/--partition-mode/--hardness-mode: a static student trains with StaticGuidedMaskLoss, which has "
                        "GISTEmbedLoss's objective only; leave them at their defaults")


# --- building a static student ---------------------------------------------------------------------------


def _tokenizer(source: Path):
    """The fast tokenizer of `source`: a tokenizer.json file, or a model directory holding one."""
    from tokenizers import Tokenizer

    path = source if source.is_file() else source / "tokenizer.json"
    if not path.is_file():
        raise GistError(f"{source}: no tokenizer.json (give a model directory with a fast tokenizer, or a tokenizer.json file)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise GistError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tokenizer.no_truncation()  # a static model has no length limit: every token of a text counts
    return tokenizer


def _distilled(source: Path, dim: int, device: str):
    """StaticEmbedding.from_distillation (model2vec) of the local model `source`, PCA to `dim`."""
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    if not (source / "config.json").is_file():
        raise GistError(f"{source}: --init distill needs a local transformers model directory (with config.json); "
                        "for a tokenizer alone use --init random")
    try:
        import model2vec.distill  # noqa: F401
    except ImportError as e:
        raise GistError(f"--init distill needs model2vec's distillation ({e}); {EXTRA_HINT}, or use --init random") from None
    from pipeline.guide import resolve_device

    st_logger = logging.getLogger("sentence_transformers.sentence_transformer.modules.static_embedding")
    level = st_logger.level
    st_logger.setLevel(logging.ERROR)  # it warns about arguments (apply_zipf, use_subword) newer model2vec versions dropped
    try:
        return StaticEmbedding.from_distillation(str(source), device=resolve_device(device), pca_dims=dim)
    except (OSError, ValueError) as e:
        raise GistError(f"{source}: model2vec distillation failed ({str(e).splitlines()[0]})") from None
    finally:
        st_logger.setLevel(level)


def make_static_student(source: str | Path, out: str | Path, *, init: str = "distill", dim: int = 256, seed: int = 0,
                        device: str = "auto", overwrite: bool = False) -> Path:
    """Write a static-embedding student (a sentence-transformers model: StaticEmbedding only) to OUT.

    init "distill": model2vec distillation of the local model SOURCE (every vocabulary token embedded
    by SOURCE, PCA to `dim`, Zipf/SIF weighting); needs the `static` extra. init "random": token
    vectors drawn from N(0, 1) (torch seed `seed`) over the vocabulary of SOURCE's tokenizer (a model
    directory or a tokenizer.json), as sentence-transformers' static-embedding recipe starts. No Hub
    access either way. Returns OUT; `gist train --student OUT` trains it.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    from pipeline import artifacts
    from pipeline.guide import model_identity

    source, out = Path(source), Path(out)
    if init not in INITS:
        raise GistError(f"--init {init}: use one of {', '.join(INITS)}")
    if dim < 1:
        raise GistError(f"--dim {dim}: must be positive")
    if not source.exists():
        raise GistError(f"{source}: no such model directory or tokenizer file")
    output = Output(out, STATIC_STUDENT, inputs={"SOURCE": source}, overwrite=overwrite)
    output.check()
    if init == "distill":
        if not source.is_dir():
            raise GistError(f"{source}: --init distill needs a model directory")
        module = _distilled(source, dim, device)
    else:
        tokenizer = _tokenizer(source)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            module = StaticEmbedding(tokenizer, embedding_dim=dim, base_model=str(source))
        finally:
            torch.random.set_rng_state(generator_state)
    model = SentenceTransformer(modules=[module], device="cpu")
    identity = model_identity(str(source)) if source.is_dir() else {"path": str(source.resolve()), "name": source.name}
    record = {"kind": STATIC_STUDENT.name, "source": identity, "init": init, "dim": module.embedding_dim, "vocab_size": module.num_embeddings,
              "seed": seed if init == "random" else None, "model2vec": _version("model2vec") if init == "distill" else None}
    with output.stage() as stage:
        model.save(str(stage.dir))
        artifacts.write_json(stage.dir / STATIC_RECORD, record)
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def static_record(path: str | Path) -> dict | None:
    """What `gist static-student` recorded about the model at `path` (None for another model)."""
    record = Path(path) / STATIC_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


# --- losses -----------------------------------------------------------------------------------------------


def unit_cosine(x: Tensor, y: Tensor) -> Tensor:
    """(n, m) cosine similarities as normalize-and-matmul (MNRL's `cos_sim`; norms clamped at 1e-8 as `GuidedMaskLoss`'s)."""
    return F.normalize(x, dim=-1, eps=1e-8) @ F.normalize(y, dim=-1, eps=1e-8).T


class StaticGuidedMaskLoss(GuidedMaskLoss):
    """GuidedMaskLoss with matmul cosines, for static students (see the module docstring): the same
    candidates, masks, temperature and cross-entropy; similarities differ from the broadcast cosine by
    float32 rounding only."""

    def sim_matrix(self, embed1: Tensor, embed2: Tensor) -> Tensor:
        return unit_cosine(embed1, embed2)


def padded_static_features(features: dict[str, Tensor]) -> dict[str, Tensor]:
    """A StaticEmbedding batch (flat `input_ids`, `offsets`) as rows: (B, L) ids and attention mask."""
    ids, offsets = features["input_ids"], features["offsets"]
    rows = offsets.numel()
    lengths = torch.diff(offsets, append=torch.tensor([ids.numel()], dtype=offsets.dtype, device=offsets.device))
    width = max(1, int(lengths.max())) if rows else 1
    mask = torch.arange(width, device=ids.device)[None] < lengths[:, None]
    padded = torch.zeros(rows, width, dtype=ids.dtype, device=ids.device)
    padded[mask] = ids  # row-major: each row's tokens in order
    return {"input_ids": padded, "attention_mask": mask.long()}


def flat_static_features(features: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `padded_static_features` (for any slice of its rows)."""
    mask = features["attention_mask"].bool()
    lengths = mask.sum(1)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
    return {"input_ids": features["input_ids"][mask], "offsets": offsets}


class StaticMiniBatches:
    """GradCache over a StaticEmbedding student: the batch is padded to rows (which sentence-transformers'
    mini-batch split needs) and each mini-batch is flattened back before the model embeds it."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return super().forward([padded_static_features(f) for f in sentence_features], labels)

    def embed_minibatch(self, sentence_feature, begin, end, with_grad, copy_random_state, random_state=None):
        from sentence_transformers.base.losses.gradcache import RandContext, _create_minibatch

        minibatch = flat_static_features(_create_minibatch(sentence_feature, begin, end))
        with nullcontext() if random_state is None else random_state:
            with nullcontext() if with_grad else torch.no_grad():
                random_state = RandContext(*minibatch.values()) if copy_random_state else None
                reps = self.model(minibatch)["sentence_embedding"]
        return reps, random_state


class CachedStaticGuidedMaskLoss(StaticMiniBatches, CachedGuidedMaskLoss):
    """CachedGuidedMaskLoss for a static student (matmul cosines, mini-batches split as StaticMiniBatches)."""

    def sim_matrix(self, embed1: Tensor, embed2: Tensor) -> Tensor:
        return unit_cosine(embed1, embed2)


@contextmanager
def _static_check_off():
    """sentence-transformers' CachedMultipleNegativesRankingLoss refuses a StaticEmbedding model because
    its batch cannot be split; StaticMiniBatches splits it, so the check is skipped while it is built."""
    from sentence_transformers.sentence_transformer.losses import cached_multiple_negatives_ranking as cached

    check = cached.has_static_embedding_input
    cached.has_static_embedding_input = lambda model: False
    try:
        yield
    finally:
        cached.has_static_embedding_input = check


def _cached_mnrl_class():
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    class CachedStaticMultipleNegativesRankingLoss(StaticMiniBatches, CachedMultipleNegativesRankingLoss):
        """CachedMultipleNegativesRankingLoss for a static student (mini-batches split as StaticMiniBatches)."""

        def __init__(self, model, **kwargs):
            with _static_check_off():
                super().__init__(model, **kwargs)

    return CachedStaticMultipleNegativesRankingLoss


def cached_static_mnrl(model, **kwargs):
    """sentence-transformers' CachedMultipleNegativesRankingLoss over a static student."""
    return _cached_mnrl_class()(model, **kwargs)


def static_student_loss(model, masks, settings):
    """The contrastive loss of `settings` (a TrainSettings) for a static student, before any MatryoshkaLoss:
    the static classes where the guided loss or GradCache differ; None for a transformer student, and
    where the transformer's loss serves as is (MNRL; --distill, whose loss is built on GuidedMaskLoss)."""
    if not is_static(model):
        return None
    guided = settings.loss in ("guided", "none")
    if settings.distill:
        return None  # DistilledLoss over GuidedMaskLoss: correct as is (its step is the distillation's)
    if settings.loss == "mnrl":
        return cached_static_mnrl(model, scale=1.0 / settings.temperature, mini_batch_size=settings.mini_batch_size,
                                  gather_across_devices=True) if settings.mini_batch_size else None
    if settings.mini_batch_size:
        return CachedStaticGuidedMaskLoss(model, masks, temperature=settings.temperature, mini_batch_size=settings.mini_batch_size, guided=guided)
    return StaticGuidedMaskLoss(model, masks, temperature=settings.temperature, guided=guided)
