"""Stage 2 wiring: the planned batch sampler, the trainer, and the checks against the masks.

Training is sentence-transformers' `SentenceTransformerTrainer`; gist only supplies the loss
(`GuidedMaskLoss`) and a batch sampler that replays the plan, so checkpointing, resume, logging,
evaluators and torchrun are the trainer's own. A training script needs `planned_dataset`,
`planned_training_args` and `masks.cursor` among its callbacks; `train_student` is `gist train`.
"""

from __future__ import annotations

import functools
import gc
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback

from pipeline import GistError
from pipeline.data import TrainingData, data_source, local_inputs
from pipeline.distill import DISTILL_KINDS, remove_guide_projection
from pipeline.masks import PlannedMasks
from pipeline.outputs import Kind, Output
from pipeline.prompts import dataset_column, dataset_names, student_prompts
from pipeline.views import GuideViews

TRAIN_LOG = "train_log.jsonl"


class PlannedBatchSampler(DefaultBatchSampler):
    """Yields the planned batches of the epoch the trainer is in, in order.

    The epoch is the trainer's global step (`masks.cursor`) divided by the steps per epoch, not the
    one `set_epoch` passes: that one does not reach this sampler on a resume under torchrun.
    Dataset row i must be example i of DATA. Pass it to the trainer with `planned_batch_sampler(masks)`.
    """

    def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0, *, masks: PlannedMasks):
        super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        self.masks = masks
        # The planned (global) batch size: accelerate splits batches of exactly this size over the ranks.
        self.batch_size = masks.params.batch_size
        self._epoch: int | None = None  # the epoch the last iteration replayed

    def __len__(self) -> int:
        return self.masks.steps_per_epoch

    def __iter__(self):
        epochs, steps = self.masks.params.epochs, self.masks.steps_per_epoch
        epoch = self.masks.cursor.step // steps
        if self._epoch is not None and epoch <= self._epoch:
            # The cursor did not follow the trainer through the last epoch: a loss that checks no
            # batch (MNRL) would otherwise train this epoch's batches again, silently.
            raise GistError(f"a new epoch began with the plan cursor still in epoch {epoch + 1}: add `masks.cursor` to the trainer's callbacks")
        if epoch >= epochs:
            raise GistError(f"the trainer asked for epoch {epoch + 1}, the plan has {epochs}; re-plan with more --epochs")
        self._epoch = epoch
        for row in range(epoch * steps, (epoch + 1) * steps):  # read row group by row group, never the whole plan
            yield self.masks.batch_rows(row, row + 1)[0].tolist()


def planned_batch_sampler(masks: PlannedMasks):
    """The `batch_sampler` training argument that makes the trainer replay the plan of `masks`
    (with `masks.cursor` among the trainer's callbacks)."""
    return functools.partial(PlannedBatchSampler, masks=masks)


def training_dataset(data: TrainingData) -> Dataset:
    """Text columns in canonical order plus `label` = example id, which GuidedMaskLoss receives
    (built from Arrow arrays: no Python object per text)."""
    import pyarrow as pa

    return Dataset(pa.table({**data.text_columns(), "label": np.arange(data.num_examples, dtype=np.int64)}))


def planned_dataset(data, masks: PlannedMasks, columns: str | None = None) -> Dataset:
    """The training dataset for `masks` from the user's data: a `datasets.Dataset` or a DATA path.

    Returns the text columns in canonical order (anchor, positive, negative_1..k) and `label` = the
    example id the loss and sampler need; refuses data the masks were not planned for (content
    fingerprint, example and negative counts). `columns` maps names as stage 1 did (default: the
    mapping stored with the masks).
    """
    return training_dataset(planned_training_data(data, masks, columns))


def planned_training_data(data, masks: PlannedMasks, columns: str | None = None) -> TrainingData:
    """DATA loaded with the column mapping stage 1 used (unless `columns`), refused unless the masks were planned for it."""
    from pipeline.data import load_training_data

    renames = ",".join(f"{k}={v}" for k, v in masks.meta["columns"].items() if k != v)  # as stage 1 mapped them
    training = load_training_data(data, columns or renames)
    check_masks_match(masks, training)
    return training


