"""gpu_check: the GPU checks of issues 15 and 16 as one prepared run (sized for < 8 minutes on one H200).

No GPU was lent while this was written; it runs here on CPU with `--device cpu --quick` (tiny
sizes, to check the script itself) and is left for whoever next has a GPU:

    python -m bench.gpu_check --out "$OUT"             # on the GPU machine
    python -m bench.gpu_check --out /tmp/g --device cpu --quick

Trained weights do not travel there, so the models are the real architectures built from their
configurations in bench/gpu_models/ (all-MiniLM-L6-v2 student, all-mpnet-base-v2 guide; tokenizer
and module files, no weights) with seeded random weights. What it measures:

1. stage 1 on the device: `precompute_guide` over the sample with the mpnet guide in float32 (the
   default) and with `guide_dtype="float16"` (timed), and the mask entries the 16-bit guide flips;
2. equivalence under autocast (bf16 and fp16): GuidedMaskLoss vs GISTEmbedLoss and
   CachedGuidedMaskLoss vs CachedGISTEmbedLoss on planned batches, with a second random MiniLM as
   the guide (same tokenizer, so GISTEmbedLoss does not retokenize); loss and gradient differences.
   Like with like: the stored masks come from a float32 guide pass and the online guide runs in
   float32 too (its forward kept out of the student's autocast), so the check measures the loss,
   not the mask entries a 16-bit guide flips;
3. training: 3 trainer steps in bf16 and in fp16 with each guided loss (finite losses, weights move);
4. train_step ratios: seconds per step and peak CUDA memory of MNRL, GuidedMaskLoss and
   GISTEmbedLoss with the mpnet guide online, at batch 128 (the bench train_step targets);
5. masks at scale (issue 15): a synthetic 1M x 768 guide pass (bench.synthetic.write_pass), then
   `replan` on CUDA with 80 epochs (target <= 60 s for the masks), and its first row groups checked
   against the CPU's masks: differing entries counted within float32 rounding of their threshold
   (pipeline.mask_check's band, expected) and beyond it (expected none); with faiss-gpu importable, the
   IVF index and a clustered plan built on the GPU (timed), else recorded as not available.
6. a static student (bench.static_step.device_run): a 256-dim StaticEmbedding over MiniLM's tokenizer
   trained with MNRL, with the stored masks and with the mpnet guide online, at batch 256, 1024 and 2048
   (3 warm-up + 10 timed steps each), stage 1 timed: guided/MNRL time, online/guided time and the
   break-even step count on the GPU. Expected there: online/guided ~10-30x rather than the CPU's hundreds,
   because the guide's forward (~5 TFLOP per 512 texts of ~64 tokens: ~0.1-0.3 s in float32) gains far
   more from the GPU than the static step, which is mostly CPU tokenization (~10-20 ms); break-even still
   near one epoch (stage 1 embeds each unique text once, the online guide every text of every step).

The GPU machine lacks `datasets` and FAISS: carry their wheels (DEVELOPERS.md / the device tool's
README: `pip download` datasets, faiss-gpu or faiss-cpu, and their missing dependencies into .whl/).
Writes OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.common import ROOT, SAMPLE, machine_info

CONFIGS = ROOT / "bench" / "gpu_models"


def random_model(name: str, work: Path, seed: int, device: str, layers: int | None = None):
    """A SentenceTransformer of `name`'s architecture with seeded random weights (saved under `work`)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoModel

    target = work / f"{name}-seed{seed}"
    if not target.exists():
        shutil.copytree(CONFIGS / name, target)
        config = AutoConfig.from_pretrained(target)
        if layers:
            config.num_hidden_layers = layers
        torch.manual_seed(seed)
        AutoModel.from_config(config).save_pretrained(target)
    return SentenceTransformer(str(target), device=device)


def batch_inputs(model, dataset, ids):
    rows = dataset[list(map(int, ids))]
    return [model.preprocess(rows[c]) for c in dataset.column_names if c != "label"], torch.tensor(rows["label"])


