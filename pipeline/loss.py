"""GuidedMaskLoss: GISTEmbedLoss with the guide's verdicts read from `masks.parquet`.

The step costs what a MultipleNegativesRankingLoss step costs: one student forward over the
columns, a few (G x G) similarity matrices, a lookup of stored masks. No guide is loaded.

Similarities have GISTEmbedLoss's values to the bit (its broadcast `nn.CosineSimilarity`, not MNRL's
normalize-and-matmul, whose float32 noise temperature 0.01 amplifies to ~2e-5) and MNRL's memory:
`BroadcastCosine` computes the broadcast in row chunks without autograd and differentiates it
analytically with two matmuls, where autograd through the broadcast keeps (G, G, dim) tensors per
block (~600 MB at G=128, dim=384, as GISTEmbedLoss does). For large batches use
CachedGuidedMaskLoss, whose student memory does not grow with G.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size
from torch import Tensor, nn

from pipeline import GistError
from pipeline.masks import PlannedMasks

COSINE_EPS = 1e-8  # nn.CosineSimilarity's default, as GISTEmbedLoss uses it
COSINE_CHUNK_ELEMENTS = 1 << 22  # (rows, m, dim) floats per forward block: 16 MB in float32


class BroadcastCosine(torch.autograd.Function):
    """(n, m) cosine similarities of rows of x and y: GISTEmbedLoss's values, MNRL's memory.

    Forward: GISTEmbedLoss's broadcast cosine, ``cosine_similarity(x[:, None], y[None], dim=-1)``,
    a block of rows at a time (each entry is reduced on its own, so the values are the same bits),
    so the (rows, m, dim) temporaries stay small and nothing of them is kept. Backward: the analytic
    gradient, d s_ij / d x_i = (y_j / |y_j| - s_ij x_i / |x_i|) / |x_i| (and symmetrically for y),
    as two (n, m) x (m, dim) matmuls. Written by hand because autograd through the broadcast keeps
    (n, m, dim) tensors and torch has no cosine-matrix op with these values; norms below
    ``COSINE_EPS`` are clamped as ``cosine_similarity`` clamps them.

    Mixed precision: the forward runs under the caller's autocast, as GISTEmbedLoss's
    ``nn.CosineSimilarity`` does (so the values, and their dtype, are the same: on CUDA autocast
    computes them in float32 from bf16/fp16 embeddings). The backward runs with autocast off in the
    widest of x's, y's and the gradient's dtypes and at least float32 (as autograd differentiates
    autocast's float32 ops), and casts each gradient to its input's dtype. Similarities from 16-bit
    or mixed-dtype inputs (their values have 16-bit error) are recomputed there from the unit vectors.
    Float32 inputs take exactly the float32 path: unchanged values, no casts.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        rows = max(1, COSINE_CHUNK_ELEMENTS // max(1, y.size(0) * y.size(1)))
        sims = torch.cat([F.cosine_similarity(x[i : i + rows, None], y[None], dim=-1, eps=COSINE_EPS) for i in range(0, x.size(0), rows)])
        ctx.save_for_backward(x, y, sims)
        return sims

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, y, sims = ctx.saved_tensors
        x_dtype, y_dtype = x.dtype, y.dtype
        dtype = functools.reduce(torch.promote_types, (x_dtype, y_dtype, grad.dtype), torch.float32)
        device_type = x.device.type
        has_autocast = getattr(torch.amp, "is_autocast_available", lambda device: device in ("cpu", "cuda"))  # torch < 2.4 lacks it
        no_autocast = torch.autocast(device_type, enabled=False) if has_autocast(device_type) else nullcontext()
        with no_autocast:
            x, y, grad = x.to(dtype), y.to(dtype), grad.to(dtype)
            x_norm = x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
            y_norm = y.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
            x_unit, y_unit = x / x_norm, y / y_norm
            if not x_dtype == y_dtype == sims.dtype == dtype:  # a 16-bit or mixed-dtype forward has 16-bit error
                sims = x_unit @ y_unit.T
            weighted = grad * sims
            grad_x = (grad @ y_unit - weighted.sum(1, keepdim=True) * x_unit) / x_norm
            grad_y = (grad.T @ x_unit - weighted.sum(0).unsqueeze(1) * y_unit) / y_norm
        return grad_x.to(x_dtype), grad_y.to(y_dtype)


class GuidedMaskLoss(nn.Module):
    def __init__(self, model, masks: PlannedMasks | str | Path, temperature: float = 0.01, guided: bool = True) -> None:
        """
        In-batch contrastive loss with GISTEmbed false-negative filtering, where the guide's masks were
        computed ahead of time by ``gist precompute-guide`` (or ``gist plan``) for a fixed batch plan.

        For each anchor a_i the candidates are all positives p_j, and (as recorded in the masks) all
        anchors a_j, all positives p_j again, and every negative of the batch. Candidates the guide
        judged false negatives are set to -inf; the scores are divided by ``temperature`` and the
        target is p_i. Equal to ``sentence_transformers.losses.GISTEmbedLoss`` run with the same guide
        on the same batches, without the guide.

        Args:
            model: the SentenceTransformer being trained (the student).
            masks: a ``PlannedMasks`` or the path of a ``masks.parquet``; margin strategy, margin and
                contrast flags are those recorded in it.
            temperature: divides the cosine similarities (inverse of MNRL's ``scale``). Default 0.01.
            guided: False gives the ablation "unguided": the same candidates, with only the
                ``aa``/``pp`` self-pairs masked and no guide veto, so that what guidance buys is
                measured against the same candidate set (``gist train --loss unguided``).

        References:
            - GISTEmbed, https://arxiv.org/abs/2402.16829

        Requirements:
            The dataset must have a ``label`` column holding each row's example id (the row of DATA),
            and batches must come from the plan (``PlannedBatchSampler``); an unplanned batch raises.

        Inputs:
            +--------------------------------------------------+----------------+
            | Texts                                            | Labels         |
            +==================================================+================+
            | (anchor, positive) or (anchor, positive, neg...) | example ids    |
            +--------------------------------------------------+----------------+

        Example:
            ::

                masks = PlannedMasks("runs/guide/masks.parquet")
                loss = GuidedMaskLoss(student, masks)
                trainer = SentenceTransformerTrainer(
                    model=student, args=args, train_dataset=train_dataset, loss=loss
                )  # args.batch_sampler = planned_batch_sampler(masks)
                trainer.train()
        """
        super().__init__()
        self.model = model
        self.masks = masks if isinstance(masks, PlannedMasks) else PlannedMasks(masks)
        self.temperature = temperature
        self.contrast_anchors = self.masks.params.contrast_anchors
        self.contrast_positives = self.masks.params.contrast_positives
        self.guided = guided

    def sim_matrix(self, embed1: Tensor, embed2: Tensor) -> Tensor:
        """(len1, len2) cosine similarities, the values GISTEmbedLoss computes."""
        return BroadcastCosine.apply(embed1, embed2)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        anchor, positive, *negatives = embed_columns(self.model, list(sentence_features))
        positive, negatives, row, offset = self.global_batch(positive, negatives, labels)
        scores = self.scores(anchor, positive, negatives, row, offset, 0, anchor.size(0))
        return F.cross_entropy(scores, torch.arange(offset, offset + anchor.size(0), device=anchor.device))

    def global_batch(self, positive: Tensor, negatives: list[Tensor], labels: Tensor | None):
        """Candidates of the whole planned batch, its plan row, and where this rank's anchors sit in it.

        Under torch.distributed each rank holds a contiguous slice of the planned (global) batch;
        positives and negatives are gathered with gradients and the example ids without, as
        GISTEmbedLoss(gather_across_devices=True) gathers; anchors stay local.
        """
        if len(negatives) != self.masks.num_negatives:
            raise GistError(f"batch has {len(negatives)} negative column(s), the masks were planned with {self.masks.num_negatives}")
        if labels is None:
            raise GistError("GuidedMaskLoss needs the example ids as the 'label' column of the training dataset")
        offset = 0
        if get_world_size() > 1:
            offset = get_rank() * labels.size(0)
            labels = all_gather(labels)
            positive = all_gather_with_grad(positive)
            negatives = [all_gather_with_grad(negative) for negative in negatives]
        return positive, negatives, self.masks.due_row(labels.cpu().numpy()), offset

    def scores(self, anchor: Tensor, positive: Tensor, negatives: list[Tensor], row: int, offset: int, begin: int, end: int) -> Tensor:
        """Masked, temperature-scaled scores [ap, aa, pp, an] of local anchors begin..end.

        `positive` and `negatives` hold the whole planned batch (G rows); local anchor i is row
        offset + i of the plan's masks. `aa` compares local anchors only, as GISTEmbedLoss does.
        """
        g, local = positive.size(0), anchor.size(0)
        rows = slice(offset + begin, offset + end)

        def masked(block: str, sims: Tensor, cols: int, keep_cols: slice = slice(None)) -> Tensor:
            if self.guided:
                mask = torch.from_numpy(self.masks.dense(block, row, row + 1, g, cols)[0])
            else:  # unguided: only the self-pairs a_i-a_i and p_i-p_i leave the softmax
                mask = torch.eye(g, dtype=torch.bool) if block in ("aa", "pp") else torch.zeros(g, cols, dtype=torch.bool)
            mask = mask.to(sims.device)[rows, keep_cols]
            return sims.masked_fill(mask, -torch.inf)

        scores = [masked("ap", self.sim_matrix(anchor[begin:end], positive), g)]
        if self.contrast_anchors:
            scores.append(masked("aa", self.sim_matrix(anchor[begin:end], anchor), g, slice(offset, offset + local)))
        if self.contrast_positives:
            scores.append(masked("pp", self.sim_matrix(positive[rows], positive), g))
        if negatives:
            scores.append(masked("an", self.sim_matrix(anchor[begin:end], torch.cat(negatives)), g * len(negatives)))
        return torch.cat(scores, dim=1) / self.temperature

    def get_config_dict(self) -> dict[str, Any]:
        return {"masks": str(self.masks.path), "temperature": self.temperature, "guided": self.guided, **self.masks.meta["plan"]}

    @property
    def citation(self) -> str:
        return """
@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


class CachedGuidedMaskLoss(CachedLossMixin, GuidedMaskLoss):
    def __init__(self, model, masks: PlannedMasks | str | Path, temperature: float = 0.01, mini_batch_size: int = 32, guided: bool = True) -> None:
        """
        GuidedMaskLoss with GradCache (as sentence-transformers ``CachedGISTEmbedLoss``): the batch is
        embedded in mini-batches without gradients, the loss is computed over the whole batch in
        row chunks, and the mini-batches are re-embedded with the cached gradients. Memory then
        depends on ``mini_batch_size``, not on the batch size, so batches of thousands fit.

        Args:
            model: the SentenceTransformer being trained.
            masks: a ``PlannedMasks`` or the path of a ``masks.parquet``.
            temperature: divides the cosine similarities. Default 0.01.
            mini_batch_size: rows embedded (and rows of the loss computed) at once. Does not change
                the loss, only memory and speed.

        References:
            - GISTEmbed, https://arxiv.org/abs/2402.16829
            - Gao et al., Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache),
              https://arxiv.org/abs/2101.06983

        Example:
            ::

                loss = CachedGuidedMaskLoss(student, "runs/guide/masks.parquet", mini_batch_size=64)
        """
        super().__init__(model, masks, temperature, guided)
        self.mini_batch_size = mini_batch_size

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.forward_cached(sentence_features, labels)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False) -> Tensor:
        anchor, positive, *negatives = [torch.cat(column) for column in reps]
        positive, negatives, row, offset = self.global_batch(positive, negatives, labels)
        local = anchor.size(0)
        total = torch.zeros((), device=anchor.device)
        for begin in range(0, local, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, local)
            scores = self.scores(anchor, positive, negatives, row, offset, begin, end)
            loss = F.cross_entropy(scores, torch.arange(offset + begin, offset + end, device=anchor.device)) * (end - begin) / local
            if with_backward:
                loss.backward()
                loss = loss.detach()
            total = total + loss
        return total