def check_masks_match(masks: PlannedMasks, data: TrainingData) -> None:
    """Refuse masks planned for other data: fingerprint, example count, negative count."""
    meta = masks.meta
    if meta["num_examples"] != data.num_examples:
        raise GistError(f"{masks.path} was planned for {meta['num_examples']} examples, DATA has {data.num_examples}; re-run stage 1 on this data")
    if meta["dataset_fingerprint"] != data.fingerprint:
        raise GistError(f"{masks.path} was planned for other data (fingerprint {meta['dataset_fingerprint'][:12]} != {data.fingerprint[:12]}); re-run stage 1 on this data")
    if masks.num_negatives != data.num_negatives:
        raise GistError(f"{masks.path} has {masks.num_negatives} negative column(s), DATA has {data.num_negatives}")


RUN_RECORD = "run.json"  # the run's data, masks, student and settings: what --resume must match
TRAINING = Kind("training", directory=True, record=RUN_RECORD)  # no --overwrite: a training run is never replaced


def _readable_json(path: Path) -> bool:
    """True if `path` holds a whole JSON document (the trainer writes trainer_state.json in place, so a
    run killed while writing it leaves a partial one)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The checkpoints that were completely written (the trainer writes trainer_state.json last)."""
    return [p for p in Path(checkpoints_dir).glob("checkpoint-*") if _readable_json(p / "trainer_state.json")]


def has_complete_checkpoint(run_dir: Path) -> bool:
    """Whether a (killed) training run in `run_dir` has a complete checkpoint to resume from."""
    return complete_checkpoints(run_dir / "checkpoints") != []


def last_complete_checkpoint(checkpoints_dir: Path) -> Path:
    """The newest complete checkpoint (`complete_checkpoints`).

    transformers writes checkpoints in place, so a run killed while saving leaves a partial
    `checkpoint-N` that the trainer's own `get_last_checkpoint` would pick and fail to load.
    """
    complete = complete_checkpoints(checkpoints_dir)
    if not complete:
        raise GistError(f"--resume: no complete checkpoint in {checkpoints_dir}")
    return max(complete, key=lambda p: int(p.name.split("-")[1]))


