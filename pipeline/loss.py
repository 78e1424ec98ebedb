"""GuidedMaskLoss: GISTEmbedLoss with the guide's verdicts read from `masks.parquet`.

The step costs what a MultipleNegativesRankingLoss step costs: one student forward over the
columns, a few (G x G) similarity matrices, a lookup of stored masks. No guide is loaded.

Similarities have GISTEmbedLoss's values to the bit (its broadcast `nn.CosineSimilarity`, not MNRL's
normalize-and-matmul, whose float32 noise temperature 0.01 amplifies to ~2e-5) and MNRL's memory:
`BroadcastCosine` computes the broadcast in row chunks without autograd and differentiates it
analytically with two matmuls, where autograd through the broadcast keeps (G, G, dim) tensors per
block (~600 MB at G=128, dim=384, as GISTEmbedLoss does). For large batches use
CachedGuidedMaskLoss, whose student memory does not grow with G.

Objectives: besides GISTEmbedLoss's (the default), the guided loss takes MultipleNegativesRankingLoss's
`directions`, `partition_mode`, `hardness_mode` and `hardness_strength` with their meaning (see
`GuidedMaskLoss`); the guide's masks apply to every block a direction uses.
"""

from __future__ import annotations

import functools
import logging
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

logger = logging.getLogger(__name__)

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")
# The stored block each direction needs beside ap/an, and the plan option (stage 1 / `gist plan`) that plans it.
DIRECTION_BLOCKS = {
    "query_to_query": (("aa", "--contrast-anchors"),),
    "doc_to_query": (("pa", "--contrast-doc-query"),),
    "doc_to_doc": (("pp", "--contrast-positives"), ("pn", "--contrast-doc-negatives")),
}


def is_default_objective(directions, partition_mode: str, hardness_mode: str | None, hardness_strength: float) -> bool:
    """Whether the objective is GISTEmbedLoss's own (query_to_doc, joint, no hardness weighting)."""
    return tuple(directions) == ("query_to_doc",) and partition_mode == "joint" and not (hardness_mode and hardness_strength > 0)


