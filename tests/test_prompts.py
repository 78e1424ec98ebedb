"""Prompts: the student's training prompts (gist train --prompts / --prompt-names), the evaluators' prompts,
and the equivalence with sentence-transformers' trainer running GISTEmbedLoss with training prompts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

from pipeline import GistError
from pipeline.data import load_training_data
from pipeline.loss import GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks
from pipeline.prompts import EvalPrompts, parse_prompt_spec, resolve_prompt_names, training_prompts
from pipeline.train import build_trainer
from tests.conftest import GUIDE_SAMEVOCAB, ROOT, STUDENT, gist, load_student, small_data
from tests.test_equivalence import TOL, assert_grads_close

PROMPTS = {"anchor": "query: ", "positive": "passage: ", "negative": "passage: "}


def test_prompt_forms():
    assert parse_prompt_spec("query: ") == "query: "
    assert parse_prompt_spec("anchor=query: ,positive=passage: ") == {"anchor": "query: ", "positive": "passage: "}
    # a comma inside a prompt stays in it; only ",column=" separates pairs
    qwen = "Instruct: Given a web search query, retrieve relevant passages\nQuery:"
    assert parse_prompt_spec(f"anchor={qwen},positive=") == {"anchor": qwen, "positive": ""}
    assert parse_prompt_spec(qwen) == qwen
    assert parse_prompt_spec('{"nli": {"anchor": "q: "}}', datasets=("nli",)) == {"nli": {"anchor": "q: "}}
    # per-dataset pairs: a dataset name may start with a digit, as in a DATA mixture (one name=value grammar)
    assert parse_prompt_spec("2wiki=query: ,nli=q: ", datasets=("2wiki", "nli")) == {"2wiki": "query: ", "nli": "q: "}
    assert training_prompts("anchor=q: ,negative=p: ", num_negatives=2) == {"anchor": "q: ", "negative_1": "p: ", "negative_2": "p: "}
    assert training_prompts({"negative": "p: ", "negative_2": "n2: "}, 2) == {"negative_1": "p: ", "negative_2": "n2: "}
    assert resolve_prompt_names("anchor=query,positive=document", {"query": "q: ", "document": "d: "}, 0) == {"anchor": "q: ", "positive": "d: "}
    for bad, message in [('{"anchor": 3}', "must be a string"), ('{"nli": {"anchor": "q"}}', "not a dataset"), ("{oops", "JSON"),
                         ('{"query": "q: "}', "unknown key")]:
        with pytest.raises(GistError, match=message):
            parse_prompt_spec(bad)
    with pytest.raises(GistError, match="1 negative column"):
        training_prompts("negative_2=p: ", 1)
    with pytest.raises(GistError, match="no prompt named 'query'"):
        resolve_prompt_names("query", {"document": ""}, 0)
    with pytest.raises(GistError, match="one of them"):
        EvalPrompts(query="q: ", query_name="query").check()


@pytest.fixture(scope="module")
def prompted_pass(tmp_path_factory):
    """(DATA, a same-vocabulary guide pass over DATA whose guide was given the student's prompt strings, --guide-prompts)."""
    root = tmp_path_factory.mktemp("prompted")
    plain = small_data(root / "plain.parquet", 96)
    out = root / "guide"
    gist("precompute-guide", plain, "--guide", GUIDE_SAMEVOCAB, "--out", out, "--batch-size", "16", "--epochs", "2", "--margin", "0.05",
         "--no-mask-duplicates", "--guide-prompts", ",".join(f"{role}={prompt}" for role, prompt in PROMPTS.items()))
    return plain, out


def trainer_loss_and_grads(trainer, dataset, example_ids):
    """The trainer's collated batch (prompts applied by its collator) through the trainer's compute_loss, and the gradients."""
    model = trainer.model
    model.zero_grad()
    inputs = trainer.data_collator([dataset[int(i)] for i in example_ids])
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prompted_training_equals_gist_embed_loss_in_the_trainer(tmp_path, prompted_pass, guide):
    """sentence-transformers' trainer with prompts (anchor `query: `, positive and negative `passage: `) and online GISTEmbedLoss
    (the same-vocabulary guide sees the student's prompted tokens) equals the same trainer with the same prompts and GuidedMaskLoss
    reading masks from a guide pass made with the same prompt strings (--guide-prompts): loss and gradients per batch, and
    the weights after 6 steps."""
    plain, run = prompted_pass
    masks = PlannedMasks(run / MASKS)
    data = load_training_data(plain)  # the student trains on the plain texts; its collator adds the prompts
    prompts = training_prompts(PROMPTS, data.num_negatives)
    assert prompts == {"anchor": "query: ", "positive": "passage: ", "negative_1": "passage: "}
    students, trainers = {}, {}
    for name in ("masks", "online"):
        torch.manual_seed(0)
        students[name] = student = load_student()
        loss = GuidedMaskLoss(student, masks) if name == "masks" else GISTEmbedLoss(student, guide, margin=0.05)
        trainers[name] = build_trainer(student, data, masks, loss, tmp_path / name, max_steps=6, learning_rate=1e-3, warmup_steps=0,
                                       save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, prompts=prompts)
    dataset = trainers["masks"].train_dataset
    batch = trainers["masks"].data_collator([dataset[int(i)] for i in masks.batches[0]])
    tokens = students["masks"].tokenizer.convert_ids_to_tokens(batch["anchor_input_ids"][0].tolist())
    assert tokens[1:3] == ["query", ":"], tokens  # the collator prompted the anchors
    masked = 0
    for row, example_ids in enumerate(masks.batches[:3]):
        masks.cursor.step = row
        ours = trainer_loss_and_grads(trainers["masks"], dataset, example_ids)
        reference = trainer_loss_and_grads(trainers["online"], dataset, example_ids)
        assert abs(ours[0] - reference[0]) < TOL, (ours[0], reference[0])
        assert_grads_close(ours[1], reference[1])
        masked += sum(len(masks.positions(b, row)) for b in ("ap", "an"))
    assert masked > 0, "the compared batches mask nothing"
    masks.cursor.step = 0
    initial = load_student().state_dict()
    for name in ("masks", "online"):
        torch.manual_seed(0)
        trainers[name].train()
    moved = max((students["masks"].state_dict()[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3
    for k in initial:
        torch.testing.assert_close(students["masks"].state_dict()[k], students["online"].state_dict()[k], atol=5e-5, rtol=1e-4, msg=k)


def test_gist_train_with_prompts_end_to_end(tmp_path, prompted_pass):
    """`gist train --prompts` (masks from a pass over DATA itself) trains, records the prompts in run.json and the model card;
    `--prompt-names` resolves the student's own prompts; evaluator prompts reach the evaluation."""
    plain, _ = prompted_pass
    plain_pass = tmp_path / "pass"
    gist("precompute-guide", plain, "--guide", GUIDE_SAMEVOCAB, "--out", plain_pass, "--batch-size", "16")
    out = tmp_path / "run"
    gist("train", plain, "--masks", plain_pass / MASKS, "--student", STUDENT, "--out", out, "--max-steps", "2", "--device", "cpu",
         "--prompts", "anchor=query: ,positive=passage: ,negative=passage: ", "--sts", ROOT / "data" / "stsb_dev.parquet",
         "--query-prompt", "query: ")
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == "anchor=query: ,positive=passage: ,negative=passage: " and record["query_prompt"] == "query: "
    assert record["training_prompts"] == {"anchor": "query: ", "positive": "passage: ", "negative_1": "passage: "}
    card = (out / "final" / "README.md").read_text()
    assert "Training prompts: anchor: 'query: '" in card and "Evaluation prompts: query 'query: '" in card
    assert "every role read with no prompt" in card  # the tiny guide's own prompts are empty: one view
    assert -1 <= json.loads((out / "eval.json").read_text())["sts_spearman"] <= 1

    # --prompt-names: a student whose config defines query and document prompts
    student = tmp_path / "student"
    shutil.copytree(STUDENT, student)
    config = json.loads((student / "config_sentence_transformers.json").read_text())
    config["prompts"] = {"query": "query: ", "document": "passage: "}
    (student / "config_sentence_transformers.json").write_text(json.dumps(config))
    named = tmp_path / "named"
    gist("train", plain, "--masks", plain_pass / MASKS, "--student", student, "--out", named, "--max-steps", "1", "--device", "cpu",
         "--prompt-names", "anchor=query,positive=document,negative=document")
    assert json.loads((named / "run.json").read_text())["training_prompts"] == {"anchor": "query: ", "positive": "passage: ", "negative_1": "passage: "}

    # refused before OUT is touched: an unknown prompt name, both forms at once, a bad column
    for args, message in [(("--prompt-names", "anchor=instruction"), "defines no prompt named 'instruction'"),
                          (("--prompts", "q: ", "--prompt-names", "query"), "give one of them"),
                          (("--prompts", "negative_3=p: "), "1 negative column"),
                          (("--query-prompt-name", "nope", "--sts", ROOT / "data" / "stsb_dev.parquet"), "no prompt named 'nope'")]:
        refused = gist("train", plain, "--masks", plain_pass / MASKS, "--student", student, "--out", tmp_path / "refused", "--max-steps", "1",
                       "--device", "cpu", *args, check=False)
        assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("error: ")  # one line (after the model's loading bar)
        assert not (tmp_path / "refused").exists()


def test_evaluate_with_prompts(tmp_path):
    """--query-prompt reaches both STS sentences and the BEIR queries, --corpus-prompt the corpus; the scores change and are recorded."""
    sts, beir = ROOT / "data" / "stsb_dev.parquet", ROOT / "data" / "scifact"
    plain = tmp_path / "plain.json"
    gist("evaluate", STUDENT, "--sts", sts, "--out", plain, "--device", "cpu")
    prompted = tmp_path / "prompted.json"
    gist("evaluate", STUDENT, "--sts", sts, "--out", prompted, "--device", "cpu", "--query-prompt", "query: ", "--corpus-prompt", "passage: ")
    results = json.loads(prompted.read_text())
    assert results["prompts"]["query"] == "query: " and results["prompts"]["corpus"] == "passage: "
    assert results["sts_spearman"] != json.loads(plain.read_text())["sts_spearman"]
    from pipeline.evaluate import beir_evaluator, sts_evaluator

    evaluator = beir_evaluator(beir, EvalPrompts("query: ", "passage: "))
    assert (evaluator.query_prompt, evaluator.corpus_prompt) == ("query: ", "passage: ")
    seen = []
    model = load_student()
    original = model.encode
    model.encode = lambda sentences, **kw: (seen.append(kw.get("prompt")), original(sentences, **kw))[1]
    sts_evaluator(sts, EvalPrompts(query="query: "))(model)
    assert seen and set(seen) == {"query: "}


def test_a_student_whose_pooling_excludes_the_prompt(tmp_path, prompted_pass):
    """With `include_prompt: false` in the student's pooling (as INSTRUCTOR-style models), the trainer's collator marks the
    prompt's length and the student's embeddings in the guided loss leave the prompt tokens out, as `encode(prompt=...)` does."""
    plain, run = prompted_pass
    student_dir = tmp_path / "student"
    shutil.copytree(STUDENT, student_dir)
    pooling = student_dir / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "include_prompt": False}))
    from sentence_transformers import SentenceTransformer

    student = SentenceTransformer(str(student_dir), device="cpu", config_kwargs={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    masks = PlannedMasks(run / MASKS)
    data = load_training_data(plain)
    trainer = build_trainer(student, data, masks, GuidedMaskLoss(student, masks), tmp_path / "t", prompts=training_prompts(PROMPTS, 1),
                            use_cpu=True, save_strategy="no")
    example_ids = masks.batches[0]
    batch = trainer.data_collator([trainer.train_dataset[int(i)] for i in example_ids])
    assert "anchor_prompt_length" in batch
    features = {k.removeprefix("anchor_"): v for k, v in batch.items() if k.startswith("anchor_")}
    with torch.no_grad():
        ours = student(features)["sentence_embedding"]
    texts = data.texts.take(data.anchor_ids[example_ids]).to_pylist()
    expected = student.encode(texts, prompt="query: ", convert_to_tensor=True, batch_size=len(texts))
    with_prompt = student.encode(["query: " + t for t in texts], convert_to_tensor=True, batch_size=len(texts))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (ours - with_prompt).abs().max() > 1e-3, "the prompt tokens were pooled"
    masks.cursor.step = 0
    assert torch.isfinite(trainer.compute_loss(student, batch))
