"""Train a sentence-transformers student with gist's stored guide masks, from your own script.

This is an ordinary SentenceTransformerTrainer script — MatryoshkaLoss, an evaluator during
training, checkpoints, an E5-style prompted student (`query: ` on anchors, `passage: ` on
positives and negatives, through the trainer's `prompts`) — in which GISTEmbedLoss(model, guide) is replaced by GuidedMaskLoss(model,
masks). Stage 1 runs the guide once (here in-process; `gist precompute-guide` does the same), so
the guide is never loaded while training. Compared with a GISTEmbedLoss script, the lines marked
`# gist` differ.

    python examples/train_with_gist.py --data data/train.parquet --guide GUIDE --student STUDENT \
        --sts data/stsb_dev.parquet --out runs/example [--mini-batch-size 32] [--query-prompt "query: " --passage-prompt "passage: "]

Stage 1 gives the guide the student's prompt strings (`guide_prompts`), what GISTEmbedLoss's guide
sees (`--query-prompt '' --passage-prompt ''`: no prompt for either); drop `guide_prompts=` from
precompute_guide and the guide encodes anchors and documents with its own prompts instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from pipeline import CachedGuidedMaskLoss, GuidedMaskLoss, PlannedMasks, PlanParams  # gist
from pipeline import planned_dataset, planned_training_args, precompute_guide  # gist
from pipeline.evaluate import PromptedSimilarityEvaluator  # gist: EmbeddingSimilarityEvaluator with a prompt on both sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="anchor, positive[, negative][, task] as Parquet")
    parser.add_argument("--guide", required=True, help="guide model directory (stage 1 only)")
    parser.add_argument("--student", required=True, help="student model directory")
    parser.add_argument("--sts", required=True, help="STS Parquet (sentence1, sentence2, score) evaluated during training")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--mini-batch-size", type=int, default=None, help="GradCache: CachedGuidedMaskLoss with this mini-batch")
    parser.add_argument("--dims", default="384,256,128,64", help="Matryoshka dimensions (at most the student's)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--query-prompt", default="query: ", help="the student's prompt on anchors (and on STS sentences); '' for none")
    parser.add_argument("--passage-prompt", default="passage: ", help="the student's prompt on positives and negatives; '' for none")
    args = parser.parse_args()

    # Stage 1, once per dataset and plan: the guide's verdicts for every planned batch.  # gist
    role_prompts = {"anchor": args.query_prompt, "positive": args.passage_prompt, "negative": args.passage_prompt}  # gist
    guide_pass = precompute_guide(args.data, args.guide, args.out / "guide", PlanParams(batch_size=args.batch_size, epochs=args.epochs, margin=0.05),  # gist
                                  guide_prompts=role_prompts)  # gist: the guide reads the student's prompts, as GISTEmbedLoss's guide does
    masks = PlannedMasks(guide_pass.masks)  # gist

    model = SentenceTransformer(args.student)
    train_dataset = planned_dataset(Dataset.from_parquet(args.data), masks)  # gist: adds the example-id label, refuses other data
    if args.mini_batch_size:
        guided = CachedGuidedMaskLoss(model, masks, mini_batch_size=args.mini_batch_size)  # gist: was CachedGISTEmbedLoss(model, guide, ...)
    else:
        guided = GuidedMaskLoss(model, masks)  # gist: was GISTEmbedLoss(model, guide, margin=0.05)
    loss = MatryoshkaLoss(model, guided, matryoshka_dims=[int(d) for d in args.dims.split(",")])

    # sentence-transformers' training prompts, per column of the training dataset (anchor, positive, negative_1..k)
    prompts = {column: args.query_prompt if column == "anchor" else args.passage_prompt for column in train_dataset.column_names if column != "label"}

    sts = Dataset.from_parquet(args.sts)
    evaluator = PromptedSimilarityEvaluator(sts["sentence1"], sts["sentence2"], sts["score"], name="sts",
                                            prompt_kwargs={"prompt": args.query_prompt} if args.query_prompt else None)

    training_args = planned_training_args(  # gist: was SentenceTransformerTrainingArguments(...)
        masks,  # the plan fixes batch size, epochs and the batch sampler
        output_dir=str(args.out / "checkpoints"),
        learning_rate=2e-5,
        warmup_steps=0.1,
        max_steps=args.max_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        logging_steps=10,
        metric_for_best_model="eval_sts_spearman_cosine",
        prompts={c: p for c, p in prompts.items() if p} or None,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=loss, evaluator=evaluator,
        callbacks=[masks.cursor],  # gist: tells the sampler and the loss which planned batch is due
    )
    trainer.train()
    model.save(str(args.out / "final"))
    print(f"best checkpoint {trainer.state.best_model_checkpoint}; final STS Spearman {evaluator(model)['sts_spearman_cosine']:.4f}")


if __name__ == "__main__":
    main()