def check_objective(directions, partition_mode: str, hardness_mode: str | None, hardness_strength: float) -> tuple[str, ...]:
    """Refuse what MultipleNegativesRankingLoss refuses (the same rules); returns `directions` as a tuple."""
    directions = tuple(directions)
    if not directions:
        raise GistError("--directions: give at least one direction")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise GistError(f"--directions {','.join(unknown)}: use some of {', '.join(DIRECTIONS)}")
    if len(set(directions)) != len(directions):
        raise GistError(f"--directions {','.join(directions)}: a direction is given twice")
    if "query_to_doc" not in directions:
        raise GistError("--directions must include query_to_doc (it holds the positive pair)")
    if partition_mode not in PARTITION_MODES:
        raise GistError(f"--partition-mode {partition_mode}: use one of {', '.join(PARTITION_MODES)}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise GistError("--partition-mode per_direction needs every direction's candidates to include the positive pair: "
                        "query_to_query and doc_to_doc do not (use joint)")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise GistError(f"--hardness-mode {hardness_mode}: use one of {', '.join(HARDNESS_MODES)}")
    if hardness_strength < 0:
        raise GistError(f"--hardness-strength {hardness_strength}: must be non-negative")
    return directions


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
    def __init__(
        self, model, masks: PlannedMasks | str | Path, temperature: float = 0.01, guided: bool = True,
        directions: tuple[str, ...] = ("query_to_doc",), partition_mode: str = "joint",
        hardness_mode: str | None = None, hardness_strength: float = 0.0,
    ) -> None:
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
            directions: MultipleNegativesRankingLoss's interaction terms, each with the guide's masks:
                "query_to_doc" (a_i vs every positive and negative: blocks ap, an; always included, and
                GISTEmbedLoss's aa / pp blocks join it as the masks' contrast flags say, unless the two
                directions below take them over), "query_to_query" (a_i vs every anchor a_j, j != i:
                block aa, all gathered anchors), "doc_to_query" (p_i vs every anchor a_j: block pa,
                planned with ``--contrast-doc-query``), "doc_to_doc" (p_i vs every positive and negative
                except its own: blocks pp, pn, the latter planned with ``--contrast-doc-negatives``).
                A direction whose block the masks were planned without is refused.
            partition_mode: "joint" (one softmax over every direction's candidates) or "per_direction"
                (one per direction, their losses averaged; not with query_to_query or doc_to_doc).
            hardness_mode: None, "in_batch_negatives" (Lan et al. 2025), "hard_negatives" (EmbeddingGemma)
                or "all_negatives": adds ``hardness_strength * stop_grad(cos)`` to those query_to_doc logits
                (other rows' positives and negatives / own negatives / both), after the 1/temperature
                scaling, as MultipleNegativesRankingLoss does. Masked candidates stay out (-inf).
            hardness_strength: alpha of the hardness weighting (Lan et al. use 9, EmbeddingGemma 5).

            With the defaults the loss is GISTEmbedLoss's; with masks that mask nothing (and the masks'
            contrast flags matching the directions) it is MultipleNegativesRankingLoss's with the same
            directions, partition_mode, hardness and scale = 1 / temperature.

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
        self._block_masks: dict[str, tuple] = {}  # block -> (row, G, cols, device), its mask: the step's, reused by its mini-batches
        self.directions = check_objective(directions, partition_mode, hardness_mode, hardness_strength)
        self.partition_mode, self.hardness_mode, self.hardness_strength = partition_mode, hardness_mode, hardness_strength
        if hardness_mode is not None and hardness_strength == 0:
            logger.warning(f"hardness_mode={hardness_mode!r} with hardness_strength=0.0: no hardness weighting")
        # GISTEmbedLoss's objective: the original code path, unchanged to the bit.
        self.default_objective = is_default_objective(self.directions, partition_mode, hardness_mode, hardness_strength)
        if guided:
            self._check_planned_blocks()

    def _check_planned_blocks(self) -> None:
        """Refuse a direction whose block the masks were planned without: it would train unmasked."""
        planned = self.masks.planned_blocks
        for direction in self.directions:
            for block, option in DIRECTION_BLOCKS.get(direction, ()):
                if block == "pn" and not self.masks.num_negatives:
                    continue
                if block not in planned:
                    raise GistError(
                        f"direction {direction} needs the guide's {block} masks, and {self.masks.path} was planned without them: "
                        f"re-plan with `gist plan GUIDE_DIR ... {option}` (or stage 1 with {option})"
                    )

    @property
    def gathers_anchors(self) -> bool:
        """Whether the objective compares rows with every anchor of the planned batch (under torchrun, gathered)."""
        return "query_to_query" in self.directions or "doc_to_query" in self.directions

    def sim_matrix(self, embed1: Tensor, embed2: Tensor) -> Tensor:
        """(len1, len2) cosine similarities, the values GISTEmbedLoss computes."""
        return BroadcastCosine.apply(embed1, embed2)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        anchor, positive, *negatives = embed_columns(self.model, list(sentence_features))
        positive, negatives, row, offset = self.global_batch(positive, negatives, labels)
        if not self.default_objective:
            anchors = self.all_anchors(anchor)
            return self.row_losses(anchor, anchors, positive, negatives, row, offset, 0, anchor.size(0)).mean()
        scores = self.scores(anchor, positive, negatives, row, offset, 0, anchor.size(0))
        return F.cross_entropy(scores, torch.arange(offset, offset + anchor.size(0), device=anchor.device))

    def all_anchors(self, anchor: Tensor) -> Tensor:
        """The anchors of the whole planned batch when the objective needs them (gathered with gradients
        under torch.distributed, as MultipleNegativesRankingLoss(gather_across_devices=True) gathers its
        queries); the local anchors otherwise."""
        if self.gathers_anchors and get_world_size() > 1:
            return all_gather_with_grad(anchor)
        return anchor

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
            return sims.masked_fill(self.block_mask(block, row, g, cols, sims.device)[rows, keep_cols], -torch.inf)

        scores = [masked("ap", self.sim_matrix(anchor[begin:end], positive), g)]
        if self.contrast_anchors:
            scores.append(masked("aa", self.sim_matrix(anchor[begin:end], anchor), g, slice(offset, offset + local)))
        if self.contrast_positives:
            scores.append(masked("pp", self.sim_matrix(positive[rows], positive), g))
        if negatives:
            scores.append(masked("an", self.sim_matrix(anchor[begin:end], torch.cat(negatives)), g * len(negatives)))
        return torch.cat(scores, dim=1) / self.temperature

    def block_mask(self, block: str, row: int, g: int, cols: int, device) -> Tensor:
        """(G, cols) boolean mask of `block` in plan row `row`: the stored one, or with guided=False only
        the aa/pp self-pairs. Built once per step and block (the cached loss asks once per mini-batch);
        callers must not write into it."""
        key = (row, g, cols, str(device))
        cached = self._block_masks.get(block)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.guided:
            mask = torch.from_numpy(self.masks.dense(block, row, row + 1, g, cols)[0]).to(device)
        elif block in ("aa", "pp"):  # unguided: only the self-pairs a_i-a_i and p_i-p_i leave the softmax
            mask = torch.eye(g, dtype=torch.bool, device=device)
        else:
            mask = torch.zeros(g, cols, dtype=torch.bool, device=device)
        self._block_masks[block] = (key, mask)
        return mask

    def row_losses(self, anchor: Tensor, anchors: Tensor, positive: Tensor, negatives: list[Tensor], row: int, offset: int,
                   begin: int, end: int) -> Tensor:
        """Loss of each local anchor row begin..end under the objective (directions, partition_mode,
        hardness), the guide's masks applied in every block: (end - begin,).

        `anchor`: local anchors; `anchors`: those of the whole planned batch (G rows) when the objective
        compares with every anchor (else the local ones); `positive`, `negatives`: the whole planned batch.
        Logits are cosine / temperature, plus the hardness term on query_to_doc; masked entries -inf.
        """
        g, local, k = positive.size(0), anchor.size(0), len(negatives)
        device = anchor.device
        rows = slice(offset + begin, offset + end)
        own = torch.arange(offset + begin, offset + end, device=device)  # column of each row's own example
        r = torch.arange(end - begin, device=device)
        a, p = anchor[begin:end], positive[rows]
        negative = torch.cat(negatives) if k else None
        directions = set(self.directions)

        def logits(block: str, sims: Tensor, cols: int, keep: slice = slice(None), penalty: Tensor | None = None,
                   exclude: tuple[Tensor, ...] = ()) -> Tensor:
            out = sims / self.temperature
            if penalty is not None:  # MNRL: scale * cos + alpha * stop_grad(cos), on the penalised entries
                out = out + self.hardness_strength * sims.detach() * penalty
            mask = self.block_mask(block, row, g, cols, device)[rows, keep].clone()
            for columns in exclude:  # MNRL's own exclusions: a_i - a_i in query_to_query, p_i's own documents in doc_to_doc
                mask[r, columns] = True
            return out.masked_fill(mask, -torch.inf)

        ap_penalty = an_penalty = None
        if self.hardness_mode and self.hardness_strength > 0:
            dtype = positive.dtype
            others = torch.ones(end - begin, g, dtype=dtype, device=device)
            others[r, own] = 0  # the row's own positive is never penalised
            own_negatives = torch.zeros(end - begin, g * k, dtype=dtype, device=device)
            for c in range(k):
                own_negatives[r, c * g + own] = 1
            if self.hardness_mode == "in_batch_negatives":
                ap_penalty, an_penalty = others, 1 - own_negatives
            elif self.hardness_mode == "hard_negatives":
                an_penalty = own_negatives
            else:  # all_negatives
                ap_penalty, an_penalty = others, torch.ones_like(own_negatives)

        query_to_doc = [logits("ap", self.sim_matrix(a, positive), g, penalty=ap_penalty)]
        positive_logits = query_to_doc[0][r, own]
        if self.contrast_anchors and "query_to_query" not in directions:  # GISTEmbedLoss's aa: this rank's anchors
            query_to_doc.append(logits("aa", self.sim_matrix(a, anchor), g, slice(offset, offset + local)))
        if self.contrast_positives and "doc_to_doc" not in directions:  # GISTEmbedLoss's pp
            query_to_doc.append(logits("pp", self.sim_matrix(p, positive), g))
        if k:
            query_to_doc.append(logits("an", self.sim_matrix(a, negative), g * k, penalty=an_penalty))
        terms = {"query_to_doc": query_to_doc}
        if "query_to_query" in directions:
            terms["query_to_query"] = [logits("aa", self.sim_matrix(a, anchors), g, exclude=(own,))]
        if "doc_to_query" in directions:
            terms["doc_to_query"] = [logits("pa", self.sim_matrix(p, anchors), g)]
        if "doc_to_doc" in directions:
            terms["doc_to_doc"] = [logits("pp", self.sim_matrix(p, positive), g, exclude=(own,))]
            if k:
                own_columns = tuple(c * g + own for c in range(k))
                terms["doc_to_doc"].append(logits("pn", self.sim_matrix(p, negative), g * k, exclude=own_columns))
        if self.partition_mode == "joint":
            log_z = torch.logsumexp(torch.cat([block for blocks in terms.values() for block in blocks], dim=1), dim=1)
        else:
            log_z = sum(torch.logsumexp(torch.cat(blocks, dim=1), dim=1) for blocks in terms.values()) / len(terms)
        return log_z - positive_logits

    def get_config_dict(self) -> dict[str, Any]:
        return {"masks": str(self.masks.path), "temperature": self.temperature, "guided": self.guided, "directions": list(self.directions),
                "partition_mode": self.partition_mode, "hardness_mode": self.hardness_mode, "hardness_strength": self.hardness_strength,
                **self.masks.meta["plan"]}

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
    def __init__(
        self, model, masks: PlannedMasks | str | Path, temperature: float = 0.01, mini_batch_size: int = 32, guided: bool = True,
        directions: tuple[str, ...] = ("query_to_doc",), partition_mode: str = "joint",
        hardness_mode: str | None = None, hardness_strength: float = 0.0,
    ) -> None:
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
            directions, partition_mode, hardness_mode, hardness_strength: the objective, as in GuidedMaskLoss.

        References:
            - GISTEmbed, https://arxiv.org/abs/2402.16829
            - Gao et al., Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache),
              https://arxiv.org/abs/2101.06983

        Example:
            ::

                loss = CachedGuidedMaskLoss(student, "runs/guide/masks.parquet", mini_batch_size=64)
        """
        super().__init__(model, masks, temperature, guided, directions, partition_mode, hardness_mode, hardness_strength)
        self.mini_batch_size = mini_batch_size

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.forward_cached(sentence_features, labels)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False) -> Tensor:
        anchor, positive, *negatives = [torch.cat(column) for column in reps]
        positive, negatives, row, offset = self.global_batch(positive, negatives, labels)
        anchors = None if self.default_objective else self.all_anchors(anchor)
        local = anchor.size(0)
        total = torch.zeros((), device=anchor.device)
        for begin in range(0, local, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, local)
            if self.default_objective:
                scores = self.scores(anchor, positive, negatives, row, offset, begin, end)
                loss = F.cross_entropy(scores, torch.arange(offset + begin, offset + end, device=anchor.device)) * (end - begin) / local
            else:
                loss = self.row_losses(anchor, anchors, positive, negatives, row, offset, begin, end).sum() / local
            if with_backward:
                loss.backward()
                loss = loss.detach()
            total = total + loss
        return total