class JsonlLogCallback(TrainerCallback):
    """Appends one JSON object per trainer log (step, epoch, loss, learning rate...) to a file.

    On resume, lines after the checkpoint's step (and a line cut short by a kill) are dropped first,
    so the log has each step once.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.exists() and state.is_world_process_zero:
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= state.global_step:
                        kept.append(line)
                except ValueError:
                    pass  # the last line of a run killed while writing it
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class BestCheckpointCallback(TrainerCallback):
    """Checkpoints every evaluation that improves on the best metric, so the best step has its own checkpoint.

    The trainer records a best checkpoint only where a save happens to fall on the best evaluation's
    step: with --save-steps not a multiple of --eval-steps (or a best evaluation between saves) the
    recorded one was none, or an older, worse one. Compares as the trainer does (strictly better,
    `greater_is_better`), before it updates `state.best_metric`.
    """

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model
        if not name or not metrics or args.save_strategy == "no":
            return
        value = metrics[name if name.startswith("eval_") else f"eval_{name}"]
        best = state.best_metric
        if best is None or (value > best if args.greater_is_better else value < best):
            control.should_save = True


def check_max_steps(masks: PlannedMasks, max_steps: int) -> None:
    """Refuse more steps than the plan has batches (the trainer would train the whole plan, then fail
    asking for an epoch the plan lacks, with no final model)."""
    if max_steps > masks.num_batches:
        raise GistError(f"--max-steps {max_steps} exceeds the {masks.num_batches} planned batches of {masks.path}; re-plan with more --epochs")


def planned_training_args(masks: PlannedMasks, **training_args):
    """SentenceTransformerTrainingArguments that replay the plan of `masks`; `training_args` (e.g.
    output_dir, learning_rate) override the defaults. The plan fixes the batch size, the epochs and
    the batch sampler; under torchrun every planned batch (G examples) is split across the W
    ranks, G / W each, and each rank's loss gathers the others' candidates. A `max_steps` beyond
    the plan is refused.
    """
    from sentence_transformers import SentenceTransformerTrainingArguments

    check_max_steps(masks, training_args.get("max_steps", -1))
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; torch.distributed starts later
    epochs, g = masks.params.epochs, masks.params.batch_size
    if g % world_size:
        raise GistError(f"the planned batch size {g} does not split over {world_size} processes; re-plan with a multiple")
    defaults = dict(
        output_dir="checkpoints",
        learning_rate=5e-6,
        warmup_steps=0.1,  # a float is a ratio of the total steps (transformers >= 5)
        logging_steps=10,
        save_strategy="steps",
        save_steps=500,
        report_to="none",
        disable_tqdm=False,
    )
    planned = dict(
        per_device_train_batch_size=g // world_size,
        num_train_epochs=epochs,
        dataloader_drop_last=True,
        # Under torchrun the plan's batch is the global batch: each rank takes its contiguous slice.
        accelerator_config={"split_batches": True},
        batch_sampler=planned_batch_sampler(masks),
    )
    return SentenceTransformerTrainingArguments(**{**defaults, **training_args, **planned})


def build_trainer(model, data: TrainingData, masks: PlannedMasks, loss, out_dir: Path, *, evaluator=None, callbacks=(), **training_args):
    """A SentenceTransformerTrainer that replays the plan of `masks` with `loss`, checkpoints in
    OUT/checkpoints (and at every evaluation that improves `metric_for_best_model`: the best step's
    own checkpoint); `training_args` override planned_training_args' defaults. Per-dataset `prompts`
    (pipeline.prompts) are applied as for a DatasetDict: each row carries its dataset's name."""
    from sentence_transformers import SentenceTransformerTrainer

    args = planned_training_args(masks, **{"output_dir": str(Path(out_dir) / "checkpoints"), **training_args})
    names = dataset_column(training_args.get("prompts"), data, masks)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=training_dataset(data), loss=loss, evaluator=evaluator, callbacks=[masks.cursor, BestCheckpointCallback(), *callbacks]
    )
    if names is not None:  # the column sentence-transformers adds to a DatasetDict's rows (its own check refuses it in user data)
        trainer.train_dataset = trainer.train_dataset.add_column("dataset_name", names)
    return trainer