def loss_and_grads(model, loss_fn, dataset, ids, dtype):
    from sentence_transformers.util import batch_to_device

    model.zero_grad()
    features, labels = batch_inputs(model, dataset, ids)
    with torch.autocast(model.device.type, dtype=dtype):
        loss = loss_fn([batch_to_device(f, model.device) for f in features], labels.to(model.device))
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def float32_online(guide):
    """`guide` with its forward kept out of any autocast: float32 embeddings, as the float32 guide pass
    stored them (under the student's autocast GISTEmbedLoss's guide would run in 16 bits)."""
    forward = guide.forward

    def forward_float32(*args, **kwargs):
        with torch.autocast(guide.device.type, enabled=False):
            return forward(*args, **kwargs)

    guide.forward = forward_float32
    return guide


def mask_flips(first: Path, second: Path) -> dict:
    """Entries per block whose stored masks differ between two guide passes of the same plan."""
    from pipeline.masks import BLOCKS, PlannedMasks

    a, b = PlannedMasks(first / "masks.parquet"), PlannedMasks(second / "masks.parquet")
    g, k = a.params.batch_size, a.num_negatives
    cols = {"ap": g, "aa": g, "pp": g, "an": g * k}
    return {block: int((a.dense(block, 0, a.num_batches, g, cols[block]) != b.dense(block, 0, b.num_batches, g, cols[block])).sum()) for block in BLOCKS}


def equivalence(student, guide, masks, dataset, rows) -> dict:
    """Largest loss and relative gradient differences, ours vs sentence-transformers, per (precision, loss)."""
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss, GISTEmbedLoss

    from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss

    p = masks.params
    rule = dict(margin_strategy=p.margin_strategy, margin=p.margin, contrast_anchors=p.contrast_anchors, contrast_positives=p.contrast_positives)
    guide = float32_online(guide)
    pairs = {
        "guided": (GuidedMaskLoss(student, masks), GISTEmbedLoss(student, guide, **rule)),
        "cached": (CachedGuidedMaskLoss(student, masks, mini_batch_size=32), CachedGISTEmbedLoss(student, guide, mini_batch_size=32, **rule)),
    }
    result = {}
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for name, (ours, reference) in pairs.items():
            worst = {"loss": 0.0, "grad": 0.0}
            for row in rows:
                masks.cursor.step = row
                loss_ours, grads_ours = loss_and_grads(student, ours, dataset, masks.batches[row], dtype)
                loss_ref, grads_ref = loss_and_grads(student, reference, dataset, masks.batches[row], dtype)
                worst["loss"] = max(worst["loss"], abs(loss_ours - loss_ref))
                worst["grad"] = max(worst["grad"], *((grads_ours[k] - g).abs().max().item() / max(1.0, g.abs().max().item()) for k, g in grads_ref.items()))
            result[f"{name}_{precision}"] = worst
    return result


