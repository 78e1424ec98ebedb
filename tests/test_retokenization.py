"""Guide with another vocabulary (tiny-guide-bert): GISTEmbedLoss feeds the guide the student's
decoded tokens, stage 1 feeds it the raw text. Measure how many mask entries that changes, and
show that with the decoded inputs our masks reproduce GISTEmbedLoss exactly."""

from __future__ import annotations

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

from pipeline.data import load_training_data
from pipeline.artifacts import read_manifest
from pipeline.loss import GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks, write_plan_masks
from pipeline.train import training_dataset
from tests.conftest import GUIDE_RETOKENIZE, gist, load_student
from tests.test_equivalence import TOL, loss_and_grads


def decoded_as_gist_embed_loss_does(student, texts):
    """What GISTEmbedLoss gives the guide: the student's tokens decoded (lower-cased, truncated)."""
    ids = student.preprocess(texts)["input_ids"]
    return student.tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_raw_text_vs_decoded_tokens(tmp_path, triplets, capsys):
    gist("precompute-guide", triplets, "--guide", GUIDE_RETOKENIZE, "--out", tmp_path / "raw", "--batch-size", "16", "--margin", "0.01")
    raw = PlannedMasks(tmp_path / "raw" / MASKS)
    data = load_training_data(triplets)
    student, guide = load_student(), SentenceTransformer(str(GUIDE_RETOKENIZE), device="cpu")

    decoded_texts = decoded_as_gist_embed_loss_does(student, data.texts.to_pylist())
    decoded_emb = guide.encode(decoded_texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    (tmp_path / "decoded").mkdir()
    write_plan_masks(tmp_path / "decoded", decoded_emb, data, raw.plan, raw.params, read_manifest(tmp_path / "raw")["guide"])
    decoded = PlannedMasks(tmp_path / "decoded" / MASKS)

    # With the decoded inputs, the stored-mask loss is GISTEmbedLoss's.
    reference = GISTEmbedLoss(student, guide, margin=0.01)
    assert reference.must_retokenize
    dataset = training_dataset(data)
    for row, example_ids in enumerate(decoded.batches[:2]):
        decoded.cursor.step = row
        ours, _ = loss_and_grads(student, GuidedMaskLoss(student, decoded), dataset, example_ids)
        ref, _ = loss_and_grads(student, reference, dataset, example_ids)
        assert abs(ours - ref) < TOL

    # How much the guide's input changes its verdicts (reported; the figure is in the README).
    changed = total = 0
    for row in range(len(raw.batches)):
        for block, cols in (("ap", 16), ("aa", 16), ("pp", 16), ("an", 16)):
            a, b = raw.dense(block, row, row + 1, 16, cols), decoded.dense(block, row, row + 1, 16, cols)
            changed += int((a != b).sum())
            total += int(a.sum() + b.sum())
    differing_texts = sum(r != d for r, d in zip(data.texts.to_pylist(), decoded_texts))
    with capsys.disabled():
        print(f"\nretokenization: {differing_texts}/{len(data.texts)} texts change when decoded; "
              f"{changed} of {raw.batches.size * 16 * 4} mask entries differ ({total} masked in either)")
    assert differing_texts > 0  # the sample has upper case, so the guide input really differs