LOSSES = ("guided", "unguided", "mnrl", "none")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """Everything `gist train` sets beyond the trainer's defaults; recorded in OUT/run.json.

    loss: "guided" (GuidedMaskLoss), "unguided" (its candidates with only self-pairs masked: the
    ablation), "mnrl" (MultipleNegativesRankingLoss on the same plan, the baseline) or "none" (only
    the distillation term); mini_batch_size turns either into its GradCache variant (CachedGuidedMaskLoss,
    CachedMultipleNegativesRankingLoss); matryoshka_dims wraps it in MatryoshkaLoss. distill ("embed"
    or "kl") adds distill_weight x a distillation term from the guide pass's stored embeddings
    (pipeline.distill.DistilledLoss). directions, partition_mode, hardness_mode and hardness_strength are
    MultipleNegativesRankingLoss's objective arguments, for every --loss but none (pipeline.loss.GuidedMaskLoss).
    """

    loss: str = "guided"
    lr: float = 5e-6
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    temperature: float = 0.01
    mini_batch_size: int | None = None
    matryoshka_dims: tuple[int, ...] = ()
    max_seq_length: int | None = None
    gradient_checkpointing: bool = False
    max_steps: int = -1
    logging_steps: int = 10
    save_steps: int = 500
    eval_steps: int | None = None
    seed: int = 0
    precision: str = "fp32"
    distill: str | None = None
    distill_weight: float = 1.0
    directions: tuple[str, ...] = ("query_to_doc",)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    # Prompts (pipeline.prompts): the student's training prompts, as SentenceTransformerTrainingArguments(prompts=...)
    # takes them (a str, {column: str}, {dataset: ...}), or names of the student's own prompts in the same forms;
    # the evaluators' query and corpus prompts (STS: the query prompt on both sentences), or their names.
    prompts: str | dict | None = None
    prompt_names: str | dict | None = None
    query_prompt: str | None = None
    corpus_prompt: str | None = None
    query_prompt_name: str | None = None
    corpus_prompt_name: str | None = None
    # The trainer's own options, passed through unchanged (SentenceTransformerTrainingArguments' names).
    report_to: tuple[str, ...] = ()
    save_total_limit: int | None = None
    optim: str | None = None
    max_grad_norm: float = 1.0
    dataloader_num_workers: int = 0
    hub_model_id: str | None = None

    def objective(self) -> dict:
        """The objective's arguments of GuidedMaskLoss and MultipleNegativesRankingLoss."""
        return dict(directions=tuple(self.directions), partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
                    hardness_strength=self.hardness_strength)

    @property
    def default_objective(self) -> bool:
        from pipeline.loss import is_default_objective

        return is_default_objective(**self.objective())

    def eval_prompts(self):
        from pipeline.prompts import EvalPrompts

        return EvalPrompts(self.query_prompt, self.corpus_prompt, self.query_prompt_name, self.corpus_prompt_name)

    def check(self, model_dim: int | None = None) -> None:
        """Refuse settings that cannot train, before any model is loaded (model_dim: once it is)."""
        check_trainer_options(self)
        self.eval_prompts().check()
        if self.prompts is not None and self.prompt_names is not None:
            raise GistError("--prompts and --prompt-names: give one of them")
        if self.loss not in LOSSES:
            raise GistError(f"--loss {self.loss}: use one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise GistError(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")
        from pipeline.loss import check_objective

        check_objective(**self.objective())
        if self.distill is not None and not self.default_objective:
            raise GistError("--distill combines with the default objective only (--directions query_to_doc, --partition-mode joint, no --hardness-mode)")
        if self.distill is not None:
            if self.distill not in DISTILL_KINDS:
                raise GistError(f"--distill {self.distill}: use one of {', '.join(DISTILL_KINDS)}")
            if self.loss == "mnrl":
                raise GistError("--distill combines with --loss guided, unguided or none (its in-batch targets use GuidedMaskLoss's candidates and masks)")
            if self.mini_batch_size or self.matryoshka_dims:
                raise GistError("--distill does not combine with --mini-batch-size or --matryoshka-dims")
            if not self.distill_weight > 0:
                raise GistError(f"--distill-weight {self.distill_weight}: must be positive")
        elif self.loss == "none":
            raise GistError("--loss none trains only a distillation term: give --distill embed or kl")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise GistError(f"--mini-batch-size {self.mini_batch_size}: must be at least 1")
        if any(d < 1 for d in self.matryoshka_dims):
            raise GistError(f"--matryoshka-dims {','.join(map(str, self.matryoshka_dims))}: dimensions must be positive")
        if model_dim is not None and any(d > model_dim for d in self.matryoshka_dims):
            raise GistError(f"--matryoshka-dims {','.join(map(str, self.matryoshka_dims))}: the student's embeddings have {model_dim} dimensions")