def short_training(student_factory, data, masks, work: Path, device: str) -> dict:
    """3 trainer steps per (loss, precision): final loss, finite, whether the weights moved."""
    from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss
    from pipeline.train import build_trainer

    result = {}
    for precision in ("bf16", "fp16"):
        for name in ("guided", "cached"):
            model = student_factory()
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            loss = GuidedMaskLoss(model, masks) if name == "guided" else CachedGuidedMaskLoss(model, masks, mini_batch_size=32)
            trainer = build_trainer(model, data, masks, loss, work / f"train-{name}-{precision}", max_steps=3, logging_steps=1, learning_rate=1e-4,
                                    warmup_steps=0, save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu",
                                    bf16=precision == "bf16", fp16=precision == "fp16" and device != "cpu")
            trainer.train()
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            moved = max((model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in before.items())
            result[f"{name}_{precision}"] = {"losses": losses, "finite": all(map(lambda x: x == x and abs(x) < float("inf"), losses)), "max_weight_change": moved}
    return result


def step_times(student_factory, guide, data, masks, work: Path, device: str, steps: int) -> dict:
    """Seconds per trainer step (after 2 warm-up steps) and peak CUDA memory, per loss, bf16."""
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MultipleNegativesRankingLoss

    from pipeline.loss import GuidedMaskLoss
    from pipeline.train import build_trainer

    result = {}
    for name in ("mnrl", "guided", "online"):
        model = student_factory()
        loss = {"mnrl": lambda: MultipleNegativesRankingLoss(model, scale=100.0), "guided": lambda: GuidedMaskLoss(model, masks),
                "online": lambda: GISTEmbedLoss(model, guide)}[name]()
        ends = []

        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if device != "cpu":
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())

        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        trainer = build_trainer(model, data, masks, loss, work / f"steps-{name}", callbacks=[Clock()], max_steps=2 + steps, save_strategy="no",
                                logging_strategy="no", disable_tqdm=True, use_cpu=device == "cpu", bf16=True)
        trainer.train()
        result[name] = {"step_s": (ends[-1] - ends[1]) / steps, "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None}
    result["guided_over_mnrl_time"] = result["guided"]["step_s"] / result["mnrl"]["step_s"]
    result["online_over_guided_time"] = result["online"]["step_s"] / result["guided"]["step_s"]
    return result


def masks_at_scale(work: Path, device: str, quick: bool) -> dict:
    """Issue 15 on the GPU: 80 epochs of masks for 1M x 768 synthetic examples, and GPU FAISS."""
    from bench import synthetic
    from pipeline.guide import build_index, load_guide_pass
    from pipeline.mask_check import differences, rounding_band
    from pipeline.masks import BLOCKS, PlannedMasks, PlanParams, guide_similarities
    from pipeline.stage1 import replan

    examples, dim, epochs = (20_000, 64, 2) if quick else (1_000_000, 768, 80)
    pass_dir = work / "synthetic-pass"
    start = time.perf_counter()
    synthetic.write_pass(pass_dir, examples, dim)
    report: dict = {"examples": examples, "dim": dim, "epochs": epochs, "write_pass_s": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    replan(pass_dir, work / "plan-gpu", PlanParams(batch_size=32, epochs=epochs, strategy="random"), device=device, overwrite=True)
    report["replan_random_s"] = round(time.perf_counter() - start, 1)  # load + checksums + plan + masks
    gpu = PlannedMasks(work / "plan-gpu" / "masks.parquet")
    start = time.perf_counter()
    replan(pass_dir, work / "plan-cpu", PlanParams(batch_size=32, epochs=1, strategy="random"), device="cpu", overwrite=True)
    report["replan_random_1_epoch_cpu_s"] = round(time.perf_counter() - start, 1)
    cpu = PlannedMasks(work / "plan-cpu" / "masks.parquet")
    rows = min(cpu.num_batches, 4096)
    _, data, embeddings = load_guide_pass(pass_dir)
    band = rounding_band(dim, cpu.params)
    cols = {"ap": 32, "aa": 32, "pp": 32, "an": 32 * cpu.num_negatives}
    differing = {block: {"beyond_band": 0, "near_threshold": 0} for block in BLOCKS}
    for start in range(0, rows, 512):  # the CPU's similarities of these batches, to class each difference
        stop = min(rows, start + 512)
        sims = {name: value.numpy() for name, value in guide_similarities(embeddings, data, cpu.batch_rows(start, stop), cpu.params).items()}
        for block in BLOCKS:
            if block in sims:
                real, near = differences(gpu.dense(block, start, stop, 32, cols[block]), cpu.dense(block, start, stop, 32, cols[block]),
                                         sims[block], sims["threshold"], cpu.params, band)
                differing[block]["beyond_band"] += real
                differing[block]["near_threshold"] += near
    report["cpu_vs_gpu_differing_entries_first_rows"] = differing
    report["cpu_vs_gpu_rounding_band"] = band
    report["cpu_vs_gpu_rows_compared"] = rows
    try:
        import faiss

        report["faiss"] = {"version": faiss.__version__, "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}
        start = time.perf_counter()
        report["faiss"]["index"] = build_index(embeddings, work / "index.faiss", "ivf", device)
        report["faiss"]["ivf_index_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        replan(pass_dir, work / "plan-clustered", PlanParams(batch_size=32, epochs=1, strategy="clustered"), device=device, overwrite=True)
        report["faiss"]["replan_clustered_s"] = round(time.perf_counter() - start, 1)
    except ImportError as e:
        report["faiss"] = {"available": False, "why": str(e)}
    shutil.rmtree(pass_dir, ignore_errors=True)
    report["note"] = "timings include reading and checksumming the pass"
    return report


def main() -> None:
    from pipeline.data import load_training_data
    from pipeline.masks import PlannedMasks, PlanParams
    from pipeline.stage1 import precompute_guide
    from pipeline.train import training_dataset

    parser = argparse.ArgumentParser(description="GPU checks of issue 16 (see the module docstring)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on CPU")
    args = parser.parse_args()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows, batch, layers, steps = (64, 16, 1, 2) if args.quick else (2048, 128, None, 10)
    data_path = work / "data.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, rows), data_path)
    report: dict = {"machine": machine_info(), "quick": args.quick, "device": args.device, "batch_size": batch}

    mpnet = random_model("all-mpnet-base-v2", work, 1, args.device, layers)
    mpnet_dir = work / "all-mpnet-base-v2-seed1"
    report["stage1"] = {"guide": str(mpnet_dir)}
    for dtype, name in (("float32", "pass-mpnet"), ("float16", "pass-mpnet-fp16")):
        start = time.perf_counter()
        precompute_guide(data_path, mpnet_dir, work / name, PlanParams(batch_size=batch, epochs=1), device=args.device, overwrite=True, guide_dtype=dtype)
        report["stage1"][dtype] = {"seconds": time.perf_counter() - start, "manifest": json.loads((work / name / "manifest.json").read_text())["timings"]}
    report["stage1"]["float16_vs_float32_mask_flips"] = mask_flips(work / "pass-mpnet", work / "pass-mpnet-fp16")

    random_model("all-MiniLM-L6-v2", work, 2, args.device, layers)  # the same-tokenizer guide of the equivalence check
    guide_dir = work / "all-MiniLM-L6-v2-seed2"
    precompute_guide(data_path, guide_dir, work / "pass-minilm", PlanParams(batch_size=batch, epochs=1, margin=0.05), device=args.device,
                     overwrite=True, guide_dtype="float32")  # float32 masks, compared with the float32 online guide
    masks = PlannedMasks(work / "pass-minilm" / "masks.parquet")
    data = load_training_data(data_path)
    dataset = training_dataset(data)

    def student():
        return random_model("all-MiniLM-L6-v2", work, 0, args.device, layers)

    from sentence_transformers import SentenceTransformer

    same_vocab_guide = SentenceTransformer(str(guide_dir), device=args.device)  # float32, kept out of autocast by equivalence()
    report["equivalence"] = equivalence(student(), same_vocab_guide, masks, dataset, rows=[0, 1])
    report["training"] = short_training(student, data, masks, work, args.device)
    mpnet_masks = PlannedMasks(work / "pass-mpnet" / "masks.parquet")
    report["train_step"] = step_times(student, mpnet, data, mpnet_masks, work, args.device, steps)
    report["masks_at_scale"] = masks_at_scale(work, args.device, args.quick)
    from bench.static_step import device_run  # 6. a static student: MNRL vs stored masks vs the online mpnet guide, batch 256/1024/2048

    report["static_step"] = device_run(work, mpnet_dir, args.device, args.quick)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: report[k] for k in ("stage1", "equivalence", "train_step", "masks_at_scale", "static_step")}, indent=2, default=str))


if __name__ == "__main__":
    main()
