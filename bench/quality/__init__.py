"""quality: which signal of one guide pass trains the best student, measured over several seeds?

`python -m bench.quality [--quick] [--plan by-task|clustered] [--variants ...] [--seeds 0,1,2] [--resume]`
fine-tunes the student on exactly the same planned batches (one plan, replayed through
`pipeline.train.build_trainer`), with the same hyper-parameters, changing only the training signal:

- mnrl:            sentence-transformers `MultipleNegativesRankingLoss` (candidates ap, an);
- unguided:        `GuidedMaskLoss(guided=False)`: GISTEmbedLoss's candidates (ap, aa, pp, an), only
                   self-pairs masked: the ablation that separates guidance from the extra candidates;
- guided:          `GuidedMaskLoss` reading the guide's stage-1 masks;
- guided+filter:   guided, on the data `gist filter` kept (positive within the guide's top 10 among
                   the positives), re-planned with the same settings (`precompute-guide --reuse`:
                   nothing re-encoded);
- guided+distill:  guided + 1.0 x in-batch KL distillation from the stored guide embeddings
                   (`gist train --distill kl`);
- guided+dedup:    guided, with exact duplicates masked by text id (`--mask-duplicates`: a candidate whose
                   text is the row's own anchor or positive); every other variant uses GISTEmbedLoss's
                   exact rule (`--no-mask-duplicates`).

each with several trainer seeds (dropout), and evaluates them and the untrained student (base) on
SciFact test (BEIR, nDCG@10, 300 queries) and STS-B test (Spearman, 1379 pairs). Statistics
(`bench.quality.stats`): mean and spread over seeds, and paired differences whose 95% intervals
cover both test-set sampling (bootstrap over queries / pairs) and seed variance (t over seeds).

Modules: `experiment` (the settings and variants, fixed before any result was seen), `phases` (the
guide pass, plans, trainings and evaluations, each a resumable phase), `evaluation` (per-item
scores captured from the evaluators), `stats` (the comparisons), `__main__` (the command, tables).
"""

NAME = "quality"
