"""The experiment's resumable phases: the guide pass, the plans, the trainings and their evaluations.

Each phase runs the pipeline's own functions (`precompute_guide`, `replan`, `filter_pass`,
`build_loss` + `build_trainer`, `evaluate_model`), keeps its result (and per-item scores) under
WORK/phases, and is reused by `--resume` only while its key — a hash of the settings and of what it
was computed from (masks' sha256, variant, seed) — is unchanged. Guide passes and plans are reused
when their manifest records the wanted data, guide and plan; they are deterministic either way.

WORK layout: train.parquet; guide/ (stage 1, the stage-1 strategy's plan); plans/STRATEGY/ (re-planned
from guide/); filtered/ (clean.parquet from `gist filter`, its guide pass with --reuse, plans/);
runs/STRATEGY/VARIANT/seedN/ (train logs, final model); phases/.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.quality.evaluation import evaluate
from bench.quality.experiment import Settings, Variant


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


class Phases:
    """Finished phases of one work directory: results and per-item details, by name and key."""

    def __init__(self, work: Path, resume: bool):
        self.dir = work / "phases"
        self.resume = resume

    def _read(self, name: str, kind: str, key: str):
        path = self.dir / f"{name}.{kind}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["value"]
        return None

    def load(self, name: str, key: str) -> tuple[dict, dict] | None:
        """(result, details) of a finished phase with this key, if --resume."""
        if not self.resume:
            return None
        result, details = self._read(name, "result", key), self._read(name, "details", key)
        if result is None or details is None:
            return None
        log(f"{name}: reusing the finished phase")
        return result, details

    def finished(self, name: str, key: str) -> tuple[dict, dict] | None:
        """(result, details) of a finished phase with this key, resuming or not (for the tables)."""
        result, details = self._read(name, "result", key), self._read(name, "details", key)
        return None if result is None or details is None else (result, details)

    def save(self, name: str, key: str, result: dict, details: dict) -> None:
        from pipeline.artifacts import write_json

        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / f"{name}.details.json", {"key": key, "value": details})
        write_json(self.dir / f"{name}.result.json", {"key": key, "value": result})


def plan_params(s: Settings, strategy: str, dedup: bool = False):
    from pipeline.masks import PlanParams

    return PlanParams(batch_size=s.batch_size, epochs=s.epochs, seed=s.plan_seed, strategy=strategy, margin_strategy=s.margin_strategy,
                      margin=s.margin, contrast_anchors=s.contrast_anchors, contrast_positives=s.contrast_positives, mask_duplicates=dedup)


def _matches(out: Path, s: Settings, strategy: str, fingerprint: str, dedup: bool = False, guide_prompts: str | None = None) -> bool:
    """Whether OUT holds a finished pass or plan of this data with the wanted plan (and guide length and prompts)."""
    from pipeline.artifacts import read_manifest
    from pipeline.prompts import split_prompt_spec
    from pipeline.views import ROLES, GuideViews

    if not (out / "manifest.json").is_file():
        return False
    manifest = read_manifest(out)
    guide = manifest["guide"]
    guide_ok = Path(guide["path"]).resolve() == Path(s.guide).resolve() and (s.guide_max_seq_length in (None, guide.get("max_seq_length")))
    views = GuideViews.from_record(guide["views"])
    wanted = split_prompt_spec(guide_prompts, "--guide-prompts")
    wanted = {role: wanted for role in ROLES} if isinstance(wanted, str) else wanted or {}
    prompts_ok = guide_prompts is None or all(views.view_of(role).prompt == wanted.get(role, "") for role in ROLES)
    return (manifest["dataset"]["fingerprint"] == fingerprint and guide_ok and prompts_ok
            and manifest["plan"]["params"] == asdict(plan_params(s, strategy, dedup)))


def guide_pass(s: Settings, data_path: Path, out: Path, reuse: tuple = (), guide_prompts: str | None = None) -> Path:
    """Stage 1 (`precompute_guide`) over DATA with the stage-1 strategy (and `guide_prompts`); reused if already there."""
    from pipeline.data import load_training_data
    from pipeline.stage1 import precompute_guide

    if not _matches(out, s, s.stage1_strategy, load_training_data(data_path).fingerprint, guide_prompts=guide_prompts):
        log(f"stage 1: precompute-guide {data_path} with {s.guide}" + (f" (--reuse {', '.join(map(str, reuse))})" if reuse else "")
            + (f" --guide-prompts {guide_prompts!r}" if guide_prompts is not None else ""))
        precompute_guide(data_path, s.guide, out, plan_params(s, s.stage1_strategy), encode_batch_size=s.encode_batch_size,
                         guide_max_seq_length=s.guide_max_seq_length, reuse=list(reuse), overwrite=True, guide_prompts=guide_prompts)
    return out


def plan(s: Settings, pass_dir: Path, strategy: str, dedup: bool = False) -> Path:
    """The directory whose masks.parquet is `strategy`'s plan (with duplicates masked by text id if
    `dedup`): the pass itself, or `replan` from it."""
    from pipeline.artifacts import read_manifest
    from pipeline.stage1 import replan

    if strategy == s.stage1_strategy and not dedup:
        return pass_dir
    out = pass_dir.parent / "plans" / (strategy + ("-dedup" if dedup else ""))
    if not _matches(out, s, strategy, read_manifest(pass_dir)["dataset"]["fingerprint"], dedup):
        log(f"gist plan --strategy {strategy} --{'' if dedup else 'no-'}mask-duplicates from {pass_dir}")
        replan(pass_dir, out, plan_params(s, strategy, dedup), overwrite=True)
    return out


def filtered_data(s: Settings, pass_dir: Path, work: Path) -> tuple[Path, dict]:
    """`gist filter` of the stage-1 pass's data (positive within the guide's top-k), and its summary."""
    from pipeline.filter import FilterParams, filter_pass, summary_path

    out = work / "filtered" / "clean.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = FilterParams(top_k=s.filter_top_k, among=s.filter_among)
    summary = summary_path(out)
    if summary.is_file() and out.is_file():
        saved = json.loads(summary.read_text())
        if saved["params"] == asdict(params) and saved["guide_dir"] == str(pass_dir.resolve()):
            return out, saved
    log(f"gist filter --top-k {s.filter_top_k} --among {s.filter_among}")
    return out, filter_pass(pass_dir, out, params, overwrite=True)


def load_student(s: Settings, path: str | None = None):
    from pipeline.guide import load_model

    model = load_model(path or s.student, "auto")
    model.max_seq_length = s.student_max_seq_length
    return model


def base_run(s: Settings, phases: Phases) -> tuple[dict, dict]:
    """The untrained student's evaluation."""
    key = s.key("base")
    saved = phases.load("base", key)
    if saved is not None:
        return saved
    log("evaluating the untrained student")
    metrics, eval_s, details = evaluate(s.sts, s.beir, load_student(s))
    result = {"metrics": metrics, "eval_s": eval_s}
    phases.save("base", key, result, details)
    return result, details


