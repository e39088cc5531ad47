import json

import pytest
import torch

from erpd.train import data as D
from erpd.train import measure, stage0


def test_round_trip(tiny, tmp_path):
    _, data, _ = tiny
    data.meta = {"model": "tiny", "note": "x"}
    D.save(data, tmp_path / "d")
    back = D.load(tmp_path / "d")
    for k in D._TENSOR_KEYS:
        a, b = getattr(data, k), getattr(back, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert back.responses == data.responses and back.prompts == data.prompts and back.answers == data.answers
    assert back.meta == data.meta
    manifest = json.loads((tmp_path / "d" / D.MANIFEST).read_text())
    assert manifest["format"] == D.FORMAT and manifest["version"] == D.FORMAT_VERSION


def test_layout_matches_the_documentation(tiny):
    _, data, _ = tiny
    # The r-th response token sits at input_ids[i, prompt_len + r] and targets[i, r].
    for i in range(len(data)):
        p, r = int(data.prompt_len[i]), int(data.response_len[i])
        assert torch.equal(data.input_ids[i, p : p + r], data.targets[i, :r])
        assert (data.targets[i, r:] == -100).all() and data.attention_mask[i].sum() == p + r
    # π0 log-probs are filled in on response tokens only, and are valid log-probs.
    assert (data.old_logprobs[data.mask] < 0).all() and (data.old_logprobs[~data.mask] == 0).all()


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = D.group_advantages(rewards, group)
    # group 0: mean 0.25, population std sqrt(3)/4; group 1: all equal -> 0.
    assert torch.allclose(adv[:4], (rewards[:4] - 0.25) / (3**0.5 / 4 + 1e-6))
    assert (adv[4:] == 0).all()
    assert torch.allclose(D.group_advantages(rewards, group, "mean")[:4], rewards[:4] - 0.25)


def _saved(tiny, tmp_path):
    _, data, _ = tiny
    return D.save(data, tmp_path / "d")


def test_truncated_tensor_file_is_detected(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    f = d / D.TENSORS
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(D.CorruptDataError, match="truncated"):
        D.load(d)


def test_modified_byte_is_detected(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    f = d / D.TENSORS
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(D.CorruptDataError, match="sha256"):
        D.load(d)


def test_missing_or_bad_manifest(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    m = d / D.MANIFEST
    text = m.read_text()
    m.write_text(text[: len(text) // 2])
    with pytest.raises(D.CorruptDataError, match="not valid JSON"):
        D.load(d)
    m.write_text(text.replace(f'"version": {D.FORMAT_VERSION}', '"version": 99'))
    with pytest.raises(D.CorruptDataError, match="version"):
        D.load(d)
    m.unlink()
    with pytest.raises(D.CorruptDataError, match="erpd sample"):
        D.load(d)
    with pytest.raises(D.CorruptDataError, match="no manifest.json"):
        D.load(tmp_path / "nowhere")


def test_missing_texts_file(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    (d / D.TEXTS).unlink()
    with pytest.raises(D.CorruptDataError, match="missing"):
        D.load(d)


def test_sampling_from_the_policy(tiny):
    """Stage 0 end to end on the tiny policy: shapes, EOS handling, verifier, π0 log-probs."""
    from erpd.train.config import RunConfig
    from erpd.train.task import generate

    policy, _, _ = tiny
    cfg = RunConfig()
    cfg.sample.k, cfg.sample.max_new_tokens, cfg.sample.batch_size = 3, 6, 4
    calls = []

    def verifier(text, answer):
        calls.append((text, answer))
        return float(len(text) % 2 == 0)

    problems = generate(2, 0, 1)
    data, cache = stage0.sample_fixed_data(policy, problems, cfg, verifier)
    assert len(data) == 6 and len(calls) == 6 and data.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert calls[0][1] == problems[0].answer
    assert int(data.response_len.max()) <= 6
    eos = policy.tokenizer.eos_token_id
    for i in range(len(data)):
        r = data.targets[i, : int(data.response_len[i])].tolist()
        assert eos not in r[:-1]  # nothing is kept after an EOS
    # The stored π0 log-probs are what a fresh teacher-forced pass gives.
    _, lp = measure.build_cache(policy, data, cfg.sample.temperature, 2)
    assert torch.allclose(lp, data.old_logprobs, atol=1e-5)
    assert len(cache.ref_hidden) == len(data)


def test_truncated_or_flipped_texts_file_is_detected(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    f = d / D.TEXTS
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 1])
    with pytest.raises(D.CorruptDataError, match=r"texts.json: .* bytes, the manifest says .*truncated"):
        D.load(d)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01  # one bit, same size
    f.write_bytes(bytes(flipped))
    with pytest.raises(D.CorruptDataError, match="texts.json: sha256"):
        D.load(d)


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_single_bit_flip_anywhere_in_the_tensors_is_detected(tiny, tmp_path, where):
    d = _saved(tiny, tmp_path)
    f = d / D.TENSORS
    raw = bytearray(f.read_bytes())
    i = int(where * (len(raw) - 1)) if where != -1 else len(raw) - 1
    raw[i] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(D.CorruptDataError, match="sha256"):
        D.load(d)


def _rewrite_consistently(d, **edits):
    """Edit tensors and re-save with a fresh manifest: checksums pass, the layout checks must not."""
    data = D.load(d)
    for k, fn in edits.items():
        setattr(data, k, fn(getattr(data, k).clone()))
    D.save(data, d)


@pytest.mark.parametrize("edit,msg", [
    (dict(response_len=lambda t: t + 1), "response_len"),
    (dict(targets=lambda t: torch.where(t != -100, (t + 1) % 50, t)), "targets are not the response tokens"),
    (dict(old_logprobs=lambda t: t.abs() + 0.1), "old_logprobs"),
    (dict(attention_mask=lambda t: torch.ones_like(t)), "attention_mask"),
    (dict(group=lambda t: t + 100), "group ids"),
])
def test_checksum_valid_but_inconsistent_data_is_detected(tiny, tmp_path, edit, msg):
    d = _saved(tiny, tmp_path)
    _rewrite_consistently(d, **edit)
    with pytest.raises(D.CorruptDataError, match=msg):
        D.load(d)
