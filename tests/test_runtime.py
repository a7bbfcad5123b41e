"""runtime/: generation over the exported graphs, against the PyTorch reference's own greedy decoding.

Oracle: `Qwen3NextForCausalLM.generate_greedy` (the reference model, one prompt at a time, no padding),
and numpy's softmax for the sampling distribution. The export is the session's `tiny_export`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3next_trt.cli import main
from qwen3next_trt.errors import InputError
from qwen3next_trt.runtime import Generator, SamplingParams, choose
from qwen3next_trt.runtime import generator as generator_module

from greedy import separated_greedy

N = 12


@pytest.fixture(scope="module")
def gen(tiny_export):
    return Generator(tiny_export)


@pytest.fixture(scope="module")
def reference():
    from qwen3next_trt.model.loader import WeightSource

    return WeightSource("tiny", seed=0, dtype=torch.float32).whole_model(with_mtp=False).float()


@pytest.fixture(scope="module")
def prompts(gen):
    rng = np.random.default_rng(7)
    return [rng.integers(0, gen.vocab_size, n).tolist() for n in (9, 4, 9, 15)]


@pytest.fixture(scope="module")
def expected(reference, prompts):
    # well-separated oracle tokens: exact equality below then holds on any CPU (tests/greedy.py)
    return separated_greedy(reference, prompts, N)


def test_batch_of_different_lengths_equals_reference_greedy(gen, prompts, expected):
    assert gen.generate(prompts, N) == expected
    st = gen.last_stats
    assert st.generated_tokens == N * len(prompts) and st.main_passes == N - 1 and st.tokens_per_main_pass == 1.0


def test_each_prompt_alone_equals_the_batch(gen, prompts, expected):
    for p, e in zip(prompts, expected):
        assert gen.generate([p], N) == [e]


def test_chunked_prefill_equals_whole_prefill(tiny_export, prompts, expected):
    chunked = Generator(tiny_export, prefill_chunk=4)
    assert chunked.generate(prompts, N) == expected


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mtp_speculation_is_token_identical_to_greedy(gen, prompts, expected, k):
    # random weights: the MTP head's drafts are nearly always wrong, so every round rolls back
    assert gen.generate(prompts, N, mtp_k=k) == expected
    st = gen.last_stats
    assert st.drafted[0] == st.row_passes and st.rollback_layer_runs > 0


@pytest.mark.parametrize("k", [1, 3, 4])
def test_verification_and_rollback_with_oracle_drafts(gen, prompts, expected, monkeypatch, k):
    """Drafts from the reference's own greedy output, with one planted mistake at a position that
    varies per row and round (sometimes none): exercises full acceptance, partial acceptance, and
    rows of one batch accepting different counts (masked holes in the attention slots)."""
    rounds = {"n": 0}
    V = gen.vocab_size

    def oracle(self, rows):
        D = np.zeros((len(rows), self.k), np.int64)
        for j, r in enumerate(rows):
            done = int(self.produced[r])
            truth = (expected[r] + [0] * (self.k + 1))[done : done + self.k]
            wrong = (r + rounds["n"]) % (self.k + 1)  # == k: all drafts right
            D[j] = truth
            if wrong < self.k:
                D[j, wrong] = (truth[wrong] + 1) % V
        rounds["n"] += 1
        return D

    monkeypatch.setattr(generator_module._Run, "_draft", oracle)
    assert gen.generate(prompts, N, mtp_k=k) == expected
    st = gen.last_stats
    assert st.accepted[0] > 0 and st.tokens_per_main_pass > 1.0
    assert st.main_passes < N - 1  # fewer main passes than plain decoding


def test_stop_token_ends_a_request_and_others_go_on(gen, prompts, expected):
    stop = expected[1][2]
    got = gen.generate(prompts, N, stop_tokens=[stop])
    for g, e in zip(got, expected):
        cut = e.index(stop) + 1 if stop in e else N
        assert g == e[:cut]
    assert len(got[1]) == 3


def test_streaming_events(gen, prompts, expected):
    events = list(gen.stream(prompts, N, mtp_k=2))
    per = [[e.token for e in events if e.request == r] for r in range(len(prompts))]
    assert per == expected
    finished = [e for e in events if e.finished]
    assert sorted(e.request for e in finished) == list(range(len(prompts)))
    assert all(e is finished_last for r in range(len(prompts))
               for e, finished_last in [([x for x in events if x.request == r][-1], [x for x in finished if x.request == r][0])])


def test_sampling_is_seeded_and_follows_the_distribution(gen, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    a = gen.generate(prompts, N, params)
    assert a == gen.generate(prompts, N, params)
    assert a != gen.generate(prompts, N, SamplingParams(temperature=0.8, top_p=0.9, seed=4))
    # tiny top_p keeps only the most likely token: greedy
    assert gen.generate(prompts, 4, SamplingParams(temperature=1.0, top_p=1e-6)) == gen.generate(prompts, 4)
    # `choose` against numpy's softmax: empirical frequencies over 20k draws
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0])
    rng = np.random.default_rng(0)
    draws = np.bincount([choose(logits, SamplingParams(temperature=0.7), rng) for _ in range(20000)], minlength=5) / 20000
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    assert np.abs(draws - p).max() < 0.015
    # top-p 0.8: the smallest prefix of the sorted probabilities reaching 0.8, renormalised
    draws = np.bincount([choose(logits, SamplingParams(temperature=0.7, top_p=0.8), rng) for _ in range(20000)], minlength=5) / 20000
    order = np.argsort(-p)
    keep = order[: np.searchsorted(np.cumsum(p[order]), 0.8) + 1]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    assert np.abs(draws - q).max() < 0.015 and draws[q == 0].sum() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "prompt 0: empty"),
    (dict(prompts=[[1, 2], [3, 10**6]]), "prompt 1: token id 1000000 out of range"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1]], mtp_k=5), "mtp_k: expected 0"),
    (dict(prompts=[[1]], mtp_k=2, sampling=SamplingParams(temperature=0.5)), "greedy only"),
    (dict(prompts=[[1]], sampling=SamplingParams(top_p=0.0)), "top_p"),
    (dict(prompts=[[1]], sampling=SamplingParams(temperature=-1.0)), "temperature"),
    (dict(prompts=[[1]], stop_tokens=[-3]), "stop_tokens"),
    (dict(prompts=[[1] * 4000], max_new_tokens=200), "exceeds the export's context of 4096"),
])
def test_bad_requests_are_refused_with_the_field(gen, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InputError, match=message):
        gen.generate(**kwargs)


def test_export_without_mtp_refuses_speculation(tiny_export, tmp_path):
    import json
    import shutil

    d = tmp_path / "onnx"
    shutil.copytree(tiny_export, d)
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"] = [g for g in m["graphs"] if not g["name"].startswith("mtp")]
    (d / "manifest.json").write_text(json.dumps(m))
    g = Generator(d)
    assert not g.mtp_available
    with pytest.raises(InputError, match="no MTP graphs"):
        g.generate([[1, 2]], 3, mtp_k=1)
    with pytest.raises(InputError, match="not a full export: graph.s. layer_02.decode"):
        m["graphs"] = [x for x in m["graphs"] if x["name"] != "layer_02.decode"]
        (d / "manifest.json").write_text(json.dumps(m))
        Generator(d)


def test_missing_engines_are_named(tiny_export, tmp_path):
    with pytest.raises(InputError, match=r"embed\.engine: not found"):
        Generator(tiny_export, engines_dir=tmp_path)


def test_cli_generate(tiny_export, prompts, expected, capsys, tmp_path):
    out = tmp_path / "gen.json"
    args = ["generate", "--onnx", str(tiny_export), "--max-new-tokens", str(N), "--mtp", "2", "--json", str(out)]
    for p in prompts[:2]:
        args += ["--prompt-ids", ",".join(map(str, p))]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"request 0: {','.join(map(str, expected[0]))}" in text and "tokens per main pass" in text
    assert main(["generate", "--onnx", str(tiny_export), "--prompt-ids", "1,x"]) == 2
    assert "expected comma-separated token ids" in capsys.readouterr().err


def test_cli_generate_with_the_checkpoints_tokenizer(tiny_export, gen, capsys, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(gen.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    (tmp_path / "ckpt").mkdir()
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    prompt = "w5 w17 w300 w2"
    expected = gen.generate([[5, 17, 300, 2]], 6)[0]
    assert main(["generate", "--onnx", str(tiny_export), "--model", str(tmp_path / "ckpt"), "--prompt", prompt,
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert f"request 0: {','.join(map(str, expected))}  {tok.decode(expected)!r}" in out
    assert main(["generate", "--onnx", str(tiny_export), "--prompt", prompt]) == 2
    assert "--prompt needs --model" in capsys.readouterr().err
    assert main(["generate", "--onnx", str(tiny_export), "--model", str(tmp_path), "--prompt", prompt]) == 2
    assert "tokenizer.json: not found" in capsys.readouterr().err