def train_key(s: Settings, variant: Variant, seed: int, masks_path: Path) -> str:
    return s.key("train", asdict(variant), seed, hashlib.sha256(masks_path.read_bytes()).hexdigest())


def train_run(s: Settings, variant: Variant, seed: int, data_path: Path, masks_path: Path, out: Path, phases: Phases) -> tuple[dict, dict]:
    """Train one student with `variant`'s signal on the planned batches of `masks_path`, then evaluate it.

    The loss is `pipeline.train.build_loss` of the variant's TrainSettings (the loss `gist train`
    builds); a wrapper records the plan row of every batch it sees, which must be 0, 1, 2, ...
    """
    import transformers

    from pipeline import train
    from pipeline.data import load_training_data
    from pipeline.masks import PlannedMasks

    name = f"{out.parent.parent.name}.{variant.name}.seed{seed}"
    key = train_key(s, variant, seed, masks_path)
    saved = phases.load(name, key)
    if saved is not None:
        return saved
    log(f"training {variant.name}, seed {seed}, on {masks_path}")
    masks = PlannedMasks(masks_path)
    training = load_training_data(data_path)
    train.check_masks_match(masks, training)
    model = load_student(s)
    settings = train.TrainSettings(loss=variant.loss, lr=s.learning_rate, warmup_ratio=s.warmup_ratio, lr_scheduler=s.lr_scheduler,
                                   temperature=s.temperature, seed=seed, distill=variant.distill, distill_weight=variant.distill_weight,
                                   hardness_mode=variant.hardness_mode, hardness_strength=variant.hardness_strength)
    settings.check(model.get_embedding_dimension())
    transformers.set_seed(seed)  # a distillation projection is initialised when the loss is built
    loss = train.build_loss(model, masks, settings)
    rows_seen: list[int] = []
    loss_forward = loss.forward

    def recording_forward(sentence_features, labels):
        rows_seen.append(masks.due_row(labels.cpu().numpy()))
        return loss_forward(sentence_features, labels)

    loss.forward = recording_forward
    out.mkdir(parents=True, exist_ok=True)
    train_log = out / train.TRAIN_LOG
    train_log.unlink(missing_ok=True)
    trainer = train.build_trainer(
        model, training, masks, loss, out, callbacks=[train.JsonlLogCallback(train_log)],
        learning_rate=s.learning_rate, warmup_steps=s.warmup_ratio, lr_scheduler_type=s.lr_scheduler, max_steps=s.max_steps,
        logging_steps=10, save_strategy="no", seed=seed, use_cpu=model.device.type == "cpu", disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    if rows_seen != list(range(trainer.state.global_step)):
        raise RuntimeError(f"{name}: the trainer did not replay the plan in order (first rows seen: {rows_seen[:8]})")
    model.save(str(out / "final"))
    metrics, eval_s, details = evaluate(s.sts, s.beir, model)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "variant": asdict(variant), "seed": seed, "metrics": metrics, "steps": trainer.state.global_step,
        "replayed_plan_rows_in_order": True, "masks": str(masks_path), "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, trainer.state.global_step), 2), "eval_s": eval_s,
        "train_loss_first_log": round(losses[0], 4) if losses else None, "train_loss_last_log": round(losses[-1], 4) if losses else None,
        "loss": {"name": type(loss).__name__, **loss.get_config_dict()} if hasattr(loss, "get_config_dict") else type(loss).__name__,
        "model_dir": str(out / "final"),
    }
    phases.save(name, key, result, details)
    return result, details