def check_trainer_options(settings: TrainSettings) -> None:
    """The trainer options of `settings` that would fail only once training runs: a reporting
    integration that is not installed, an unknown optimizer, a Hub that cannot be reached."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations
    from transformers.training_args import OptimizerNames

    missing = [name for name in settings.report_to if name not in get_available_reporting_integrations()]
    if missing:
        installed = ", ".join(get_available_reporting_integrations()) or "none"
        raise GistError(f"--report-to {','.join(missing)}: not installed (installed here: {installed}); pip install it or choose another")
    if settings.optim is not None and settings.optim not in {o.value for o in OptimizerNames}:
        raise GistError(f"--optim {settings.optim}: not a transformers optimizer (e.g. adamw_torch, adamw_torch_fused, adafactor, sgd)")
    if settings.save_total_limit is not None and settings.save_total_limit < 1:
        raise GistError(f"--save-total-limit {settings.save_total_limit}: keep at least 1 checkpoint")


def check_hub(repo_id: str) -> None:
    """Refuse --push-to-hub before training when the Hub cannot be reached or no token is set."""
    from huggingface_hub import HfApi

    try:
        HfApi().whoami()
    except Exception as e:  # noqa: BLE001 - offline mode, no token, no network: one line, whatever the cause
        raise GistError(f"--push-to-hub {repo_id}: the Hugging Face Hub cannot be reached or no token is set ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}); the run was not started") from None


def gist_model_card(masks: PlannedMasks, settings: TrainSettings, prompts=None) -> str:
    """The model card's section on how gist trained the model: the guide pass, the plan, the loss."""
    plan = masks.params
    loss = {"guided": "GuidedMaskLoss (the guide's stored masks)", "unguided": "GuidedMaskLoss without the guide's vetoes",
            "mnrl": "MultipleNegativesRankingLoss", "none": "distillation only"}[settings.loss]
    extras = [f"temperature {settings.temperature}"] + ([f"GradCache mini-batches of {settings.mini_batch_size}"] if settings.mini_batch_size else []) \
        + ([f"MatryoshkaLoss {list(settings.matryoshka_dims)}"] if settings.matryoshka_dims else []) \
        + ([f"--distill {settings.distill} (weight {settings.distill_weight})"] if settings.distill else [])
    return "\n".join([
        "", "## Trained with gist", "",
        "Offline GISTEmbed guidance: the guide ran once over the training data (stage 1) and its false-negative masks were stored; "
        "this model was trained with them, without the guide in the loop.", "",
        f"- Guide: `{masks.meta['guide']}` (sha256 `{masks.meta['guide_sha256'][:16]}…`; {GuideViews.from_record(masks.meta['guide_views']).describe()}), "
        f"masks `{masks.path.resolve()}`",
        f"- Plan: {plan.strategy} batches of {plan.batch_size}, {plan.epochs} epoch(s), seed {plan.seed}; {plan.margin_strategy} margin {plan.margin}, "
        f"contrast anchors {plan.contrast_anchors}, contrast positives {plan.contrast_positives}, mask duplicates {plan.mask_duplicates}",
        f"- Loss: {loss}; {', '.join(extras)}",
        *prompt_card_lines(prompts, settings),
        f"- Data fingerprint: `{masks.meta['dataset_fingerprint'][:16]}…`", "",
    ])


def prompt_card_lines(prompts, settings: TrainSettings) -> list[str]:
    """The model card's lines on the prompts the student was trained and evaluated with."""
    from dataclasses import asdict as fields

    from pipeline.prompts import describe

    evaluation = {k: v for k, v in fields(settings.eval_prompts()).items() if v is not None}
    return ([f"- Training prompts: {describe(prompts)}" + (f" (from the student's prompt names {settings.prompt_names!r})" if settings.prompt_names else "")]
            if prompts else []) + ([f"- Evaluation prompts: {', '.join(f'{k} {v!r}' for k, v in evaluation.items())}"] if evaluation else [])


