"""`kiln eval ppl` and kiln.evaluate against an independent reference.

A tiny Llama, trained for a few steps on a short text so that its predictions
depend on context, with a small BPE tokenizer that adds BOS. The reference is
Hugging Face's "perplexity of fixed-length models" loop over transformers'
eager logits, written out here; kiln's compiled prefill (TVM) must give the
same perplexity to 1e-6 relative.
"""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import VOCAB, tiny_model

TEXT = ("the quick brown fox jumps over the lazy dog. a kiln fires clay into pots, "
        "and the potter sells the pots at the market by the river. ") * 4
MAX_SEQ_LEN = 64
# kiln's fp32 logits are within 1e-6 of transformers' (tests/tiny_models.py); the perplexities, summed in
# float64, agree to 6e-8 (measured), so 1e-6 is room for rounding and nothing more
PPL_TOLERANCE = 1e-6


def kiln_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def reference_perplexity(model, ids, window, stride):
    """Hugging Face's sliding-window recipe: (perplexity, scored tokens)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[0, :-1].double()
        shifted = labels[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, shifted, ignore_index=-100, reduction="sum").item()
        count += int((shifted != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, trained torch model, token ids of TEXT as the tokenizer gives them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("eval") / "tiny-llama"
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                                              special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    assert tokenizer.get_vocab_size() <= VOCAB
    ids = tokenizer.encode(TEXT).ids
    assert ids[0] == tokenizer.token_to_id("<s>") and len(ids) > 100

    model = copy.deepcopy(tiny_model("llama")).train()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = torch.tensor([ids])
    for _ in range(40):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path, model, ids


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compiled_through_cli(checkpoint, text_file, tmp_path_factory):
    """`kiln eval ppl CHECKPOINT --json` compiles into a fresh cache: (completed process, artifact path)."""
    cache = tmp_path_factory.mktemp("cache")
    out = kiln_cli("eval", "ppl", str(checkpoint[0]), "--text", str(text_file), "--json", "--window", "16",
                   "--stride", "5", "--max-seq-len", str(MAX_SEQ_LEN), env={"KILN_CACHE_DIR": str(cache)})
    artifacts = [os.path.join(cache, d, "model.kiln") for d in os.listdir(cache)]
    return out, artifacts[0] if len(artifacts) == 1 else None


@pytest.fixture(scope="module")
def artifact(compiled_through_cli):
    out, path = compiled_through_cli
    assert out.returncode == 0 and path is not None, out.stderr
    return path


# --- window bookkeeping ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, window, stride", [
    (2, 2, 1), (3, 2, 1), (10, 4, 3), (100, 16, 5), (121, 16, 15), (121, 512, 256), (1000, 512, 256),
    (1000, 64, 1), (513, 512, 256), (512, 512, 256), (511, 512, 256),
])
def test_every_token_is_scored_once_with_at_most_window_minus_one_of_context(num_tokens, window, stride):
    from kiln.evaluate import sliding_windows

    windows = sliding_windows(num_tokens, window, stride)
    scored = []
    for k, w in enumerate(windows):
        assert w.begin == k * stride
        fed = range(num_tokens)[w.input_slice]
        assert 1 <= len(fed) <= window - 1 and fed[0] == w.begin
        rows = range(len(fed))[w.scored_rows]
        assert len(rows) == w.num_scored >= 1
        for row, token in zip(rows, range(w.score_from, w.end)):
            assert fed[row] + 1 == token  # row r predicts the token after fed token r
            assert 1 <= token - w.begin <= window - 1  # context: tokens begin .. token - 1
            scored.append(token)
    assert scored == list(range(1, num_tokens))


@pytest.mark.parametrize("window, stride, message", [
    (1, 1, "at least 2"), (4, 5, "must be smaller than the window"), (4, 4, "must be smaller than the window"),
    (4, 0, "positive"),
])
def test_bad_windows_are_refused(window, stride, message):
    from kiln.evaluate import sliding_windows
    from kiln.ir.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        sliding_windows(100, window, stride)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        sliding_windows(1, 4, 2)


def test_score_stats_against_torch():
    from kiln.evaluate import ScoreStats

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(70, 300)).astype(np.float32) * 3
    logits = reference + rng.normal(size=reference.shape).astype(np.float32)
    logits[:5] = reference[:5]  # some positions agree exactly
    targets = rng.integers(0, 300, size=70)
    stats = ScoreStats()
    stats.add(logits[:40], targets[:40], reference[:40])  # two calls: the totals run over both
    stats.add(logits[40:], targets[40:], reference[40:])
    ref_t, log_t = torch.tensor(reference, dtype=torch.float64), torch.tensor(logits, dtype=torch.float64)
    nll = torch.nn.functional.cross_entropy(log_t, torch.tensor(targets), reduction="sum").item()
    kl = torch.nn.functional.kl_div(torch.log_softmax(log_t, -1), torch.log_softmax(ref_t, -1), log_target=True,
                                    reduction="sum").item()
    agree = (log_t.argmax(-1) == ref_t.argmax(-1)).double().mean().item()
    assert stats.tokens == stats.compared == 70
    assert stats.perplexity == pytest.approx(math.exp(nll / 70), rel=1e-12)
    assert stats.mean_kl == pytest.approx(kl / 70, rel=1e-9)
    assert stats.top1_agreement == agree and 5 / 70 <= agree < 1


# --- perplexity of a compiled model -----------------------------------------------------------------


def test_text_is_tokenized_with_bos(checkpoint, artifact):
    import kiln
    from kiln.evaluate import encode_text

    assert encode_text(kiln.load(artifact), TEXT) == checkpoint[2]


@pytest.mark.parametrize("window, stride", [(16, 5), (8, 7), (MAX_SEQ_LEN + 1, 32), (2, 1)])
def test_perplexity_matches_transformers(checkpoint, artifact, window, stride):
    import kiln
    from kiln.evaluate import perplexity

    _, model, ids = checkpoint
    expected, count = reference_perplexity(model, ids, window, stride)
    calls = []
    result = perplexity(kiln.load(artifact), ids, window=window, stride=stride,
                        on_window=lambda done, total, stats: calls.append((done, total)))
    assert result.tokens == count == len(ids) - 1
    assert result.perplexity == pytest.approx(expected, rel=PPL_TOLERANCE)
    assert calls == [(k, result.windows) for k in range(1, result.windows + 1)]
    assert expected < 0.5 * VOCAB  # the model learned the text: context matters


def test_models_compared_in_lockstep(checkpoint, artifact):
    """kiln against transformers over the same windows: same perplexity each, top-1 agreement 1, KL ~ 0;
    and against a perturbed copy of itself, KL equal to the one computed here with torch."""
    import kiln
    from kiln.evaluate import score_windows

    _, model, ids = checkpoint
    engine = kiln.load(artifact)

    def eager(feed):
        with torch.no_grad():
            return model(input_ids=torch.tensor([feed])).logits[0].numpy()

    # std 4: enough to flip some of the trained model's top-1 choices
    noise = 4 * np.random.default_rng(0).normal(size=(MAX_SEQ_LEN, VOCAB)).astype(np.float32)
    seen = []

    def noisy(feed):
        seen.append(feed)
        return engine.logits(feed) + noise[:len(feed)]

    stats = score_windows({"transformers": eager, "kiln": engine.logits, "noisy": noisy}, ids, 16, 5,
                          reference="kiln")
    expected, count = reference_perplexity(model, ids, 16, 5)
    assert stats["kiln"].compared == 0 and stats["transformers"].compared == stats["noisy"].compared == count
    assert stats["transformers"].perplexity == pytest.approx(expected, rel=1e-6)  # float32 logits of shorter feeds
    assert stats["kiln"].perplexity == pytest.approx(expected, rel=PPL_TOLERANCE)
    assert stats["transformers"].top1_agreement == 1.0 and stats["transformers"].mean_kl < 1e-7
    kl, agree = 0.0, 0
    for k, feed in enumerate(seen):  # windows of 16 every 5: the first scores rows 0.., later ones the last 5
        rows = slice(0, None) if k == 0 else slice(-5, None)
        clean = torch.tensor(engine.logits(feed), dtype=torch.float64)
        log_p = torch.log_softmax(clean[rows], -1)
        log_q = torch.log_softmax((clean + torch.tensor(noise[:len(feed)], dtype=torch.float64))[rows], -1)
        kl += torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
    assert stats["noisy"].mean_kl == pytest.approx(kl / count, rel=1e-6) and stats["noisy"].mean_kl > 0.01
    assert stats["noisy"].top1_agreement == agree / count < 1


def test_window_longer_than_the_artifact_is_refused(checkpoint, artifact):
    import kiln
    from kiln.evaluate import perplexity
    from kiln.ir.errors import ConfigError

    with pytest.raises(ConfigError, match=f"compiled maximum of {MAX_SEQ_LEN}"):
        perplexity(kiln.load(artifact), checkpoint[2], window=MAX_SEQ_LEN + 2, stride=8)


# --- the command line ------------------------------------------------------------------------------


def test_cli_json_compiles_a_checkpoint_and_prints_one_object(checkpoint, compiled_through_cli):
    out, _ = compiled_through_cli
    assert out.returncode == 0, out.stderr
    expected, count = reference_perplexity(checkpoint[1], checkpoint[2], 16, 5)
    assert out.stdout.count("\n") == 1
    result = json.loads(out.stdout)
    assert list(result) == ["perplexity", "tokens"]
    assert result["tokens"] == count and result["perplexity"] == pytest.approx(expected, rel=PPL_TOLERANCE)


def test_cli_readable_line_and_max_tokens(checkpoint, artifact, text_file):
    out = kiln_cli("eval", "ppl", artifact, "--text", str(text_file), "--window", "8", "--stride", "3",
                   "--max-tokens", "40")
    assert out.returncode == 0, out.stderr
    expected, count = reference_perplexity(checkpoint[1], checkpoint[2][:40], 8, 3)
    assert count == 39
    line, = out.stdout.splitlines()
    assert line.startswith(f"perplexity {expected:.4f} over 39 tokens"), line


@pytest.mark.parametrize("make_args, message", [
    (lambda a, t: [a, "--text", str(t.parent / "missing.txt")], "missing.txt: file not found"),
    (lambda a, t: [a, "--text", str(t.parent / "empty.txt")], "the file is empty"),
    (lambda a, t: [a, "--text", str(t.parent / "blank.txt")], "the text is 1 token long"),
    (lambda a, t: [a, "--text", str(t.parent / "latin1.txt")], "expected UTF-8 text"),
    (lambda a, t: [a, "--text", str(t), "--window", "1"], "--window must be at least 2"),
    (lambda a, t: [a, "--text", str(t), "--window", "8", "--stride", "9"],
     "--stride (9) must be smaller than --window"),
    (lambda a, t: [a, "--text", str(t), "--window", "8", "--stride", "8"],
     "--stride (8) must be smaller than --window"),
    (lambda a, t: [a, "--text", str(t), "--max-tokens", "1"], "--max-tokens must be at least 2"),
    (lambda a, t: [a, "--text", str(t), "--window", "100"], f"compiled maximum of {MAX_SEQ_LEN}"),
    (lambda a, t: ["/no/such/model", "--text", str(t)], "not found"),
])
def test_cli_bad_input_is_one_line(artifact, text_file, capsys, make_args, message):
    from kiln.cli import main

    (text_file.parent / "empty.txt").write_text("")
    (text_file.parent / "blank.txt").write_text("  \n\n  ")  # no tokens but BOS
    (text_file.parent / "latin1.txt").write_bytes("the caf\xe9".encode("latin-1"))
    code = main(["eval", "ppl", *make_args(artifact, text_file)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("kiln: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
