"""Teacher distillation from the stored guide pass: the guide's embeddings as labels, by example id.

sentence-transformers' distillation losses (`EmbedDistillLoss`, `MSELoss`, `DistillKLDivLoss`, ...)
expect teacher outputs precomputed into the dataset's labels. A gist guide pass already holds the
guide's embedding of every text, so the labels are a lookup: `GuideTeacher` maps the example ids
that the planned dataset carries as labels to the stored embeddings of each example's columns. No
guide is loaded, nothing is re-encoded, the dataset keeps its example ids (the masks need them).

- `TeacherLabelLoss(loss, teacher)`: any sentence-transformers loss that takes teacher embeddings as
  labels, fed from the pass (distillation alone, `gist train --loss none --distill embed`).
- `DistilledLoss(contrastive, teacher, kind, weight)`: GuidedMaskLoss (guided or unguided) plus
  `weight` x a distillation term from one student forward: `embed` (EmbedDistillLoss, cosine, with
  a learned projection when the dimensions differ) or `kl` (in-batch score distillation: the KL
  divergence from the guide's softmax over the batch's candidates [ap, aa, pp, an] to the student's,
  both at the loss temperature, with the masked candidates left out of both).

The learned projection of `embed` is a module of the student (`GuideProjection`), not of the loss as
in EmbedDistillLoss: what the trainer wraps in DDP and writes into checkpoints is the model, so only
there are its gradients all-reduced under torchrun and its weights restored by --resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.base.modules.dense import Dense
from torch import Tensor, nn

from pipeline import GistError
from pipeline.guide import gather
from pipeline.masks import PlannedMasks, check_planned_from

DISTILL_KINDS = ("embed", "kl")


class GuideTeacher:
    """The stored guide embeddings of every example's texts, looked up by example id (no model loaded).

    Args:
        guide_dir: a finished `precompute-guide` directory; its examples must be the training data's
            (their fingerprint is checked against the masks' by `for_masks`).
    """

    def __init__(self, guide_dir: str | Path):
        from pipeline.guide import load_guide_pass

        self.guide_dir = Path(guide_dir)
        self.manifest, data, embeddings = load_guide_pass(self.guide_dir)
        self.fingerprint = data.fingerprint
        self.embeddings = embeddings  # (stored rows, dim), read-only
        # Each column's stored row: the anchor's query view, the others' document view (pipeline.views).
        self.rows = np.column_stack([data.rows.anchor, data.rows.positive, data.rows.negative])  # (N, columns)
        self.dim = int(embeddings.shape[1])

    @classmethod
    def for_masks(cls, masks: PlannedMasks) -> GuideTeacher:
        """The guide pass that `masks` were planned from: its own directory, or a plan's `guide_dir`."""
        from pipeline.artifacts import read_manifest

        where = Path(masks.path).parent
        try:
            manifest = read_manifest(where)
        except GistError:
            raise GistError(f"--distill needs the guide pass of {masks.path}: no manifest.json beside it") from None
        teacher = cls(where if manifest.get("kind") == "guide-pass" else manifest["guide_dir"])
        if teacher.fingerprint != masks.meta["dataset_fingerprint"]:
            raise GistError(f"{teacher.guide_dir}: its examples are not the data the masks were planned on (fingerprints differ)")
        check_planned_from(masks, teacher.manifest, teacher.guide_dir)  # the teacher's vectors are those the masks came from
        return teacher

    def labels(self, example_ids: Tensor, columns: int) -> Tensor:
        """(batch, columns, dim) float32 guide embeddings of the examples' first `columns` texts."""
        ids = np.asarray(example_ids.cpu() if isinstance(example_ids, Tensor) else example_ids, dtype=np.int64)
        return torch.from_numpy(gather(self.embeddings, self.rows[ids, :columns]))


class TeacherLabelLoss(nn.Module):
    def __init__(self, loss: nn.Module, teacher: GuideTeacher) -> None:
        """
        Feeds a sentence-transformers distillation loss the guide's stored embeddings as its labels.

        The training dataset's ``label`` column holds example ids (as for GuidedMaskLoss); each batch's
        ids are replaced by the (batch, columns, dim) teacher embeddings that ``loss`` expects, as if
        they had been precomputed into the dataset with ``teacher.encode``.

        A projection that lives on ``loss`` (``EmbedDistillLoss(projection_dim=...)``) is neither
        all-reduced under torchrun nor checkpointed by the trainer; ``DistilledLoss(kind="embed")``
        keeps its projection in the student instead.

        Args:
            loss: e.g. ``EmbedDistillLoss(student, projection_dim=teacher.dim)`` or ``MSELoss(student)``.
            teacher: the guide pass's embeddings (``GuideTeacher``).

        Example:
            ::

                teacher = GuideTeacher("runs/guide")
                loss = TeacherLabelLoss(EmbedDistillLoss(student, projection_dim=teacher.dim), teacher)
        """
        super().__init__()
        self.loss = loss
        self.model = loss.model
        self.teacher = teacher

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        return self.loss(sentence_features, self.teacher.labels(labels, len(sentence_features)))

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": type(self.loss).__name__, **self.loss.get_config_dict(), "teacher": str(self.teacher.guide_dir)}


GUIDE_SPACE = "guide_space_embedding"  # the features key GuideProjection writes


class GuideProjection(Dense):
    """The learned linear map of the student's sentence embedding into the guide's space (--distill embed
    when the dimensions differ), as a module of the student.

    It writes `guide_space_embedding` beside the unchanged `sentence_embedding`, so the student encodes
    as before and reports its own dimension. Being in the model, the trainer's DDP wrapper all-reduces
    its gradients and every checkpoint holds its weights (resume restores them with Adam's state); the
    final model is saved without it (`remove_guide_projection`), and gist loads a checkpoint without it
    (`pipeline.guide.load_model`).
    """

    def __init__(self, in_features: int, out_features: int, **kwargs) -> None:
        kwargs = {"activation_function": nn.Identity(), "module_output_name": GUIDE_SPACE, **kwargs}
        super().__init__(in_features, out_features, **kwargs)

    def get_embedding_dimension(self) -> None:
        return None  # sentence_embedding is not changed: the student's dimension is the module's before


def guide_projection(model) -> GuideProjection | None:
    """The student's GuideProjection, if it has one."""
    return next((module for module in model if isinstance(module, GuideProjection)), None)


def add_guide_projection(model, guide_dim: int, seed: int = 0) -> GuideProjection | None:
    """Append a GuideProjection into `guide_dim` to the student (once), unless its dimension is the guide's.

    Its initial weights come from `seed` alone (the caller's random state is left as it was): the
    trainer seeds only later, so one process and every torchrun world start from the same projection.
    """
    dim = model.get_embedding_dimension()
    if dim == guide_dim or guide_projection(model) is not None:
        return guide_projection(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.append(GuideProjection(dim, guide_dim).to(model.device))
    return model[-1]


def remove_guide_projection(model) -> None:
    """Take the GuideProjection out of the student (before saving it as the trained model)."""
    projection = guide_projection(model)
    if projection is not None:
        del model[[index for index, module in enumerate(model) if module is projection][0]]


def embed_columns_and_projections(model, features: list[dict[str, Tensor]], dim: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per column, the student's sentence embeddings (`dim` wide) and their GuideProjection outputs, from
    the forwards `embed_columns` makes (columns merged as it merges them): each forward returns both,
    joined. `model` may be the trainer's DDP wrapper of the student."""

    def joined(column_features):
        out = model(column_features)
        return {"sentence_embedding": torch.cat([out["sentence_embedding"], out[GUIDE_SPACE]], dim=-1)}

    columns = embed_columns(joined, features)
    return [column[..., :dim] for column in columns], [column[..., dim:] for column in columns]


def masked_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)); -inf (masked) entries are left out of both."""
    keep = torch.isfinite(teacher_logits)
    log_p = torch.log_softmax(teacher_logits, dim=1)
    log_q = torch.log_softmax(student_logits, dim=1)
    terms = torch.where(keep, log_p.exp() * (log_p - log_q), torch.zeros((), device=log_q.device, dtype=log_q.dtype))
    return terms.sum(dim=1).mean()


class DistilledLoss(nn.Module):
    def __init__(self, contrastive, teacher: GuideTeacher, kind: str = "kl", weight: float = 1.0, contrastive_weight: float = 1.0,
                 seed: int = 0) -> None:
        """
        GuidedMaskLoss plus distillation from the stored guide pass, from one student forward.

        loss = contrastive_weight * GuidedMaskLoss + weight * distillation, where distillation is

        - ``embed``: sentence-transformers ``EmbedDistillLoss`` (cosine distance, averaged over the
          columns) between the student's embeddings (projected by a learned linear layer when its
          dimension differs from the guide's) and the guide's stored ones. The layer is a
          ``GuideProjection`` appended to the student here, so that the trainer all-reduces its
          gradients under torchrun and checkpoints it; ``remove_guide_projection(student)`` before
          saving the trained model (``gist train`` does);
        - ``kl``: in-batch score distillation: per anchor, KL(guide || student) over the softmax of the
          candidates GuidedMaskLoss scores ([ap, aa, pp, an], divided by its temperature), the
          candidates the guide masked (or, unguided, the self-pairs) left out of both.

        Args:
            contrastive: a ``GuidedMaskLoss`` (guided or unguided); it also supplies the candidate set and masks.
            teacher: ``GuideTeacher.for_masks(contrastive.masks)``.
            kind: ``embed`` or ``kl``.
            weight: the distillation term's weight.
            contrastive_weight: the contrastive term's weight (0: distillation alone, the masks still
                checking that every batch is the planned one).
            seed: initialises the ``embed`` projection (``gist train``: its --seed).

        References:
            - EmbedDistill, https://arxiv.org/abs/2301.12005
            - Hinton et al., Distilling the Knowledge in a Neural Network, https://arxiv.org/abs/1503.02531

        Inputs:
            as GuidedMaskLoss: (anchor, positive[, negatives...]) texts, example ids as labels.

        Example:
            ::

                guided = GuidedMaskLoss(student, masks)
                loss = DistilledLoss(guided, GuideTeacher.for_masks(masks), kind="kl", weight=1.0)
        """
        super().__init__()
        if kind not in DISTILL_KINDS:
            raise GistError(f"--distill {kind}: use one of {', '.join(DISTILL_KINDS)}")
        self.contrastive = contrastive
        self.model = contrastive.model
        self.teacher = teacher
        self.kind = kind
        self.weight = weight
        self.contrastive_weight = contrastive_weight
        self.embed_distill = self.student_dim = None
        self.projected = False
        if kind == "embed":
            from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss

            self.embed_distill = EmbedDistillLoss(self.model, distance_metric="cosine")  # fed projected embeddings
            self.student_dim = self.model.get_embedding_dimension()
            self.projected = add_guide_projection(self.model, teacher.dim, seed) is not None

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        if self.kind == "embed" and self.projected:
            embeddings, in_guide_space = embed_columns_and_projections(self.model, sentence_features, self.student_dim)
        else:
            embeddings = in_guide_space = embed_columns(self.model, sentence_features)
        anchor, positive, *negatives = embeddings
        local = anchor.size(0)
        positive, negatives, row, offset = self.contrastive.global_batch(positive, negatives, labels)
        scores = self.contrastive.scores(anchor, positive, negatives, row, offset, 0, local)
        target = torch.arange(offset, offset + local, device=anchor.device)
        loss = self.contrastive_weight * nn.functional.cross_entropy(scores, target)
        if self.kind == "embed":
            guide = self.teacher.labels(labels, len(embeddings)).to(anchor.device)
            return loss + self.weight * self.embed_distill.compute_loss_from_embeddings(in_guide_space, list(guide.unbind(1)))
        planned = self.contrastive.masks.batch_rows(row, row + 1)[0]  # the whole (global) batch's ids
        with torch.no_grad():
            guide = self.teacher.labels(planned, len(embeddings)).to(device=anchor.device, dtype=anchor.dtype)
            g_anchor, g_positive, *g_negatives = guide.unbind(1)
            guide_scores = self.contrastive.scores(g_anchor[offset : offset + local], g_positive, g_negatives, row, offset, 0, local)
        return loss + self.weight * masked_kl(guide_scores, scores)

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.contrastive.get_config_dict(), "distill": self.kind, "distill_weight": self.weight,
                "contrastive_weight": self.contrastive_weight, "teacher": str(self.teacher.guide_dir)}