def build_loss(model, masks: PlannedMasks, settings: TrainSettings):
    """The loss of `settings` on `model`: guided or MNRL, cached when mini_batch_size is set, in MatryoshkaLoss when dims are
    given; with distill, GuidedMaskLoss (weight 0 for loss "none") plus the distillation term."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss, MatryoshkaLoss, MultipleNegativesRankingLoss,
    )

    from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss
    from pipeline.static import static_student_loss

    scale = 1.0 / settings.temperature
    guided = settings.loss in ("guided", "none")
    if settings.distill:
        from pipeline.distill import DistilledLoss, GuideTeacher

        contrastive = GuidedMaskLoss(model, masks, temperature=settings.temperature, guided=guided)
        return DistilledLoss(contrastive, GuideTeacher.for_masks(masks), settings.distill, settings.distill_weight,
                             contrastive_weight=0.0 if settings.loss == "none" else 1.0, seed=settings.seed)
    objective = settings.objective()
    static = static_student_loss(model, masks, settings)  # a StaticEmbedding student's losses (pipeline/static.py), else None
    if static is not None:
        loss = static
    elif settings.loss != "mnrl" and settings.mini_batch_size:
        loss = CachedGuidedMaskLoss(model, masks, temperature=settings.temperature, mini_batch_size=settings.mini_batch_size, guided=guided, **objective)
    elif settings.loss != "mnrl":
        loss = GuidedMaskLoss(model, masks, temperature=settings.temperature, guided=guided, **objective)
    elif settings.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=settings.mini_batch_size, gather_across_devices=True, **objective)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=True, **objective)
    return MatryoshkaLoss(model, loss, list(settings.matryoshka_dims)) if settings.matryoshka_dims else loss


def train_student(
    data: str | Path, masks: str | Path | PlannedMasks, student: str | Path, out: str | Path, settings: TrainSettings = TrainSettings(), *,
    columns: str | None = None, resume: bool = False, device: str = "auto", sts: Path | None = None, beir: Path | None = None,
    subset: str | None = None, split: str | None = None, revision: str | None = None,
) -> Path | None:
    """Stage 2: train `student` on DATA with the plan and masks of stage 1; the guide is never loaded.

    With `settings.eval_steps`, the STS and/or BEIR evaluators run every that many steps through the
    trainer (the best checkpoint by STS Spearman, else BEIR nDCG@10, is recorded in OUT/eval.json
    with the final scores). DATA is anything stage 1 takes (a Hub id with `subset`, `split`, `revision`;
    a mixture): the masks' fingerprint decides. Returns OUT/final (None on ranks other than 0 under torchrun).
    """
    from pipeline import artifacts, guide as guide_mod
    from pipeline.evaluate import evaluate_model, evaluators, training_evaluator
    from pipeline.static import check_static_settings

    out = Path(out)
    settings.check()
    if settings.eval_steps and not (sts or beir):
        raise GistError("--eval-steps needs --sts and/or --beir to evaluate on")
    masks = masks if isinstance(masks, PlannedMasks) else PlannedMasks(Path(masks))
    data = data_source(data, subset, split, revision)
    pass_dir = masks.path.parent  # the pass (or plan) the masks belong to, and the guide pass distillation reads
    guide_pass = artifacts.guide_dir_of(pass_dir) if (pass_dir / artifacts.MANIFEST).is_file() else None
    output = Output(out, TRAINING, overwrite=None, inputs={
        **local_inputs(data), "the pass of --masks": pass_dir, "its guide pass": guide_pass, "--student": student, "--sts": sts, "--beir": beir})
    output.check()
    # Every input and setting is checked before OUT is touched: a typo leaves no trace.
    training = planned_training_data(data, masks, columns)
    check_max_steps(masks, settings.max_steps)
    built = evaluators(sts, beir, settings.eval_prompts())  # reads the files once: a bad one fails before training
    evaluator = training_evaluator(built) if settings.eval_steps else None
    if settings.hub_model_id:
        check_hub(settings.hub_model_id)
    model = guide_mod.load_model(str(student), device)
    settings.check(model.get_embedding_dimension())
    check_static_settings(model, settings)  # --max-seq-length, --gradient-checkpointing: no meaning for a static student
    prompts = student_prompts(settings.prompts, settings.prompt_names, model, training.num_negatives, dataset_names(training))
    dataset_column(prompts, training, masks)  # per-dataset prompts need one dataset per batch: refused before OUT is touched
    settings.eval_prompts().check_model(model)
    if settings.max_seq_length:
        model.max_seq_length = settings.max_seq_length
    loss = build_loss(model, masks, settings)
    record = json.loads(json.dumps({  # as run.json stores it (tuples as lists), so a resumed run's record compares equal
        "kind": TRAINING.name, "data_fingerprint": training.fingerprint, "masks_plan": masks.meta["plan"], "masks_guide": masks.meta["guide_sha256"],
        "student": guide_mod.model_identity(str(student))["sha256"], **asdict(settings), "training_prompts": prompts,
    }))
    rank, world_size = guide_mod.init_distributed()  # the trainer (accelerate) takes the process group over
    # The run is built in OUT's stage and moved to OUT when final/ is saved; a killed run's stage keeps
    # its checkpoints, for --resume with the same settings (the stage's key is the run record). A killed
    # run without a complete checkpoint has nothing to resume and starts afresh; one of other settings
    # with checkpoints is refused, never discarded.
    with output.stage(record, rank=rank, world_size=world_size, discard=False, resumable=has_complete_checkpoint) as stage:
        checkpoints = stage.dir / "checkpoints"
        stage.keep_when(lambda: has_complete_checkpoint(stage.dir))
        if resume and not stage.resumed:
            raise GistError(f"--resume: no interrupted run of {out} with these settings and a complete checkpoint to resume (in {stage.root}); run without --resume")
        if stage.resumed and not resume:
            raise GistError(f"an interrupted run of {out} with these settings has checkpoints in {stage.root}; continue it with --resume, or remove that directory to start afresh")
        if rank == 0:
            artifacts.write_json(stage.dir / RUN_RECORD, record)
        checkpoint = last_complete_checkpoint(checkpoints) if resume else None
        metric = None
        if evaluator is not None:
            metric = "eval_sts_spearman_cosine" if sts else "eval_beir_cosine_ndcg@10"
        trainer = build_trainer(
            model, training, masks, loss, stage.dir, evaluator=evaluator, callbacks=[JsonlLogCallback(stage.dir / TRAIN_LOG)],
            learning_rate=settings.lr, warmup_steps=settings.warmup_ratio, lr_scheduler_type=settings.lr_scheduler, weight_decay=settings.weight_decay,
            max_steps=settings.max_steps, logging_steps=settings.logging_steps, save_steps=settings.save_steps, seed=settings.seed,
            activation_checkpointing=settings.gradient_checkpointing, use_cpu=model.device.type == "cpu",
            fp16=settings.precision == "fp16", bf16=settings.precision == "bf16",
            report_to=list(settings.report_to) or "none", save_total_limit=settings.save_total_limit, max_grad_norm=settings.max_grad_norm,
            dataloader_num_workers=settings.dataloader_num_workers, **({"optim": settings.optim} if settings.optim else {}),
            **({"prompts": prompts} if prompts else {}),
            **({"eval_strategy": "steps", "eval_steps": settings.eval_steps, "metric_for_best_model": metric, "greater_is_better": True} if evaluator else {}),
        )
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        state = trainer.state
        del trainer, loss  # with the DDP wrapper the trainer put into the loss, before the process group goes (guide.leave_distributed)
        gc.collect()
        if rank != 0:
            guide_mod.leave_distributed(world_size)  # wait until rank 0 has saved (and evaluated) the model
            return None
        remove_guide_projection(model)  # --distill embed's projection was trained with the student, not part of it
        model.save(str(stage.dir / "final"))
        with open(stage.dir / "final" / "README.md", "a") as card:
            card.write(gist_model_card(masks, settings, prompts))
        if sts or beir:
            results = evaluate_model(model, built=built)
            if evaluator is not None:
                best = state.best_model_checkpoint
                results["best_checkpoint"] = str(out / Path(best).relative_to(stage.dir)) if best else None  # where it is once OUT is in place
                results["best_step"] = state.best_global_step
                results["best_metric"] = state.best_metric
            artifacts.write_json(stage.dir / "eval.json", results)
    guide_mod.leave_distributed(world_size)
    if settings.hub_model_id:
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(settings.hub_model_id, exist_ok=True)
            api.upload_folder(repo_id=settings.hub_model_id, folder_path=str(out / "final"))  # the saved model, its gist model card included
        except Exception as e:  # noqa: BLE001 - the run is finished and saved; the upload failed: one line
            raise GistError(f"--push-to-hub {settings.hub_model_id}: upload failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"the trained model is saved in {out / 'final'}") from None
    return out / "final"
